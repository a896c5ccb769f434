"""The dry run in-process: the plan compared with a memory ledger, no request made."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from batcher.intake import Intake, intake_batches
from batcher.ledger import MemoryLedger
from batcher.model import RunInfo, Stage
from batcher.ops.dryrun import make_plan
from batcher.run.stats import RunStats
from batcher.settings import Settings


def _count(text: str, label: str) -> int:
    found = re.search(rf"^  {re.escape(label)}\s+(\d+)$", text, re.MULTILINE)
    assert found, text
    return int(found.group(1))


@pytest.mark.anyio
@pytest.mark.parametrize("word", ["failed", "error", "cancelled", "canceled"])
async def test_a_generation_the_api_ended_as_failed_is_new_under_retry_failed(
        tmp_path: Path, word: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("apiProjectId\np-1\n")
    settings = Settings(manifest=manifest, ledger=":memory:", out=tmp_path / "out",
                        retry_failed=True, dry_run=True)
    ledger = MemoryLedger()
    await ledger.open(RunInfo.start())
    async for batch in intake_batches(Intake.of(settings)):
        (row,) = await ledger.import_rows(batch)
    row = await ledger.transition(row.row_id, Stage.PENDING, Stage.SUBMITTED,
                                  {"generation_id": "g-1", "api_status": "queued"},
                                  event="submitted")
    await ledger.transition(row.row_id, Stage.SUBMITTED, Stage.FAILED,
                            {"api_status": word, "error": {"code": "generationFailed"}},
                            event="failed")
    out = io.StringIO()
    await make_plan(settings, ledger, RunStats(), out)
    # The run re-keys such a row and posts it again (a new charge): the plan says so.
    assert _count(out.getvalue(), "new (to submit)") == 1
    assert _count(out.getvalue(), "failed (retried)") == 0


@pytest.mark.anyio
async def test_the_plan_warns_of_retired_models_and_shows_the_upload_time_at_the_cap(
        tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"x" * 3 * 1024 * 1024)
    (tmp_path / "b.wav").write_bytes(b"y" * 1024 * 1024)
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,model\na.wav,diffio-3.5\nb.wav,\na.wav,diffio-4.5-pro\n"
                        "b.wav,diffio-2\n")
    settings = Settings(manifest=manifest, ledger=":memory:", out=tmp_path / "out",
                        model="diffio-4.6-flash", dry_run=True, max_bandwidth=512 * 1024)
    ledger = MemoryLedger()
    await ledger.open(RunInfo.start())
    out = io.StringIO()
    await make_plan(settings, ledger, RunStats(), out)
    text = out.getvalue()
    assert re.search(r"^  bytes to upload\s+8\.0 MiB$", text, re.MULTILINE), text
    assert re.search(r"^  upload time at 512\.0 KiB/s\s+16s$", text, re.MULTILINE), text
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, text  # 3.5 and 2; the 4.5 alias and the default are served
    assert all("diffio-4.6-flash, diffio-4.6-pro" in w for w in warnings)
    assert "1 row uses diffio-3.5" in text and "1 row uses diffio-2," in text


@pytest.mark.anyio
async def test_the_plan_names_files_over_the_documented_upload_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import batcher.ops.dryrun as dryrun

    monkeypatch.setattr(dryrun, "DOCUMENTED_UPLOAD_LIMIT", 1000)  # 2 GiB files are slow to make
    (tmp_path / "big.wav").write_bytes(b"x" * 1001)
    (tmp_path / "ok.wav").write_bytes(b"x" * 1000)
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\nok.wav\nbig.wav\n")
    settings = Settings(manifest=manifest, ledger=":memory:", out=tmp_path / "out",
                        model="diffio-4.6-flash", dry_run=True)
    ledger = MemoryLedger()
    await ledger.open(RunInfo.start())
    out = io.StringIO()
    await make_plan(settings, ledger, RunStats(), out)
    (warning,) = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
    assert "big.wav (row 2)" in warning and "invalidRow" in warning
