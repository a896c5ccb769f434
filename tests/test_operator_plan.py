"""Operator experience, part 1: settings through the real CLI, the dry run.

Every test runs real ``batcher`` processes; the dry-run tests also run a real
simulator process, so "no API request" is counted by the API itself.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import batcher_env, export_records, run_batcher, wait_for, write_wav

from batcher.settings import OPTION_SPECS, load_job_file

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batcher", *args], env=env or batcher_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ settings


def _write_job(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "m.csv").write_text("apiProjectId\np1\np2\n")
    job = folder / "nightly.toml"
    job.write_text(
        "# every path below is relative to this file\n"
        "[job]\n"
        'manifest = "data/m.csv"\n'
        'ledger = "state/m.sqlite"\n'
        'out = "restored"\n'
        'model = "job-model"\n'
        "rate = 3\n"
        "concurrency = 2\n"
        "poll_interval = 7\n"
        'key_namespace = "job-ns"\n'
        "price_per_minute = 0.5\n"
        "max_spend = 40\n"
        'report = "reports/job.json"\n'
        "progress_every = 30\n"
        "timeout = 12\n"
    )
    return job


def test_flag_beats_env_beats_job_file_beats_default(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects")
    job = _write_job(tmp_path / "job")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = batcher_env(BATCHER_RATE="4", BATCHER_CONCURRENCY="5", BATCHER_MODEL="env-model",
                      BATCHER_POLL_INTERVAL="",  # empty counts as unset
                      BATCHER_MAX_SPEND="25")
    done = _run("run", str(job), "--rate", "6", "--max-spend", "30", "--api-base",
                sim.base_url, env=env, cwd=elsewhere)
    # The simulator knows no model "env-model": both rows fail with a 404.
    assert done.returncode == 1, done.stdout + done.stderr
    # The job file's relative paths resolve against its folder, not the cwd.
    report = json.loads((tmp_path / "job" / "reports" / "job.json").read_text())
    assert report["requestsByEndpoint"] == {"env-model-generation": 2}
    s = report["settings"]
    assert s["rate"] == 6.0  # flag > env > job file
    assert s["max_spend"] == 30.0  # flag > env > job file
    assert s["concurrency"] == 5  # env > job file
    assert s["model"] == "env-model"  # env > job file
    assert s["poll_interval"] == 7.0  # job file (the empty env value is ignored)
    assert s["key_namespace"] == "job-ns"
    assert s["price_per_minute"] == 0.5
    assert s["progress_every"] == 30.0 and s["timeout"] == 12.0
    assert s["max_attempts"] == 6 and s["halt_after"] is None  # defaults
    assert s["manifest"] == str(tmp_path / "job" / "data" / "m.csv")
    assert s["ledger"] == str(tmp_path / "job" / "state" / "m.sqlite")
    assert s["out"] == str(tmp_path / "job" / "restored")
    assert s["job_file"] == str(job)
    assert (tmp_path / "job" / "state" / "m.sqlite").exists()
    assert "sim-key" not in json.dumps(report)


def test_report_path_from_flag_env_or_job_file(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects")
    job = _write_job(tmp_path / "job")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    job_report = tmp_path / "job" / "reports" / "job.json"
    base = ["run", str(job), "--api-base", sim.base_url]

    # env beats the job file; a relative env path is relative to the cwd
    done = _run(*base, env=batcher_env(BATCHER_REPORT="env.json"), cwd=cwd)
    assert done.returncode == 1, done.stderr
    assert (cwd / "env.json").exists() and not job_report.exists()

    # the flag beats both
    done = _run(*base, "--report", "flag.json", env=batcher_env(BATCHER_REPORT="env2.json"),
                cwd=cwd)
    assert done.returncode == 1, done.stderr
    assert (cwd / "flag.json").exists()
    assert not (cwd / "env2.json").exists() and not job_report.exists()

    # neither: the job file's own
    assert _run(*base, cwd=cwd).returncode == 1
    assert job_report.exists()

    # A dry run writes no report and no metrics: the nightly's last report
    # (and the exit code node_exporter alerts on) must survive a rehearsal.
    before = job_report.read_bytes()
    metrics = cwd / "m.prom"
    assert _run(*base, "--dry-run", "--metrics", "m.prom", cwd=cwd).returncode == 0
    assert job_report.read_bytes() == before and not metrics.exists()


def test_bad_values_exit_2_naming_their_source(tmp_path: Path) -> None:
    job = _write_job(tmp_path / "job")
    bad_env = _run("run", str(job), "--dry-run", env=batcher_env(BATCHER_RATE="fast"))
    assert bad_env.returncode == 2
    assert "BATCHER_RATE" in bad_env.stderr and "'fast'" in bad_env.stderr
    bad_flag = _run("run", str(job), "--dry-run", "--concurrency", "1.5")
    assert bad_flag.returncode == 2 and "--concurrency" in bad_flag.stderr
    job.write_text(job.read_text() + "ratee = 5\n")
    bad_key = _run("run", str(job), "--dry-run")
    assert bad_key.returncode == 2
    assert "unknown key 'ratee'" in bad_key.stderr and str(job) in bad_key.stderr
    # A cap without a price cannot be estimated: refused before anything runs.
    (tmp_path / "m.csv").write_text("apiProjectId\np\n")
    no_price = _run("run", str(tmp_path / "m.csv"), "--max-spend", "5", "--dry-run")
    assert no_price.returncode == 2 and "--price-per-minute" in no_price.stderr
    assert not (tmp_path / "m.ledger.sqlite").exists()


def test_help_names_every_environment_variable() -> None:
    done = _run("run", "--help", env=batcher_env(COLUMNS="100"))
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for spec in OPTION_SPECS:
        if spec.name == "manifest":
            continue
        assert spec.flag in text
        assert f"(env {spec.env})" in text, spec.env
    top = _run("--help", env=batcher_env(COLUMNS="100"))
    assert "DIFFIO_API_KEY" in top.stdout and "DIFFIO_API_BASE_URL" in top.stdout


def _readme_keys() -> set[str]:
    text = (REPO / "jobs" / "README.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))


def test_job_docs_and_examples_match_the_settings() -> None:
    names = {spec.name for spec in OPTION_SPECS}
    assert _readme_keys() == names  # every key documented, none invented
    for job in sorted((REPO / "jobs").glob("*.toml")):
        values = load_job_file(job)  # raises ConfigError on an unknown key
        assert values.get("manifest"), job
    nightly = load_job_file(REPO / "jobs" / "nightly.toml")
    assert nightly["max_spend"] > 0 and nightly["price_per_minute"] > 0
    assert nightly["report"].startswith(str(REPO / "jobs"))


# ------------------------------------------------------------------ dry run


def _plan(stdout: str) -> dict[str, str]:
    """The plan table as {label: value}."""
    table: dict[str, str] = {}
    for line in stdout.splitlines():
        found = re.match(r"^  (\S.*?)\s{2,}(\S.*)$", line)
        if found:
            table[found.group(1)] = found.group(2)
    return table


def _ledger_counts(path: Path) -> tuple[int, ...]:
    conn = sqlite3.connect(path)
    try:
        return tuple(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                     for table in ("ledger_rows", "ledger_events", "ledger_runs"))
    finally:
        conn.close()


def test_dry_run_plan_numbers_on_known_wav_files(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.2,0.3")  # no auto-create: an unknown project is a 404
    write_wav(tmp_path / "audio" / "a.wav", seconds=30, freq=200, rate=2000)
    write_wav(tmp_path / "audio" / "b.wav", seconds=90, freq=300, rate=2000)
    (tmp_path / "audio" / "junk.wav").write_bytes(b"this is not a RIFF header" * 40)
    manifest = tmp_path / "m.csv"
    lines = ["file,apiProjectId,prompt", "audio/a.wav,,x", "audio/b.wav,,x",
             "audio/junk.wav,,x", ",p-missing,x", "audio/a.wav,p-both,x"]
    manifest.write_text("\n".join(lines) + "\n")
    ledger = tmp_path / "m.sqlite"
    base = ["--api-base", sim.base_url, "--ledger", str(ledger), "--poll-interval", "0.1"]
    dry = [*base, "--dry-run", "--price-per-minute", "0.1"]

    first = run_batcher("run", str(manifest), *dry)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no API request" in first.stdout
    plan = _plan(first.stdout)
    assert plan["rows total"] == "5"
    assert plan["new (to submit)"] == "4"
    assert plan["complete (skipped)"] == "0"
    assert plan["failed (left as is)"] == "0"
    assert plan["in flight (polled)"] == "0"
    assert plan["invalid"] == "1"
    assert plan["audio minutes (new, known)"] == "2.00"  # 30 s + 90 s
    assert plan["durations unknown"] == "2"  # the garbage .wav and the project row
    # Billed: 60 (30 s at the 60 s minimum) + 90 = 150 s known; unknowns at
    # 60 s (low), the known mean 75 s (expected), the longest 90 s (high).
    assert plan["estimated cost low"] == "$0.45"
    assert plan["estimated cost expected"] == "$0.50"
    assert plan["estimated cost high"] == "$0.55"
    assert sim.stats()["requests"] == 0

    real = run_batcher("run", str(manifest), *base)
    assert real.returncode == 1, real.stdout + real.stderr  # p-missing: 404, the bad row
    by_line = {r["line"]: r for r in export_records(ledger)}
    assert [by_line[n]["status"] for n in range(1, 6)] == [
        "complete", "complete", "complete", "failed", "failed"]

    # Leave one row in flight: slow generations, SIGTERM once it was posted.
    sim.configure({"duration": [30, 30]})
    write_wav(tmp_path / "audio" / "c.wav", seconds=45, freq=400, rate=2000)
    manifest.write_text("\n".join([*lines, "audio/c.wav,,x"]) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(manifest), *base],
                            env=batcher_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(r["line"] == 6 and r["status"] == "submitted"
                             for r in export_records(ledger)), interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    write_wav(tmp_path / "audio" / "d.wav", seconds=12, freq=500, rate=2000)
    manifest.write_text("\n".join([*lines, "audio/c.wav,,x", "audio/d.wav,,x"]) + "\n")

    requests = sim.stats()["requests"]
    before = export_records(ledger)
    counts = _ledger_counts(ledger)
    second = run_batcher("run", str(manifest), *dry)
    assert second.returncode == 0, second.stdout + second.stderr
    plan = _plan(second.stdout)
    assert plan["rows total"] == "7"
    assert plan["new (to submit)"] == "1"  # d.wav
    assert plan["complete (skipped)"] == "3"
    assert plan["failed (left as is)"] == "1"  # p-missing (the bad row is "invalid")
    assert plan["in flight (polled)"] == "1"  # c.wav
    assert plan["invalid"] == "1"
    assert plan["audio minutes (new, known)"] == "0.20"  # 12 s
    assert plan["durations unknown"] == "0"
    # 12 s of audio is billed as the 60 s minimum.
    assert plan["estimated cost low"] == plan["estimated cost high"] == "$0.10"
    assert sim.stats()["requests"] == requests  # the API saw nothing
    assert export_records(ledger) == before  # rows untouched
    assert _ledger_counts(ledger) == counts  # no row, no event, no run written

    # With --retry-failed the failed row would be retried: the plan says so.
    retry = run_batcher("run", str(manifest), *dry, "--retry-failed")
    assert "failed (retried)" in retry.stdout


def test_dry_run_makes_no_request_even_without_a_server(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", seconds=1)
    (tmp_path / "m.csv").write_text("file\na.wav\n")
    # Port 9 (discard) is closed on loopback: any request would fail the run.
    done = run_batcher("run", str(tmp_path / "m.csv"), "--dry-run", "--api-base",
                       "http://127.0.0.1:9")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _plan(done.stdout)["new (to submit)"] == "1"
    assert "unknown (give --price-per-minute USD)" in done.stdout
    # No key is needed to plan.
    nokey = run_batcher("run", str(tmp_path / "m.csv"), "--dry-run",
                        env=batcher_env(DIFFIO_API_KEY=""))
    assert nokey.returncode == 0, nokey.stderr


def test_dry_run_prints_the_plan_not_an_empty_run_summary(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("apiProjectId\np1\np2\n")
    done = run_batcher("run", str(tmp_path / "m.csv"), "--dry-run")
    assert done.returncode == 0
    assert "0 rows" not in done.stdout


def test_dry_run_creates_no_ledger(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("apiProjectId\np1\n")
    fresh = tmp_path / "fresh.sqlite"
    done = run_batcher("run", str(tmp_path / "m.csv"), "--dry-run", "--ledger", str(fresh))
    assert done.returncode == 0
    assert _plan(done.stdout)["new (to submit)"] == "1"
    assert not fresh.exists()  # planning against no ledger creates none


def test_status_after_a_dry_run_still_shows_the_real_last_run(tmp_path: Path,
                                                              simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2")  # p-missing: 404, so the run exits 1
    manifest = tmp_path / "m.csv"
    manifest.write_text("apiProjectId\np-missing\n")
    ledger = tmp_path / "m.sqlite"
    real = run_batcher("run", str(manifest), "--api-base", sim.base_url,
                       "--ledger", str(ledger), "--poll-interval", "0.1")
    assert real.returncode == 1
    assert "exit 1" in run_batcher("status", str(ledger)).stdout
    assert run_batcher("run", str(manifest), "--dry-run", "--ledger",
                       str(ledger)).returncode == 0
    status = run_batcher("status", str(ledger))
    assert "exit 1" in status.stdout, status.stdout


def test_dry_run_after_a_spend_cap_halt_prices_the_rest(tmp_path: Path, simulator: Any
                                                        ) -> None:
    sim = simulator("--duration", "0.1,0.2")
    for i in range(3):
        write_wav(tmp_path / f"t{i}.wav", seconds=90, freq=200 + 100 * i, rate=2000)
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\nt0.wav\nt1.wav\nt2.wav\n")
    base = ["--api-base", sim.base_url, "--ledger", str(tmp_path / "m.sqlite"),
            "--price-per-minute", "1"]
    halted = run_batcher("run", str(manifest), *base, "--max-spend", "2",
                         "--poll-interval", "0.1")
    assert halted.returncode == 3, halted.stdout + halted.stderr
    assert sim.stats()["generations_created"] == 1
    plan = _plan(run_batcher("run", str(manifest), *base, "--dry-run").stdout)
    assert plan["complete (skipped)"] == "1"
    assert plan["in flight (polled)"] == "0"  # nothing was posted for the other two
    assert plan["new (to submit)"] == "2"
    assert plan["durations unknown"] == "0"
    assert plan["audio minutes (new, known)"] == "3.00"
    assert plan["estimated cost expected"] == "$3.00"


def test_diffio_base_url_env_beats_the_job_file(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.1")
    (tmp_path / "m.csv").write_text("apiProjectId\np1\n")
    job = tmp_path / "job.toml"
    # The job file names a closed port; the environment names the simulator.
    job.write_text('[job]\nmanifest = "m.csv"\napi_base = "http://127.0.0.1:9/v1"\n'
                   "max_attempts = 1\npoll_interval = 0.1\n")
    done = _run("run", str(job), env=batcher_env(DIFFIO_API_BASE_URL=sim.base_url))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sim.stats()["charges"] == 1
