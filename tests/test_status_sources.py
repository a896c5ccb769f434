"""``status`` and ``export`` find the ledger of what ``run`` takes, as ``run`` does."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher.cli import main
from batcher.settings import ledger_for


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``main`` configures batcher's logger for a process; give it back as it was."""
    logger = logging.getLogger("batcher")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_the_ledger_is_found_as_run_finds_it(tmp_path: Path) -> None:
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("apiProjectId\np-1\n")
    job = tmp_path / "nightly.toml"
    job.write_text('[job]\nmanifest = "catalog.csv"\nledger = "state/night.sqlite"\n')
    assert ledger_for(str(manifest), env={}) == str(tmp_path / "catalog.ledger.sqlite")
    assert ledger_for(str(job), env={}) == str(tmp_path / "state" / "night.sqlite")
    # flag, then environment, then the job file
    env = {"BATCHER_LEDGER": "postgresql://h/db"}
    assert ledger_for(str(job), env=env) == "postgresql://h/db"
    assert ledger_for(str(job), ledger="other.sqlite", env=env) == "other.sqlite"
    # a ledger is itself, with no key needed
    for ledger in ("x.sqlite", "state/night.db", "postgresql://u@h/db?schema=s"):
        assert ledger_for(ledger, ledger="ignored.sqlite", env={}) == ledger


def test_a_manifest_not_run_yet_reads_as_an_empty_job(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("apiProjectId\np-1\n")
    assert main(["status", str(manifest), "--json"]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert (shown["total"], shown["ledger"]) == (0, str(tmp_path / "catalog.ledger.sqlite"))
    assert "nothing has run" in err
    assert main(["export", str(manifest)]) == 0
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "catalog.ledger.sqlite").exists()


def test_a_ledger_that_does_not_exist_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("status", "export"):
        assert main([command, str(tmp_path / "nope.sqlite")]) == 2
        assert "no ledger at" in capsys.readouterr().err
