"""batcher survives its own infrastructure: real processes, real outages.

* the API host unreachable (a TCP proxy the test cuts) for 30 s: requests
  pause, no row fails, the run finishes; past ``--outage-patience``: exit 3
  with one line naming the host, and a plain re-run finishes with no new
  charge;
* a PostgreSQL server of the test's own restarted, stopped for 20 s, and its
  connections terminated in a loop under two hosts: both finish, no row is
  charged twice;
* ``--out`` and the SQLite ledger on a small tmpfs: exit 3 naming the folder,
  no generation bought after the first ENOSPC beyond those in flight, the
  ledger intact, and a plain re-run after freeing space completes with no
  new charge.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    batcher_env,
    count_statuses,
    export_records,
    plain_project_manifest,
    run_batcher,
    write_wav,
)
from infra_faults import OwnPostgres, Proxy, pg_bin, wait_until

pytestmark = pytest.mark.slow


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _charges(sim: Any) -> int:
    stats = sim.stats()
    return int(sum(stats["charges_by_key"].values()))


# -- the API host ------------------------------------------------------------------


@pytest.mark.parametrize("outage", [30, 90])
def test_api_unreachable_for_a_while_pauses_the_run_and_no_row_fails(
        tmp_path: Path, simulator: Any, outage: int) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.5,1.5", "--latency",
                    "0.002,0.01")
    port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
    manifest = plain_project_manifest(tmp_path / "m.csv", 120)
    ledger = tmp_path / "m.sqlite"
    with Proxy(port) as proxy:
        args = ["run", str(manifest), "--api-base", proxy.base_url, "--ledger", str(ledger),
                "--rate", "20", "--poll-interval", "0.5", "--outage-patience", "5m"]
        proc = _start(args)
        try:
            wait_until(lambda: sim.stats()["generations_created"] >= 30, timeout=60)
            proxy.down()
            down_at = time.monotonic()
            time.sleep(outage)
            proxy.up()
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        up_for = time.monotonic() - down_at
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err
    # It waited the outage out: it was still running when the host came back.
    assert up_for > outage
    records = export_records(ledger)
    assert count_statuses(records) == {"complete": 120}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert _charges(sim) == 120


def test_api_unreachable_past_the_patience_exits_3_and_a_plain_rerun_finishes(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2", "--latency", "0.002,0.01")
    port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
    manifest = plain_project_manifest(tmp_path / "m.csv", 100)
    ledger = tmp_path / "m.sqlite"
    with Proxy(port) as proxy:
        args = ["run", str(manifest), "--api-base", proxy.base_url, "--ledger", str(ledger),
                "--rate", "20", "--poll-interval", "0.5", "--outage-patience", "15s"]
        proc = _start(args)
        try:
            wait_until(lambda: sim.stats()["generations_created"] >= 30, timeout=60)
            proxy.down()
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 3, out + err
        assert "Traceback" not in err and "ExceptionGroup" not in err
        # One line names what is down and how to go on.
        named = [line for line in (out + err).splitlines()
                 if f"127.0.0.1:{proxy.port}" in line and "has not answered" in line]
        assert named, out + err
        assert "run the same command again" in named[0]
        records = export_records(ledger)
        statuses = count_statuses(records)
        assert "failed" not in statuses, statuses
        charged = _charges(sim)
        assert 0 < charged < 100
        # The same command, the host back: it finishes, without --retry-failed.
        proxy.up()
        again = run_batcher(*args, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert count_statuses(export_records(ledger)) == {"complete": 100}
    assert sim.stats()["extra_charges"] == 0
    assert _charges(sim) == 100  # each row charged once over both runs


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.mark.skipif(pg_bin() is None, reason="no PostgreSQL server programs (initdb) here")
def test_postgres_restarted_stopped_and_its_connections_cut_two_hosts_finish(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.5,1.5", "--latency",
                    "0.002,0.01")
    manifest = plain_project_manifest(tmp_path / "m.csv", 200)
    with OwnPostgres() as pg:
        url = f"{pg.url}?schema=j_{uuid.uuid4().hex[:8]}"
        args = ["run", str(manifest), "--api-base", sim.base_url, "--ledger", url,
                "--rate", "10", "--poll-interval", "0.5", "--lease-ttl", "5",
                "--outage-patience", "3m"]
        procs = [_start(args) for _ in range(2)]
        try:
            wait_until(lambda: sim.stats()["generations_created"] >= 15, timeout=60)
            pg.restart()
            wait_until(lambda: sim.stats()["generations_created"] >= 40, timeout=90)
            pg.stop()
            time.sleep(20)
            pg.start()
            wait_until(lambda: sim.stats()["generations_created"] >= 70, timeout=90)
            cut = 0
            for _ in range(12):
                cut += pg.terminate_all()
                time.sleep(0.5)
            assert cut > 0
            outs = [p.communicate(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, out + err
            assert "Traceback" not in err and "ExceptionGroup" not in err
        records = export_records(url)
    assert count_statuses(records) == {"complete": 200}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert _charges(sim) == 200


# -- a full disk ----------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True, capture_output=True, timeout=30)


def _resize_tmpfs(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True,
                   capture_output=True, timeout=30)


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CI runs as root)"
    return None


@pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))
def test_a_full_out_folder_halts_with_exit_3_and_a_rerun_after_freeing_space_finishes(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.3,0.8", "--latency", "0.002,0.01")
    inputs = tmp_path / "in"
    rows = 24
    for i in range(rows):
        # About 160 KB each: a 2.5 MB disk holds the ledger and about a dozen outputs.
        write_wav(inputs / f"take{i:02d}.wav", seconds=10.0, freq=200.0 + 10 * i)
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file"])
        for i in range(rows):
            writer.writerow([str(inputs / f"take{i:02d}.wav")])
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2500k")
    try:
        ledger = disk / "m.sqlite"
        args = ["run", str(manifest), "--api-base", sim.base_url, "--ledger", str(ledger),
                "--out", str(disk / "out"), "--rate", "20", "--concurrency", "4",
                "--poll-interval", "0.3", "--outage-patience", "30s", "--log-json"]
        first = run_batcher(*args, timeout=240)
        assert first.returncode == 3, first.stdout + first.stderr
        assert "Traceback" not in first.stderr
        text = first.stdout + first.stderr
        assert f"no space left in {disk / 'out'}" in text, text
        assert "run the same command again" in text
        full_at = min(json.loads(line)["ts"] for line in first.stderr.splitlines()
                      if line.startswith("{") and '"disk.full"' in line)
        conn = sqlite3.connect(ledger)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            late = conn.execute(
                "SELECT count(*) FROM ledger_events WHERE event IN ('submitted', 'replayed') "
                "AND at > ?", (float(full_at),)).fetchone()[0]
            failed = conn.execute(
                "SELECT count(*) FROM ledger_rows WHERE stage = 'failed'").fetchone()[0]
        finally:
            conn.close()
        # At most what was already on its way to the API (--concurrency 4).
        assert late <= 4, late
        assert failed == 0
        bought = _charges(sim)
        assert 0 < bought < rows
        # Space freed: the same command finishes, buying only what was never bought.
        _resize_tmpfs(disk, "64m")
        again = run_batcher(*args, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
        records = export_records(ledger)
        assert count_statuses(records) == {"complete": rows}
        assert sim.stats()["extra_charges"] == 0
        assert _charges(sim) == rows
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30,
                       check=False)


@pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))
def test_a_full_disk_under_the_sqlite_ledger_waits_then_exits_3_naming_the_file(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2", "--latency", "0.002,0.01")
    manifest = plain_project_manifest(tmp_path / "m.csv", 60)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        ledger = disk / "m.sqlite"
        args = ["run", str(manifest), "--api-base", sim.base_url, "--ledger", str(ledger),
                "--rate", "10", "--poll-interval", "0.5", "--outage-patience", "10s"]
        proc = _start(args)
        try:
            wait_until(lambda: sim.stats()["generations_created"] >= 10, timeout=60)
            filler = disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
                           capture_output=True, timeout=60, check=False)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 3, out + err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("batcher: error: ") and str(ledger) in last, err
        assert "has been unavailable for" in last and "full" in last, last
        assert "run the same command again" in last
        filler.unlink()
        conn = sqlite3.connect(ledger)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute(
                "SELECT count(*) FROM ledger_rows WHERE stage = 'failed'").fetchone()[0] == 0
        finally:
            conn.close()
        again = run_batcher(*args, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
        assert count_statuses(export_records(ledger)) == {"complete": 60}
        assert sim.stats()["extra_charges"] == 0
        assert _charges(sim) == 60
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30,
                       check=False)
