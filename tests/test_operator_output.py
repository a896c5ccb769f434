"""Operator experience, part 3: what a run shows and leaves behind.

The --report JSON, the --metrics Prometheus textfile, progress off and on a
terminal, ``batcher status`` (also while a run holds the ledger), -q and
--log-json: real ``batcher`` processes against a real simulator process.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import batcher_env, export_records, run_args, run_batcher, wait_for

from batcher.settings import DEFAULT_MODEL

SUMMARY = re.compile(r"^batcher: (\d+) rows: (\d+) complete, (\d+) failed, (\d+) pending, "
                     r"(\d+) submitted ")
PROGRESS = re.compile(r"^progress: (\d+)/(\d+) done, (\d+) failed, (\d+) in flight, "
                      r"[\d.]+ req/s, (\d+) 429s, ETA [^,\s]+(, [^,]+ queued at the API .+)?$")


def _manifest(path: Path, good: int, *, bad: bool = False) -> Path:
    """GOOD apiProjectId rows; with BAD, a row for an unknown model and an invalid row."""
    lines = ["apiProjectId,prompt,model"]
    lines += [f"proj-{i:03d},clean {i}," for i in range(good)]
    if bad:
        lines += ["proj-x,clean x,no-such-model", ",neither source,"]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------ Prometheus text

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? "
                     r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|NaN|[-+]Inf))"
                     r"(?: -?[0-9]+)?$")


def parse_prometheus(text: str) -> dict[str, Any]:
    """Parse the text exposition format strictly; {name: {labels-tuple: value}}.

    Also returns the TYPE of each family under the key ``("__type__", name)``.
    """
    assert text.endswith("\n"), "the format ends every line with a newline"
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if parts[1] in ("HELP", "TYPE"):
                assert len(parts) >= 3 and re.fullmatch(_NAME, parts[2]), line
                name = parts[2]
                if parts[1] == "TYPE":
                    assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped")
                    assert name not in types, f"second TYPE for {name}"
                    assert name not in samples, f"TYPE of {name} after its samples"
                    types[name] = parts[3]
                else:
                    assert name not in helps, f"second HELP for {name}"
                    helps.add(name)
            continue
        found = _SAMPLE.match(line)
        assert found, f"not a sample line: {line!r}"
        name, labels, value = found.groups()
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        assert pairs not in samples.get(name, {}), f"duplicate sample {line!r}"
        samples.setdefault(name, {})[pairs] = float(value)
    for name in samples:
        assert name in types, f"{name} has no TYPE line"
    return {"samples": samples, "types": types, "helps": helps}


def test_parse_prometheus_rejects_malformed_text() -> None:
    good = '# HELP a_b x\n# TYPE a_b gauge\na_b{k="v"} 1.5\na_b{k="w"} 2\n'
    assert parse_prometheus(good)["samples"]["a_b"] == {(("k", "v"),): 1.5, (("k", "w"),): 2}
    for bad in ("a_b 1\n", "# TYPE a_b gauge\na_b{k=v} 1\n", "# TYPE a_b gauge\na_b 1",
                "# TYPE a_b gauge\na_b one\n", "# TYPE a b gauge\n"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


# ------------------------------------------------------------ report, metrics, status


@pytest.mark.slow
def test_report_metrics_and_status_after_a_run(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.3,0.6")
    manifest = _manifest(tmp_path / "m.csv", 4, bad=True)
    ledger = manifest.with_suffix(".sqlite")
    report, metrics = tmp_path / "out" / "r.json", tmp_path / "out" / "m.prom"
    start = time.monotonic()
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.2", "--rate", "40",
                                 "--price-per-minute", "0.5", "--report", str(report),
                                 "--metrics", str(metrics)))
    wall = time.monotonic() - start
    assert done.returncode == 1, done.stdout + done.stderr
    records = export_records(ledger)
    sim_stats = sim.stats()

    r = json.loads(report.read_text())
    assert r["exitCode"] == 1
    assert (r["rowsTotal"], r["rowsInvalid"], r["rowsAlreadyComplete"]) == (6, 1, 0)
    assert (r["completedThisRun"], r["failedThisRun"], r["submitted"]) == (4, 1, 4)
    assert r["errorsByCode"] == {"notFound": 1}
    assert r["requests"] == sim_stats["requests"] == sum(r["requestsByEndpoint"].values())
    by_endpoint = r["requestsByEndpoint"]
    assert by_endpoint[f"{DEFAULT_MODEL}-generation"] == 4
    assert by_endpoint["no-such-model-generation"] == 1
    assert by_endpoint["get_generation_progress"] == r["polls"]
    assert r["polls"] == sum(rec["polls"] for rec in records) >= 4
    assert r["pollsPerRow"] == round(r["polls"] / 4, 3)
    assert 0 < r["durationSeconds"] < wall
    # apiProjectId rows are estimated at the 60 s minimum: 4 x 1 min x $0.5
    assert r["estimatedSpendUsd"] == 2.0
    assert r["halted"] is None
    assert r["settings"]["price_per_minute"] == 0.5
    assert "sim-key" not in report.read_text()

    m = parse_prometheus(metrics.read_text())
    s = m["samples"]
    assert s["batcher_rows_finished_total"] == {
        (("outcome", "complete"),): 4, (("outcome", "failed"),): 1}
    assert {k[0][1]: v for k, v in s["batcher_requests_total"].items()} == by_endpoint
    assert s["batcher_polls_total"][()] == r["polls"]
    assert s["batcher_estimated_spend_usd"][()] == 2.0
    assert s["batcher_last_exit_code"][()] == 1
    # (report and metrics each take their own snapshot, a moment apart)
    assert abs(s["batcher_run_duration_seconds"][()] - r["durationSeconds"]) < 0.5
    assert abs(s["batcher_last_run_timestamp_seconds"][()] - time.time()) < 60
    assert set(m["types"].values()) <= {"gauge", "counter"}
    assert not list(metrics.parent.glob(".*tmp"))  # written atomically, nothing left

    # `batcher status`: the table, the errors, the last run.
    status = run_batcher("status", str(ledger))
    assert status.returncode == 0, status.stderr
    table = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()
             if line.split() and line.split()[0] in ("status", "complete", "failed",
                                                     "submitted", "pending", "total")}
    assert table["status"] == ["rows", "share"]
    assert table["complete"] == ["4", "66.7%"]
    assert table["failed"] == ["2", "33.3%"]
    assert table["submitted"] == ["0", "0.0%"] and table["pending"] == ["0", "0.0%"]
    assert table["total"] == ["6"]
    assert "most common errors:" in status.stdout
    assert re.search(r"^  1 x notFound: ", status.stdout, re.MULTILINE)
    assert re.search(r"^  1 x invalidRow: .*row 6", status.stdout, re.MULTILINE)
    assert re.search(r"^last run: started .* ended .* after [\d.]+ s, exit 1$", status.stdout,
                     re.MULTILINE)

    as_json = json.loads(run_batcher("status", str(ledger), "--json").stdout)
    assert as_json["total"] == 6
    assert as_json["byStatus"] == {"pending": 0, "submitted": 0, "complete": 4, "failed": 2}
    assert {e["code"]: e["count"] for e in as_json["topErrors"]} == {
        "notFound": 1, "invalidRow": 1}
    assert as_json["lastRun"]["exit_code"] == 1


@pytest.mark.slow
def test_report_has_counts_by_status(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 5)
    report = tmp_path / "r.json"
    # A cap of $2 at $1 a row: 2 complete, 3 left pending; only the ledger's
    # counts say so (this run's counters know nothing of the pending rows).
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1",
                                 "--price-per-minute", "1", "--max-spend", "2",
                                 "--report", str(report)))
    assert done.returncode == 3
    r = json.loads(report.read_text())
    assert r["exitCode"] == 3 and "maxSpendReached" in r["halted"]
    assert r["counts"] == {"pending": 3, "submitted": 0, "complete": 2, "failed": 0}


@pytest.mark.slow
def test_metric_names_follow_prometheus_conventions(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 2)
    metrics = tmp_path / "m.prom"
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1", "--metrics",
                                 str(metrics)))
    assert done.returncode == 0
    parsed = parse_prometheus(metrics.read_text())
    for name, kind in parsed["types"].items():
        # "_total" is the counter suffix; a gauge must not carry it.
        assert kind == "counter" or not name.endswith("_total"), name
        assert name in parsed["helps"], f"{name} has no HELP"


# ------------------------------------------------------------ progress and status mid-run


@pytest.mark.slow
def test_progress_lines_off_a_terminal_and_status_mid_run(tmp_path: Path, simulator: Any
                                                          ) -> None:
    # Generations long enough that four status, export and plan processes
    # started one after another still find them running on a loaded machine.
    sim = simulator("--auto-create-projects", "--duration", "6,6.5")
    manifest = _manifest(tmp_path / "m.csv", 3)
    ledger = manifest.with_suffix(".sqlite")
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher",
         *run_args(manifest, sim.base_url, "--poll-interval", "0.3", "--progress-every", "0.3")],
        env=batcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sim.stats()["generations_created"] == 3)
        # The run holds the lock; status and export read alongside it.
        status = run_batcher("status", str(ledger), timeout=20)
        assert status.returncode == 0, status.stderr
        assert f"(pid {proc.pid})" in status.stdout
        assert re.search(r"^running: started .* s ago", status.stdout, re.MULTILINE)
        assert re.search(r"^submitted\s+3\s", status.stdout, re.MULTILINE)
        live = json.loads(run_batcher("status", str(ledger), "--json").stdout)
        assert live["byStatus"]["submitted"] == 3 and live["lastRun"]["ended_at"] is None
        assert {r["status"] for r in export_records(ledger)} == {"submitted"}
        # A dry run only reads: it plans alongside the run instead of exiting 4.
        plan = run_batcher(*run_args(manifest, sim.base_url, "--dry-run"), timeout=20)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert re.search(r"^  in flight \(polled\)\s+3$", plan.stdout, re.MULTILINE)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err

    lines = [line for line in err.splitlines() if line.startswith("progress:")]
    assert len(lines) >= 4, err  # about 6 s of work, a line every 0.3 s
    parsed = [PROGRESS.match(line) for line in lines]
    assert all(parsed), lines
    done = [int(p.group(1)) for p in parsed if p]
    assert all(int(p.group(2)) == 3 for p in parsed if p)
    assert done == sorted(done) and done[0] < 3
    assert any(int(p.group(4)) == 3 for p in parsed if p)  # all three in flight at once
    assert "\x1b[" not in err  # no terminal control codes in a log file
    # The summary goes to stdout, always, and nothing else does.
    assert SUMMARY.match(out.splitlines()[0]) and "progress:" not in out
    assert SUMMARY.match(out).groups()[:3] == ("3", "3", "0")  # type: ignore[union-attr]


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1.5,1.5")
    manifest = _manifest(tmp_path / "m.csv", 3)
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = batcher_env(TERM="xterm-256color", COLUMNS="120")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batcher",
             *run_args(manifest, sim.base_url, "--poll-interval", "0.3",
                       "--progress-every", "0.3")],
            env=env, stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60)
    finally:
        os.close(follower)
        reader.join(timeout=5)
        os.close(leader)
    tty = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, done.stdout + tty
    assert "progress:" not in tty  # a live bar, not lines
    assert "batcher" in tty and "/3" in tty and "in flight" in tty and "req/s" in tty
    assert "\x1b[" in tty  # drawn with terminal control codes
    assert SUMMARY.match(done.stdout)


# ------------------------------------------------------------ -q, -v, --log-json


@pytest.mark.slow
def test_quiet_prints_only_the_summary(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 2, bad=True)
    args = run_args(manifest, sim.base_url, "--poll-interval", "0.1")
    loud = run_batcher(*args)
    assert loud.returncode == 1
    assert "row.failed" in loud.stderr  # warnings are shown by default
    manifest.write_text(manifest.read_text().replace("proj-x", "proj-y"))
    quiet = run_batcher(*args, "-q")
    assert quiet.returncode == 1
    assert quiet.stderr == ""
    assert SUMMARY.match(quiet.stdout)
    assert "most common errors:" in quiet.stdout  # the summary keeps the errors


@pytest.mark.slow
def test_log_json_lines_parse_and_carry_fields(tmp_path: Path, simulator: Any) -> None:
    key = "sekrit-key-0123456789"
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2", "--api-key", key)
    manifest = _manifest(tmp_path / "m.csv", 2, bad=True)
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1", "-v",
                                 "--log-json"),
                       env=batcher_env(key))
    assert done.returncode == 1, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events and all({"ts", "level", "logger", "event"} <= set(e) for e in events)
    assert "info" in {e["level"] for e in events}  # -v: info events too
    failed = [e for e in events if e["event"] == "row.failed"]
    assert len(failed) == 1 and failed[0]["level"] == "warning" and failed[0]["row"]
    assert failed[0]["code"] == "notFound" and failed[0]["row"] in failed[0]["message"]
    assert key not in done.stdout + done.stderr
    assert SUMMARY.match(done.stdout)  # the summary stays plain text on stdout


@pytest.mark.slow
def test_quiet_has_no_progress_lines(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,1")
    manifest = _manifest(tmp_path / "m.csv", 2)
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.3",
                                 "--progress-every", "0.3", "-q"))
    assert done.returncode == 0
    assert done.stderr == ""


@pytest.mark.slow
def test_log_json_stderr_is_all_json(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,1")
    manifest = _manifest(tmp_path / "m.csv", 2)
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.3",
                                 "--progress-every", "0.3", "--log-json"))
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert lines  # progress is reported ...
    for line in lines:
        json.loads(line)  # ... as JSON


@pytest.mark.slow
def test_most_common_errors_are_counted_by_code(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--failure-rate", "1", "--duration", "0.1,0.2")
    manifest = tmp_path / "m.csv"
    manifest.write_text("apiProjectId,prompt\n" + "".join(f"p{i},x\n" for i in range(4))
                        + ",no source\n,no source either\n")
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1"))
    assert done.returncode == 1
    for out in (done.stdout, run_batcher("status", str(manifest.with_suffix(".sqlite"))).stdout):
        assert re.search(r"^  4 x generationFailed: ", out, re.MULTILINE), out
        assert re.search(r"^  2 x invalidRow: ", out, re.MULTILINE), out
