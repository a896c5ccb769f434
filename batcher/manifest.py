"""Reading manifests: CSV or JSON Lines, streamed, one valid row or row error at a time.

A manifest is CSV with a header row, or JSON Lines. :func:`open_manifest`
checks what must hold for the file as a whole (readable, known extension, a
header naming at least one known column) and raises :class:`ManifestError`
otherwise. The :class:`Manifest` it returns streams rows one at a time (the
file is never loaded whole) and yields, per row, either a valid
:class:`ManifestRow` or a :class:`RowError` naming the field at fault. It never
raises on bad content, whatever bytes the file holds; only an I/O failure in
the middle of the file raises ManifestError. What a valid row is, column by
column, is :mod:`batcher.columns`.

Decisions about reading:

* ``line`` counts data rows: 1 is the first non-empty record after the CSV
  header, or the first non-empty JSONL line. Empty lines (and CSV records whose
  cells are all blank) are not rows and are not counted, so adding or removing
  blank lines does not renumber rows. Every RowError message also gives the
  physical ``file line`` where the record starts, for an editor.
* Unknown columns are tracked as the file is read: the misspelt ones fail
  the rows that use them, the others are listed in
  :attr:`Manifest.ignored_columns`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import orjson

from batcher.columns import (
    KNOWN_COLUMNS,
    ManifestRow,
    RowProblem,
    json_kind,
    suggest_column,
    validate_row,
)
from batcher.errors import ManifestError, RowError

__all__ = ["KNOWN_COLUMNS", "Manifest", "ManifestRow", "open_manifest"]

_FORMATS: Mapping[str, Literal["csv", "jsonl"]] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}

# A physical line longer than this is not read into memory: it is skipped and
# its row fails. The csv module also refuses cells over 128 KiB.
_MAX_LINE = 1 << 20
_MAX_IGNORED = 20
_MAX_UNKNOWN = 1000
# Bytes that are not UTF-8 arrive as lone surrogates (errors="surrogateescape"),
# so a bad byte spoils only the line it is on.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class _Lines:
    """The physical lines of a text stream, each at most _MAX_LINE characters.

    Lines keep their endings (``\\n``, ``\\r\\n`` or ``\\r``), as the csv
    module wants. A line with bytes that are not UTF-8, or one too long to
    read, is replaced by a placeholder and its problem recorded against its
    line number; the reader of a record collects them with take_problems().
    """

    def __init__(self, text: io.TextIOWrapper) -> None:
        self._text = text
        self.lineno = 0
        self._problems: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._text.readline(_MAX_LINE)
        if not line:
            raise StopIteration
        self.lineno += 1
        if len(line) >= _MAX_LINE and not line.endswith(("\n", "\r")):
            while (rest := self._text.readline(_MAX_LINE)) and not rest.endswith(("\n", "\r")):
                pass
            self._problems.append((self.lineno, f"is longer than {_MAX_LINE} characters"))
            return "\ufffd\n"
        if _ESCAPED_BYTE.search(line):
            self._problems.append((self.lineno, "is not valid UTF-8"))
            return _ESCAPED_BYTE.sub("\ufffd", line)
        return line

    def take_problems(self) -> list[tuple[int, str]]:
        problems, self._problems = self._problems, []
        return problems


class Manifest:
    """An open manifest: iterate it once for ``ManifestRow | RowError``.

    Like a file, it is its own iterator and is read once; open the path again
    for another pass. The file is closed when iteration ends or on
    :meth:`close` (also a context manager).
    """

    def __init__(
        self,
        path: Path,
        fmt: Literal["csv", "jsonl"],
        text: io.TextIOWrapper,
        lines: _Lines,
        header: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.format = fmt
        self.columns: tuple[str, ...] = tuple(header)
        self._text = text
        self._lines = lines
        self._base = path.absolute().parent
        # Unknown column -> the known column it looks like a misspelling of, or
        # None when it is simply ignored. Bounded: JSONL keys vary per line.
        self._unknown: dict[str, str | None] = {}
        for name in header:
            self._typo_of(name)
        self._rows = self._guarded(self._csv_rows() if fmt == "csv" else self._jsonl_rows())

    @property
    def ignored_columns(self) -> tuple[str, ...]:
        """Unknown columns (CSV header) or keys (JSONL, seen so far) that were ignored."""
        ignored = [name for name, typo in self._unknown.items() if typo is None]
        return tuple(ignored[:_MAX_IGNORED])

    @property
    def misspelt_columns(self) -> dict[str, str]:
        """Unknown columns that look misspelt, each with the known column it resembles.

        Rows with a value in one of these fail; for JSONL, the keys seen so far.
        """
        return {name: typo for name, typo in self._unknown.items() if typo}

    def __iter__(self) -> Manifest:
        return self

    def __next__(self) -> ManifestRow | RowError:
        return next(self._rows)

    def close(self) -> None:
        """Stop reading and close the file."""
        self._rows.close()
        self._text.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Manifest {self.format} {str(self.path)!r} at file line {self._lines.lineno}>"

    def _typo_of(self, name: str) -> str | None:
        """For an unknown column, the known one it misspells; None otherwise."""
        if name in KNOWN_COLUMNS or not name:
            return None
        if name in self._unknown:
            return self._unknown[name]
        suggestion = suggest_column(name)
        if len(self._unknown) < _MAX_UNKNOWN:
            self._unknown[name] = suggestion
        return suggestion

    def _error(self, line: int, physical: int, message: str, field: str | None) -> RowError:
        message = f"{message} (file line {physical})"
        return RowError(message, path=str(self.path), line=line, field=field)

    def _guarded(
        self, rows: Iterator[ManifestRow | RowError]
    ) -> Generator[ManifestRow | RowError, None, None]:
        try:
            yield from rows
        except OSError as exc:
            where = f"after file line {self._lines.lineno}"
            raise ManifestError(f"{self.path}: read failed {where}: {exc}") from exc
        finally:
            self._text.close()

    def _csv_rows(self) -> Iterator[ManifestRow | RowError]:
        lines = self._lines
        reader = csv.reader(lines, strict=True)
        line = 0
        while True:
            start = lines.lineno + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                lines.take_problems()
                line += 1
                unclosed = "limit" in str(exc) or "end of" in str(exc)
                hint = " (an unclosed quote?)" if unclosed else ""
                yield self._error(line, start, f"is not valid CSV: {exc}{hint}", None)
                # A fresh reader starts clean at the next physical line.
                reader = csv.reader(lines, strict=True)
                continue
            problems = lines.take_problems()
            if not problems and not any(cell.strip() for cell in cells):
                continue
            line += 1
            if problems:
                at, what = problems[0]
                where = "" if at == start else f"its file line {at} "
                yield self._error(line, start, f"{where}{what}", None)
                continue
            yield self._csv_row(cells, line, start)

    def _csv_row(self, cells: list[str], line: int, start: int) -> ManifestRow | RowError:
        if len(cells) > len(self.columns) and any(c.strip() for c in cells[len(self.columns) :]):
            return self._error(
                line,
                start,
                f"has {len(cells)} values but the header names {len(self.columns)} columns"
                " (a value holding a comma must be in double quotes)",
                None,
            )
        fields = {name: cell for name, cell in zip(self.columns, cells, strict=False) if name}
        return self._checked(fields, line, start)

    def _jsonl_rows(self) -> Iterator[ManifestRow | RowError]:
        lines = self._lines
        line = 0
        for raw in lines:
            problems = lines.take_problems()
            text = raw.strip().lstrip("\ufeff")
            if not text and not problems:
                continue
            line += 1
            if problems:
                yield self._error(line, lines.lineno, problems[0][1], None)
                continue
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                yield self._error(line, lines.lineno, f"is not valid JSON: {exc}", None)
                continue
            if not isinstance(obj, dict):
                message = f"must be a JSON object, got {json_kind(obj)}"
                yield self._error(line, lines.lineno, message, None)
                continue
            yield self._checked(obj, line, lines.lineno)

    def _checked(
        self, fields: Mapping[str, Any], line: int, physical: int
    ) -> ManifestRow | RowError:
        try:
            return validate_row(fields, line=line, physical=physical, base=self._base,
                                typo_of=self._typo_of)
        except RowProblem as exc:
            return self._error(line, physical, exc.message, exc.field)


def open_manifest(path: Path) -> Manifest:
    """Open a manifest for streaming; raise ManifestError if it cannot be used.

    Accepts ``.csv`` (with a header row naming at least one known column),
    ``.jsonl`` and ``.ndjson``. The error is one line naming the file.
    """
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(
            f"{path}: unknown manifest type {path.suffix or '(no extension)'!r};"
            " expected .csv, .jsonl or .ndjson"
        )
    try:
        raw = open(path, "rb")  # noqa: SIM115 - the Manifest owns and closes it
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
    lines = _Lines(text)
    try:
        header = _read_header(path, lines) if fmt == "csv" else []
    except OSError as exc:
        text.close()
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    except ManifestError:
        text.close()
        raise
    return Manifest(path, fmt, text, lines, header)


def _read_header(path: Path, lines: _Lines) -> list[str]:
    """The first non-blank CSV record, checked; leaves ``lines`` after it."""
    reader = csv.reader(lines, strict=True)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            raise ManifestError(f"{path}: no header row (the file is empty)") from None
        except csv.Error as exc:
            raise ManifestError(f"{path}: the header row is not valid CSV: {exc}") from exc
        problems = lines.take_problems()
        if problems:
            at, what = problems[0]
            raise ManifestError(f"{path}: the header row (file line {at}) {what}")
        if any(cell.strip() for cell in cells):
            break
    header = [cell.strip() for cell in cells]
    named = [name for name in header if name]
    duplicates = sorted({name for name in named if named.count(name) > 1})
    if duplicates:
        raise ManifestError(f"{path}: the header names column {duplicates[0]!r} twice")
    if not any(name in KNOWN_COLUMNS for name in header):
        saw = ", ".join(repr(name) for name in named[:5])
        hints = [f"{name!r} -> {s!r}" for name in named if (s := suggest_column(name))]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ManifestError(
            f"{path}: the header row names no known column{hint}; saw {saw}; "
            "the first row must name columns such as apiProjectId or file"
        )
    return header
