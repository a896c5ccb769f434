"""``batcher export``: one record per manifest row, from the ledger alone."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..ledger import open_ledger
from ..ledger.base import Ledger
from ..model import RunInfo

__all__ = ["CSV_FIELDS", "FORMULA_STARTS", "csv_cell", "csv_line", "export_main", "export_rows"]

# The fields users and scripts rely on first, in their documented order; then the rest.
CSV_FIELDS = ["rowId", "line", "idempotencyKey", "apiProjectId", "generationId", "modelKey",
              "status", "apiStatus", "error", "output", "attempts", "kind", "stage",
              "outputSha256", "source", "sourceSha256", "polls", "retryCount", "leaderRowId"]


# A spreadsheet reads a cell starting with one of these as a formula (or, for
# tab and CR, may drop them and read what follows as one): OWASP's list.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One CSV cell: JSON text for objects, ``'`` before a would-be formula.

    Escaping goes by the first character only (a leading ``'`` is what
    spreadsheets take as "text, not a formula" and do not show), so the cell
    of a negative number is ``'-1`` too: a reader that wants exact values
    takes the JSON Lines export.
    """
    if value is None:
        return ""
    text = orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_line(cells: list[str]) -> str:
    """One CSV record (RFC 4180 quoting), ending in ``\\n``.

    Written by hand because the csv module leaves a lone CR unquoted when
    the line ends in LF, and a reader then splits the record there.
    """
    return ",".join(
        '"' + cell.replace('"', '""') + '"' if _NEEDS_QUOTES.search(cell) else cell
        for cell in cells) + "\n"


_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


async def export_rows(ledger: Ledger, fmt: str, out: TextIO, *,
                      include_retired: bool = False) -> int:
    """Write every row as JSONL or CSV; return how many."""
    n = 0
    as_csv = fmt == "csv"
    if as_csv:
        out.write(csv_line(CSV_FIELDS))
    async for row in ledger.rows(include_retired=include_retired):
        record = row.export_record()
        if as_csv:
            out.write(csv_line([csv_cell(record.get(f)) for f in CSV_FIELDS]))
        else:
            out.write(orjson.dumps(record).decode() + "\n")
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
