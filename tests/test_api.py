"""The Python API: ``from batcher import run_manifest`` for orchestrators.

Runs go against the embedded simulator (``simulate=True``) on real SQLite
ledgers in tmp_path, in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import write_wav

import batcher
import batcher.simulator
from batcher import (
    ConfigError,
    LedgerLocked,
    RunResult,
    Settings,
    make_settings,
    run_manifest,
    run_manifest_async,
)
from batcher.ledger.sqlite import SqliteLedger
from batcher.model import RunInfo

# The embedded simulator's generations take 0.05-0.1 s here, not its demo
# 1-3 s: what these tests check does not depend on how long the API works.
FAST = {"duration": [0.05, 0.1]}


def test_public_names_are_pinned_and_sorted() -> None:
    assert batcher.__all__ == [
        "ApiError",
        "BatcherError",
        "ConfigError",
        "LedgerError",
        "LedgerLocked",
        "ManifestError",
        "RunResult",
        "Settings",
        "__version__",
        "make_settings",
        "run_manifest",
        "run_manifest_async",
    ]
    assert batcher.__all__ == sorted(batcher.__all__)
    for name in batcher.__all__:
        value = getattr(batcher, name)
        if name != "__version__":
            assert value.__doc__, f"{name} has no docstring"
    assert (Path(batcher.__file__).parent / "py.typed").exists()


def _manifest(tmp_path: Path) -> Path:
    write_wav(tmp_path / "audio" / "take.wav", seconds=0.5)
    path = tmp_path / "m.csv"
    path.write_text("apiProjectId,file,prompt\np-1,,a\np-2,,b\n,audio/take.wav,c\n")
    return path


def test_run_manifest_runs_and_resumes(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                       ) -> None:
    manifest = _manifest(tmp_path)
    result = run_manifest(manifest, simulate=True, poll_interval=0.1, sim_config=FAST, rate=50)
    assert isinstance(result, RunResult)
    assert result.exit_code == 0
    assert result.counts == {"pending": 0, "submitted": 0, "complete": 3, "failed": 0}
    summary = result.summary()
    assert summary["exitCode"] == 0 and summary["counts"]["complete"] == 3
    assert summary["completedThisRun"] == 3 and summary["submitted"] == 3
    assert summary["ledger"] == f"sqlite:{tmp_path / 'm.ledger.sqlite'}"
    assert summary["topErrors"] == []
    outputs = list((tmp_path / "m.out" / "audio").glob("take.*"))
    assert len(outputs) == 1 and outputs[0].stat().st_size > 0
    # A library call prints no summary and no progress on stdout.
    assert capfd.readouterr().out == ""

    again = run_manifest(manifest, simulate=True, poll_interval=0.1, sim_config=FAST)
    assert again.exit_code == 0
    assert again.summary()["rowsAlreadyComplete"] == 3
    assert again.summary()["requests"] == 0


def test_run_manifest_reports_failures_and_halts(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("apiProjectId,model\np-1,\np-2,\np-3,no-such-model\n,\n")
    result = run_manifest(path, simulate=True, poll_interval=0.1, sim_config=FAST, rate=50)
    assert result.exit_code == 1
    assert result.counts["failed"] == 1 and result.counts["complete"] == 2
    assert [code for code, _, _ in result.errors] == ["notFound"]

    capped = tmp_path / "c.csv"
    capped.write_text("apiProjectId\nq-1\nq-2\nq-3\n")
    halted = run_manifest(capped, simulate=True, poll_interval=0.1, sim_config=FAST,
                          price_per_minute=1, max_spend=1)
    assert halted.exit_code == 3
    assert halted.halted is not None and "maxSpendReached" in halted.halted
    assert halted.counts["complete"] == 1 and halted.counts["pending"] == 2


def test_unknown_or_bad_options_raise_before_anything_runs(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    with pytest.raises(TypeError, match="poll_intervall"):
        run_manifest(manifest, simulate=True, poll_intervall=0.1)
    with pytest.raises(TypeError, match="retry"):
        make_settings(manifest, retry=True)
    with pytest.raises(ConfigError, match="rate"):
        run_manifest(manifest, simulate=True, rate="fast")
    with pytest.raises(ConfigError, match="DIFFIO_API_KEY"):
        run_manifest(manifest, env={})
    assert not (tmp_path / "m.ledger.sqlite").exists()


def test_make_settings_precedence_and_key(tmp_path: Path) -> None:
    _manifest(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text('[job]\nmanifest = "m.csv"\nrate = 3\nconcurrency = 2\npoll_interval = 9\n')
    env = {"BATCHER_RATE": "4", "BATCHER_CONCURRENCY": "5"}
    s = make_settings(job, api_key="k-secret-42", env=env, rate=6)
    assert isinstance(s, Settings)
    assert (s.rate, s.concurrency, s.poll_interval) == (6.0, 5, 9.0)
    assert s.manifest == tmp_path / "m.csv" and s.job_file == job
    assert s.api_key == "k-secret-42"
    assert "k-secret-42" not in repr(s) and "k-secret-42" not in str(s.describe())
    # The api_key argument beats DIFFIO_API_KEY in env.
    assert make_settings(job, api_key="a", env={"DIFFIO_API_KEY": "b"}).api_key == "a"
    assert make_settings(job, env={"DIFFIO_API_KEY": "b"}).api_key == "b"


def test_run_manifest_takes_ready_settings(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    settings = make_settings(manifest, simulate=True, poll_interval=0.1, rate=50,
                             ledger=str(tmp_path / "custom.sqlite"))
    result = run_manifest(settings, sim_config=FAST)
    assert result.exit_code == 0
    assert result.ledger == f"sqlite:{tmp_path / 'custom.sqlite'}"


@pytest.mark.anyio
async def test_run_manifest_async_on_the_callers_loop(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    result = await run_manifest_async(manifest, simulate=True, poll_interval=0.1,
                                      sim_config=FAST, rate=50)
    assert result.exit_code == 0 and result.counts["complete"] == 3


@pytest.mark.anyio
async def test_a_held_ledger_raises_ledger_locked(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    holder = SqliteLedger(tmp_path / "m.ledger.sqlite")
    info: Any = RunInfo.reader()
    await holder.open(info, lock=True)
    try:
        with pytest.raises(LedgerLocked, match=f"pid {info.pid}"):
            await run_manifest_async(manifest, simulate=True, poll_interval=0.1, sim_config=FAST)
    finally:
        await holder.close(None)
    result = await run_manifest_async(manifest, simulate=True, poll_interval=0.1,
                                      sim_config=FAST, rate=50)
    assert result.exit_code == 0
