"""Reading and validating manifests (CONTRACT.md, "Manifest rows").

A manifest is CSV with a header row, or JSON Lines. :func:`open_manifest`
checks what must hold for the file as a whole (readable, known extension, a
header naming at least one known column) and raises :class:`ManifestError`
otherwise. The :class:`Manifest` it returns streams rows one at a time (the
file is never loaded whole) and yields, per row, either a valid
:class:`ManifestRow` or a :class:`RowError` naming the field at fault. It never
raises on bad content, whatever bytes the file holds; only an I/O failure in
the middle of the file raises ManifestError.

Decisions where CONTRACT.md is silent:

* ``line`` counts data rows: 1 is the first non-empty record after the CSV
  header, or the first non-empty JSONL line. Empty lines (and CSV records whose
  cells are all blank) are not rows and are not counted, so adding or removing
  blank lines does not renumber rows. Every RowError message also gives the
  physical ``file line`` where the record starts, for an editor.
* Values are trimmed; a blank value (or JSON ``null``) is an absent column.
  ``sampling``/``params`` cells of ``null`` mean ``{}``, as in the API.
* Unknown columns (or JSONL keys): one that looks like a misspelt known column
  (``apiProjectID``, ``fiel``, ``seeds``…) fails every row that has a value in
  it, naming the column it resembles: silently dropping it would pay for a
  request other than the one meant. Any other unknown column (``notes``) is
  ignored and listed in :attr:`Manifest.ignored_columns`. A row with neither
  ``apiProjectId`` nor ``file`` lists the columns it has values in.
* JSONL values may be strings where CSV has text: ``seed`` may be a number or
  a string holding one, ``sampling``/``params`` an object or a string holding
  one; ``id`` may be a string or an integer; the other columns must be strings.
* ``output`` on an ``apiProjectId`` row is an error: nothing is downloaded for
  such rows, so the user's expectation could not be met.
* ``model`` must look like a model key (letters, digits, ``.``, ``_``, ``-``):
  it becomes part of the request URL.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import os
import re
import stat
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Literal

import orjson

from batcher.errors import ManifestError, RowError
from batcher.keys import canonical_json
from batcher.model import Kind

__all__ = ["KNOWN_COLUMNS", "Manifest", "ManifestRow", "open_manifest"]

KNOWN_COLUMNS: tuple[str, ...] = (
    "apiProjectId",
    "file",
    "id",
    "seed",
    "prompt",
    "sampling",
    "params",
    "idempotencyKey",
    "model",
    "output",
)
_FORMATS: Mapping[str, Literal["csv", "jsonl"]] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}

# A physical line longer than this is not read into memory: it is skipped and
# its row fails. The csv module also refuses cells over 128 KiB.
_MAX_LINE = 1 << 20
_MAX_KEY = 255
_MAX_IGNORED = 20
_MAX_UNKNOWN = 1000
_MODEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# Bytes that are not UTF-8 arrive as lone surrogates (errors="surrogateescape"),
# so a bad byte spoils only the line it is on.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_TYPO_CUTOFF = 0.75
_FOLDED = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in KNOWN_COLUMNS}


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One valid manifest row, ready for key derivation and planning.

    ``file`` is absolute (resolved against the manifest's folder) and was a
    regular file when read; ``file_rel`` is the path as written, in POSIX
    form, and is the row's source identity. ``sampling`` and ``params`` hold
    the JSON objects with the ``seed`` and ``prompt`` columns merged on top.
    ``model`` is None when the row does not override ``--model``; ``output``
    is checked against ``--out`` by the runner, not here.
    """

    line: int
    physical_line: int
    kind: Kind
    api_project_id: str | None
    file: Path | None
    file_rel: str | None
    id: str | None
    sampling: dict[str, Any]
    params: dict[str, Any]
    idempotency_key: str | None
    model: str | None
    output: str | None

    @property
    def source_identity(self) -> str:
        """The apiProjectId, or the file path as written (for derive_row_id)."""
        if self.kind is Kind.API_PROJECT:
            assert self.api_project_id is not None
            return self.api_project_id
        assert self.file_rel is not None
        return self.file_rel


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


def _suggest(name: str) -> str | None:
    """The known column ``name`` looks like a misspelling of, if any."""
    folded = re.sub(r"[^a-z0-9]", "", name.lower())
    if not folded:
        return None
    match = difflib.get_close_matches(folded, _FOLDED, n=1, cutoff=_TYPO_CUTOFF)
    return _FOLDED[match[0]] if match else None


