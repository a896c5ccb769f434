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
