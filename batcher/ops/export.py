"""``batcher export``: one record per manifest row, from the ledger alone."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..ledger import open_ledger
from ..ledger.base import Ledger
from ..model import RunInfo

__all__ = ["CSV_FIELDS", "export_main", "export_rows"]

# The fields users and scripts rely on first, in their documented order; then the rest.
CSV_FIELDS = ["rowId", "line", "idempotencyKey", "apiProjectId", "generationId", "modelKey",
              "status", "apiStatus", "error", "output", "attempts", "kind", "stage",
              "outputSha256", "source", "sourceSha256", "polls", "retryCount", "leaderRowId"]


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


async def export_rows(ledger: Ledger, fmt: str, out: TextIO, *,
                      include_retired: bool = False) -> int:
    """Write every row as JSONL or CSV; return how many."""
    n = 0
    writer = None
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
    async for row in ledger.rows(include_retired=include_retired):
        record = row.export_record()
        if writer is None:
            out.write(orjson.dumps(record).decode() + "\n")
        else:
            writer.writerow([_csv_value(record.get(f)) for f in CSV_FIELDS])
        n += 1
    return n


async def export_main(url: str, fmt: str, output: Path | None, include_retired: bool) -> int:
    """The ``export`` subcommand; works while a run is writing the ledger."""
    ledger = open_ledger(url)
    await ledger.open(RunInfo.reader(), lock=False)
    try:
        if output is None:
            await export_rows(ledger, fmt, sys.stdout, include_retired=include_retired)
            sys.stdout.flush()
        else:
            with output.open("w", encoding="utf-8", newline="") as fh:
                await export_rows(ledger, fmt, fh, include_retired=include_retired)
    finally:
        await ledger.close(None)
    return 0
