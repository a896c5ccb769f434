"""Catalogs as they really are: one regression test per way the promise broke.

Nightly manifests regenerated in another order, the same recording under
several names, ``take.wav`` beside ``take.flac``, files edited while a job
runs, a hostile or careless server. Each test reproduces one breach with real
``batcher`` processes against a real simulator process (sometimes behind a
loopback proxy that holds or rewrites one answer) and asserts what batcher
must do: the simulator's charge counts, the outputs on disk, the export.

They are marked ``xfail(strict=True)`` while the breach stands: the day one
passes, the mark must go.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from catalog_helpers import (
    ApiProxy,
    job_args,
    ledger_of,
    sha256,
    tree_snapshot,
    write_csv_manifest,
)
from conftest import (
    batcher_env,
    export_records,
    kill_when,
    run_batcher,
    start_batcher,
    write_wav,
)

from batcher.simulator import restored_audio

pytestmark = pytest.mark.slow


def breach(reason: str) -> pytest.MarkDecorator:
    """The mark of a test that fails until the breach it describes is fixed.

    Only a failed assertion counts as the expected failure: a crash of the
    harness (a timeout, a server that did not start) still fails the suite.
    """
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"issue: {reason}")


def by_source(manifest: Path) -> dict[str, dict[str, Any]]:
    """Export records of file rows, by the source path relative to the manifest."""
    return {os.path.relpath(r["source"], manifest.parent): r
            for r in export_records(ledger_of(manifest)) if r["source"]}


def assert_restores(record: dict[str, Any], source: Path) -> None:
    """The record is complete and its output is the restoration of ``source`` now."""
    assert record["status"] == "complete", record
    output = Path(record["output"])
    assert not output.is_symlink(), output
    assert output.read_bytes() == restored_audio(source.read_bytes()), (
        f"{output} is not the restoration of {source} as it is now")


def one_take(tmp_path: Path, simulator: Any) -> tuple[Any, Path, Path]:
    """A quick simulator, ``take.wav`` and a manifest of that one file."""
    sim = simulator("--duration", "0.1,0.2")
    take = write_wav(tmp_path / "take.wav", seconds=0.2, freq=300.0)
    manifest = write_csv_manifest(tmp_path / "m.csv", [{"file": "take.wav", "prompt": "clean"}])
    return sim, take, manifest


def assert_charges(sim: Any, charges: int) -> None:
    stats = sim.stats()
    assert (stats["charges"], stats["extra_charges"]) == (charges, 0), (
        stats["charges_by_request"])


# ------------------------------------------------------------------ 1. order


def test_a_duplicate_above_its_completed_original_is_not_charged_again(
        tmp_path: Path, simulator: Any) -> None:
    sim, take, manifest = one_take(tmp_path, simulator)
    assert run_batcher(*job_args(manifest, sim.base_url)).returncode == 0
    # Tonight's listing has a copy under another name, sorted above the original.
    copy = tmp_path / "archive" / "copy.wav"
    copy.parent.mkdir()
    shutil.copyfile(take, copy)
    write_csv_manifest(manifest, [{"file": "archive/copy.wav", "prompt": "clean"},
                                  {"file": "take.wav", "prompt": "clean"}])
    done = run_batcher(*job_args(manifest, sim.base_url))
    assert done.returncode == 0, done.stdout + done.stderr
    records = by_source(manifest)
    assert_restores(records["archive/copy.wav"], copy)
    assert_restores(records["take.wav"], take)
    assert_charges(sim, 1)


# ---------------------------------------------------- 2. edit before upload


@pytest.mark.parametrize("api", ["current", "seed"])
def test_a_file_edited_between_hash_and_upload_is_caught_before_the_post(
        tmp_path: Path, simulator: Any, api: str) -> None:
    # Today's API uploads in parts, the seed era's in one PUT: both check the
    # bytes they sent against the row's key before anything is posted.
    sim = simulator("--duration", "0.1,0.2", api=api)
    take = write_wav(tmp_path / "take.wav", seconds=0.2, freq=300.0)
    manifest = write_csv_manifest(tmp_path / "m.csv", [{"file": "take.wav", "prompt": "clean"}])
    model = ["--model", "diffio-3.5"] if api == "seed" else []
    held, release = threading.Event(), threading.Event()

    def hold_create_project(endpoint: str, body: dict[str, Any]) -> None:
        # The project exists at the API; its answer waits for the edit.
        if endpoint == "create_project":
            held.set()
            release.wait(30)

    with ApiProxy(sim.base_url) as proxy:
        proxy.after = hold_create_project
        proc = start_batcher(*job_args(manifest, proxy.base_url, *model))
        try:
            assert held.wait(30), "batcher never created the project"
            before = take.read_bytes()
            write_wav(take, seconds=0.2, freq=900.0)  # in place, same length
            assert len(take.read_bytes()) == len(before) and take.read_bytes() != before
        finally:
            release.set()
        proc.communicate(timeout=60)
    first = export_records(ledger_of(manifest))[0]
    # Whatever was posted is recorded against the bytes that were sent.
    if first["generationId"] is not None:
        assert first["sourceSha256"] == sha256(take.read_bytes()), first
    done = run_batcher(*job_args(manifest, sim.base_url, *model))
    assert done.returncode == 0, done.stdout + done.stderr
    record = export_records(ledger_of(manifest))[0]
    assert record["sourceSha256"] == sha256(take.read_bytes())
    assert_restores(record, take)
    assert_charges(sim, 1)


# ------------------------------------------------------ 3. explicit id, new request

ID_CHANGES = ["file-same-size", "file-other-size", "params", "apiProjectId", "key-namespace"]


@pytest.mark.parametrize("change", ID_CHANGES)
def test_a_changed_request_under_the_same_id_is_a_new_request(
        tmp_path: Path, simulator: Any, change: str) -> None:
    sim = simulator("--duration", "0.1,0.2", "--auto-create-projects")
    write_wav(tmp_path / "old.wav", seconds=0.2, freq=300.0)
    new = write_wav(tmp_path / "new.wav", seconds=0.3 if change == "file-other-size" else 0.2,
                    freq=500.0)
    row = ({"id": "job-1", "apiProjectId": "p-one"} if change == "apiProjectId"
           else {"id": "job-1", "file": "old.wav", "prompt": "clean"})
    manifest = write_csv_manifest(tmp_path / "m.csv", [row])
    assert run_batcher(*job_args(manifest, sim.base_url)).returncode == 0
    first = export_records(ledger_of(manifest))[0]
    extra: list[str] = []
    if change.startswith("file"):
        row["file"] = "new.wav"
    elif change == "params":
        row["prompt"] = "less hiss"
    elif change == "apiProjectId":
        row["apiProjectId"] = "p-two"
    else:
        extra = ["--key-namespace", "night-2"]
    write_csv_manifest(manifest, [row])
    done = run_batcher(*job_args(manifest, sim.base_url, *extra))
    assert done.returncode == 0, done.stdout + done.stderr
    record = export_records(ledger_of(manifest))[0]
    assert record["rowId"] == "job-1"
    assert record["idempotencyKey"] != first["idempotencyKey"]
    assert record["generationId"] != first["generationId"]
    stats = sim.stats()
    # Two requests, each paid once. (A new namespace is a deliberate re-run
    # of the same audio: the simulator counts that one as a repeat.)
    assert stats["charges"] == 2, stats["charges_by_request"]
    if change.startswith("file"):
        assert record["source"] == str(new)
        assert record["sourceSha256"] == sha256(new.read_bytes())
        assert_restores(record, new)
        assert stats["extra_charges"] == 0
    elif change == "apiProjectId":
        assert record["apiProjectId"] == "p-two"
    elif change == "params":
        assert len(stats["charges_by_request"]) == 2


# ------------------------------------------------------------ 4. outputs collide

COLLIDING = {
    # same folder, same stem, other extension
    "same-stem": ["audio/take.wav", "audio/take.flac"],
    # same name in two folders outside the manifest's folder (absolute in the manifest)
    "same-name": ["../rec/day1/take1.wav", "../rec/day2/take1.wav"],
}


@pytest.mark.parametrize("case", sorted(COLLIDING))
def test_default_outputs_of_two_rows_never_collide(tmp_path: Path, simulator: Any,
                                                   case: str) -> None:
    sim = simulator("--duration", "0.1,0.2")
    job = tmp_path / "job"
    sources = [write_wav((job / rel).resolve(), seconds=0.2, freq=300.0 + 100 * i)
               for i, rel in enumerate(COLLIDING[case])]
    names = [str(p) if case == "same-name" else os.path.relpath(p, job) for p in sources]
    manifest = write_csv_manifest(job / "m.csv", [{"file": n, "prompt": "clean"}
                                                  for n in names])
    done = run_batcher(*job_args(manifest, sim.base_url))
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(ledger_of(manifest))
    assert len({r["output"] for r in records}) == 2, [r["output"] for r in records]
    for record, source in zip(records, sources, strict=True):
        assert_restores(record, source)
    assert_charges(sim, 2)
    # A second night has nothing to do: nothing is downloaded over anything.
    downloads = sim.stats()["downloads"]
    again = run_batcher(*job_args(manifest, sim.base_url))
    assert again.returncode == 0, again.stdout + again.stderr
    assert sim.stats()["downloads"] == downloads
    for record, source in zip(records, sources, strict=True):
        assert_restores(record, source)


def test_an_explicit_output_shared_by_two_rows_fails_the_later_row_before_any_request(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2")
    first = write_wav(tmp_path / "a.wav", seconds=0.2, freq=300.0)
    write_wav(tmp_path / "b.wav", seconds=0.2, freq=400.0)
    manifest = write_csv_manifest(tmp_path / "m.csv", [
        {"file": "a.wav", "output": "mix/final.mp3"},
        {"file": "b.wav", "output": "mix/final.mp3"},
    ])
    done = run_batcher(*job_args(manifest, sim.base_url))
    assert done.returncode == 1, done.stdout + done.stderr
    records = {r["line"]: r for r in export_records(ledger_of(manifest))}
    assert_restores(records[1], first)
    later = records[2]
    assert later["status"] == "failed" and later["error"]["code"] == "invalidRow", later
    message = later["error"]["message"]
    assert "row 2" in message and ("row 1" in message or "line 2" in message), message
    assert "mix/final.mp3" in message
    stats = sim.stats()
    assert stats["projects_created"] == 1 and stats["charges"] == 1


# ---------------------------------------------------------- 5. symlinked temp name


def test_a_symlink_at_the_temporary_download_name_is_not_followed(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2")
    job = tmp_path / "job"
    take = write_wav(job / "take.wav", seconds=0.2, freq=300.0)
    manifest = write_csv_manifest(job / "m.csv", [{"id": "take", "file": "take.wav"}])
    out = job / "m.out"
    out.mkdir()
    outside = tmp_path / "elsewhere" / "victim.mp3"
    outside.parent.mkdir()
    # Where today's download would write first: beside the final name, named
    # after it and the row id.
    (out / ".take.wav.take.restored.mp3.take.part").symlink_to(outside)
    before = tree_snapshot(tmp_path, skip=lambda p: job in (p, *p.parents))
    done = run_batcher(*job_args(manifest, sim.base_url))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not outside.exists(), "the download was written outside --out"
    assert tree_snapshot(tmp_path, skip=lambda p: job in (p, *p.parents)) == before
    assert_restores(export_records(ledger_of(manifest))[0], take)


# -------------------------------------------------------------- 6. the key leaks

SLASHED_KEY = "sk/live+SECRET/canary=7"


def key_forms(key: str) -> dict[str, str]:
    """Every form a key takes in text: raw, JSON-escaped, URL-encoded."""
    return {"raw": key, "json-escaped": key.replace("/", "\\/"),
            "url-encoded": urllib.parse.quote(key, safe="")}


def echo_answer(form: str) -> web.StreamResponse:
    """A server's answer that repeats the caller's key in ``form``."""
    if form == "location":
        return web.Response(status=307, headers={
            "Location": f"https://api.example.invalid/v1/login?key={SLASHED_KEY}"})
    text = key_forms(SLASHED_KEY)[form]
    # Written by hand: a JSON encoder would not escape '/' as the server did.
    body = '{"error": "request rejected for API key ' + text + '", "code": "badRequest"}'
    return web.Response(status=400, body=body.encode(), content_type="application/json")


@pytest.mark.parametrize("form", ["json-escaped", "url-encoded", "location"])
def test_an_echoed_key_in_any_form_is_written_nowhere(tmp_path: Path, simulator: Any,
                                                      form: str) -> None:
    sim = simulator("--duration", "0.1,0.2", "--auto-create-projects", "--api-key", SLASHED_KEY)
    manifest = write_csv_manifest(tmp_path / "m.csv", [{"apiProjectId": "p-ok"},
                                                       {"apiProjectId": "p-echo"}])
    report = tmp_path / "report.json"
    env = batcher_env(SLASHED_KEY)

    def echo(endpoint: str, body: dict[str, Any]) -> web.StreamResponse | None:
        if endpoint.endswith("-generation") and body.get("apiProjectId") == "p-echo":
            return echo_answer(form)
        return None

    with ApiProxy(sim.base_url) as proxy:
        proxy.before = echo
        done = run_batcher(*job_args(manifest, proxy.base_url, "--report", str(report), "-vv"),
                           env=env)
    ledger = ledger_of(manifest)
    export = run_batcher("export", str(ledger), env=env)
    export_csv = run_batcher("export", str(ledger), "--format", "csv", env=env)
    status = run_batcher("status", str(ledger), env=env)
    texts = {"run stdout": done.stdout, "run stderr": done.stderr, "export": export.stdout,
             "export csv": export_csv.stdout, "status": status.stdout + status.stderr}
    # The server's answer was heard (the row carries an error), minus the key.
    records = {r["apiProjectId"]: r for r in json_lines(export.stdout)}
    assert records["p-echo"]["error"] is not None, records
    found = []
    for name, needle in key_forms(SLASHED_KEY).items():
        found += [f"{what} ({name})" for what, text in texts.items() if needle in text]
        found += [f"{path.name} ({name})" for path in tmp_path.rglob("*")
                  if path.is_file() and needle.encode() in path.read_bytes()]
    assert not found, f"the key was written in: {found}"


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------- 7. followers

FOLLOWER_BREAKS = ["leader-removed", "leader-retried", "leader-edited", "follower-edited"]


@pytest.mark.parametrize("case", FOLLOWER_BREAKS)
def test_a_follower_ends_with_its_own_restoration_paid_once(
        tmp_path: Path, simulator: Any, case: str) -> None:
    sim = simulator("--duration", "3,3" if case in ("leader-removed", "leader-edited")
                    else "0.1,0.2", "--failure-rate", "1" if case == "leader-retried" else "0")
    leader = write_wav(tmp_path / "take.wav", seconds=0.2, freq=300.0)
    follower = tmp_path / "copies" / "take.wav"
    follower.parent.mkdir()
    shutil.copyfile(leader, follower)
    rows = [{"file": "take.wav", "prompt": "clean"}, {"file": "copies/take.wav", "prompt": "clean"}]
    manifest = write_csv_manifest(tmp_path / "m.csv", rows)
    args = job_args(manifest, sim.base_url)
    extra: list[str] = []
    if case in ("leader-removed", "leader-edited"):
        # Killed while the leader's generation runs: the follower is waiting.
        kill_when(args, lambda: sim.stats()["generations_created"] >= 1)
    else:
        run_batcher(*args)
    if case == "leader-removed":
        write_csv_manifest(manifest, rows[1:])
        paid = 1
    elif case == "leader-retried":
        sim.configure({"failure_rate": 0})
        extra = ["--retry-failed"]
        paid = 2  # the failed generation, and its deliberate retry
    elif case == "leader-edited":
        write_wav(leader, seconds=0.2, freq=900.0)
        paid = 2  # the original audio (already posted) and the edited one
    else:
        write_wav(follower, seconds=0.2, freq=900.0)
        paid = 2
    done = run_batcher(*args, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    records = by_source(manifest)
    assert_restores(records["copies/take.wav"], follower)
    if case != "leader-removed":
        assert_restores(records["take.wav"], leader)
    stats = sim.stats()
    assert (stats["charges"], stats["extra_charges"]) == (paid, 0), stats["charges_by_request"]


# ------------------------------------------------------- 11. formula injection

DANGEROUS_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_csv_export_cells_cannot_start_a_spreadsheet_formula(tmp_path: Path, simulator: Any
                                                             ) -> None:
    sim = simulator("--duration", "0.1,0.2", "--auto-create-projects")
    manifest = write_csv_manifest(tmp_path / "m.csv", [
        {"id": "=HYPERLINK(\"http://x.invalid\",\"open\")", "apiProjectId": "p-1"},
        {"id": "row-2", "apiProjectId": "+SUM(1,2)"},
        {"id": "row-3", "apiProjectId": "p-3", "idempotencyKey": "-2+3"},
        {"id": "row-4", "apiProjectId": "@cmd"},
    ])

    def status_with_control(endpoint: str, body: dict[str, Any]) -> web.StreamResponse | None:
        # A generation id that starts with a tab, another with a CR.
        if endpoint.endswith("-generation") and body.get("apiProjectId") in ("p-1", "p-3"):
            lead = "\t" if body["apiProjectId"] == "p-1" else "\r"
            return web.json_response({"generationId": f"{lead}=1+1", "status": "complete",
                                      "apiProjectId": body["apiProjectId"],
                                      "modelKey": "diffio-3.5"})
        return None

    with ApiProxy(sim.base_url) as proxy:
        proxy.before = status_with_control
        run_batcher(*job_args(manifest, proxy.base_url))
    done = run_batcher("export", str(ledger_of(manifest)), "--format", "csv")
    assert done.returncode == 0, done.stderr
    cells = [cell for row in csv.reader(io.StringIO(done.stdout)) for cell in row]
    # Every value above made it into the export, escaped.
    for value in ("HYPERLINK", "+SUM(1,2)", "-2+3", "@cmd", "=1+1"):
        assert any(value in cell for cell in cells), value
    dangerous = [cell for cell in cells if cell.startswith(DANGEROUS_STARTS)]
    assert not dangerous, f"unescaped formula cells: {dangerous}"


# ------------------------------------------------------------ the CLI, as typed


@pytest.mark.parametrize("given", ["manifest", "job file"])
def test_status_and_export_take_what_run_takes(tmp_path: Path, simulator: Any,
                                               given: str) -> None:
    sim = simulator("--duration", "0.1,0.2", "--auto-create-projects")
    manifest = write_csv_manifest(tmp_path / "catalog.csv", [{"apiProjectId": "p-1"},
                                                             {"apiProjectId": "p-2"}])
    source = manifest
    if given == "job file":
        source = tmp_path / "nightly.toml"
        source.write_text('[job]\nmanifest = "catalog.csv"\nledger = "state/night.sqlite"\n'
                          'poll_interval = 0.2\n')
    done = run_batcher("run", str(source), "--api-base", sim.base_url)
    assert done.returncode == 0, done.stdout + done.stderr
    status = run_batcher("status", str(source), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["total"] == 2
    export = run_batcher("export", str(source))
    assert export.returncode == 0, export.stderr
    assert sorted(r["apiProjectId"] for r in json_lines(export.stdout)) == ["p-1", "p-2"]


def test_export_into_a_closed_pipe_ends_quietly(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0,0.05", "--auto-create-projects")
    manifest = write_csv_manifest(tmp_path / "m.csv", [{"apiProjectId": f"p-{i:03d}"}
                                                       for i in range(300)])
    done = run_batcher(*job_args(manifest, sim.base_url, "--rate", "200", "--poll-interval",
                                 "0.05", "--concurrency", "32"))
    assert done.returncode == 0, done.stdout + done.stderr
    # `batcher export … | head -n 1`: the reader goes away after one line,
    # long before the export (far more than a pipe buffer) is written.
    proc = start_batcher("export", str(ledger_of(manifest)))
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["line"] == 1
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=30)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