def _absent(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _shown(value: object) -> str:
    """A short rendering of a bad value for a message."""
    if isinstance(value, list | dict):
        return _json_kind(value)
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return repr(text if len(text) <= 40 else text[:37] + "...")


class _Invalid(Exception):
    """Internal: one row's validation failure, turned into a RowError."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


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
        suggestion = _suggest(name)
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
                message = f"must be a JSON object, got {_json_kind(obj)}"
                yield self._error(line, lines.lineno, message, None)
                continue
            yield self._checked(obj, line, lines.lineno)

    def _checked(
        self, fields: Mapping[str, Any], line: int, physical: int
    ) -> ManifestRow | RowError:
        try:
            return self._validate(fields, line, physical)
        except _Invalid as exc:
            return self._error(line, physical, exc.message, exc.field)

    def _validate(self, fields: Mapping[str, Any], line: int, physical: int) -> ManifestRow:
        present = {name: value for name, value in fields.items() if not _absent(value)}
        project = present.get("apiProjectId")
        file = present.get("file")
        typos = [(name, typo) for name in present if (typo := self._typo_of(name))]
        if project is not None and file is not None:
            raise _Invalid("has both apiProjectId and file; give exactly one")
        if project is None and file is None:
            raise _Invalid(self._no_source(present, typos))
        if typos:
            name, suggestion = typos[0]
            raise _Invalid(
                f"unknown column {name!r} (did you mean {suggestion!r}?):"
                " rename it or leave it empty",
                name,
            )

        row_id = present.get("id")
        if row_id is not None:
            if isinstance(row_id, int) and not isinstance(row_id, bool):
                row_id = str(row_id)
            row_id = _text(row_id, "id")
        sampling = _object(present.get("sampling"), "sampling")
        if "seed" in present:
            sampling["seed"] = _seed(present["seed"])
        params = _object(present.get("params"), "params")
        if "prompt" in present:
            params["prompt"] = _text(present["prompt"], "prompt")
        for name, value in (("sampling", sampling), ("params", params)):
            try:
                canonical_json(value)
            except (ValueError, TypeError) as exc:
                raise _Invalid(f"{name} cannot be used: {exc}", name) from exc

        key = None
        if "idempotencyKey" in present:
            key = _text(present["idempotencyKey"], "idempotencyKey")
            # The API may count UTF-16 units (JavaScript): take the larger count.
            units = len(key.encode("utf-16-le")) // 2
            if units > _MAX_KEY:
                raise _Invalid(
                    f"idempotencyKey is {units} characters after trimming;"
                    f" the API accepts 1-{_MAX_KEY}",
                    "idempotencyKey",
                )
        model = None
        if "model" in present:
            model = _text(present["model"], "model")
            if not _MODEL_KEY.match(model):
                raise _Invalid(
                    f"model must be a model key such as diffio-3.5, got {_shown(model)}", "model"
                )
        output = _text(present["output"], "output") if "output" in present else None

        if project is not None:
            if output is not None:
                raise _Invalid("output applies only to file rows; remove it or use file", "output")
            return ManifestRow(
                line=line,
                physical_line=physical,
                kind=Kind.API_PROJECT,
                api_project_id=_text(project, "apiProjectId"),
                file=None,
                file_rel=None,
                id=row_id,
                sampling=sampling,
                params=params,
                idempotency_key=key,
                model=model,
                output=None,
            )
        file_rel = PurePosixPath(_text(file, "file")).as_posix()
        path = self._base / file_rel
        _check_regular_file(path)
        return ManifestRow(
            line=line,
            physical_line=physical,
            kind=Kind.FILE,
            api_project_id=None,
            file=path,
            file_rel=file_rel,
            id=row_id,
            sampling=sampling,
            params=params,
            idempotency_key=key,
            model=model,
            output=output,
        )

    def _no_source(self, present: Mapping[str, Any], typos: Sequence[tuple[str, str]]) -> str:
        message = "has neither apiProjectId nor file"
        if present:
            names = list(present)
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            message += f" (values in: {', '.join(names[:10])}{more})"
        for name, suggestion in typos:
            message += f"; unknown column {name!r}: did you mean {suggestion!r}?"
        ignored = [n for n in present if n not in KNOWN_COLUMNS and not self._typo_of(n)]
        if ignored:
            message += f"; unknown columns are ignored: {', '.join(ignored)}"
        return message


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be a string, got {_json_kind(value)}", field)
    return value.strip()


def _seed(value: Any) -> int | float:
    number = value
    if isinstance(value, str):
        try:
            number = orjson.loads(value.strip())
        except orjson.JSONDecodeError:
            raise _Invalid(f"seed must be a number, got {_shown(value)}", "seed") from None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise _Invalid(f"seed must be a number, got {_shown(value)}", "seed")
    if isinstance(number, float):
        if not math.isfinite(number):
            raise _Invalid(f"seed must be a finite number, got {_shown(value)}", "seed")
        # 7.0 is the seed 7: send it as the integer it is.
        if number.is_integer() and abs(number) < 2**63:
            return int(number)
    return number


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise _Invalid(f"{field} is not valid JSON: {exc}", field) from None
        if value is None:
            return {}
    if not isinstance(value, dict):
        raise _Invalid(f"{field} must be a JSON object, got {_json_kind(value)}", field)
    return dict(value)


def _check_regular_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise _Invalid(f"file not found: {path}", "file") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _Invalid(f"cannot read file {path}: {reason}", "file") from None
    if not stat.S_ISREG(mode):
        raise _Invalid(f"not a regular file: {path}", "file")


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
        hints = [f"{name!r} -> {s!r}" for name in named if (s := _suggest(name))]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ManifestError(
            f"{path}: the header row names no known column{hint}; saw {saw}; "
            "the first row must name columns such as apiProjectId or file"
        )
    return header
