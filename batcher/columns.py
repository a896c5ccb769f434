"""The manifest's columns, and what a valid row is.

:func:`validate_row` turns one record's fields (column -> value, from a CSV
record or a JSONL object) into a :class:`ManifestRow`, or raises
:class:`RowProblem` saying why not and which field is at fault; the reader
(:mod:`batcher.manifest`) adds the file and line. It reads nothing but a
``file`` row's file status.

Decisions about values:

* Values are trimmed; a blank value (or JSON ``null``) is an absent column.
  ``sampling``/``params`` cells of ``null`` mean ``{}``, as in the API.
* Unknown columns (or JSONL keys): one that looks like a misspelt known column
  (``apiProjectID``, ``fiel``, ``seeds``…) fails every row that has a value in
  it, naming the column it resembles: silently dropping it would pay for a
  request other than the one meant. Any other unknown column (``notes``) is
  ignored. A row with neither ``apiProjectId`` nor ``file`` lists the columns
  it has values in.
* JSONL values may be strings where CSV has text: ``seed`` may be a number or
  a string holding one, ``sampling``/``params`` an object or a string holding
  one; ``id`` may be a string or an integer; the other columns must be strings.
* ``output`` on an ``apiProjectId`` row is an error: nothing is downloaded for
  such rows, so the user's expectation could not be met.
* ``model`` must look like a model key (letters, digits, ``.``, ``_``, ``-``):
  it becomes part of the request URL.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from batcher.keys import canonical_json
from batcher.model import Kind

__all__ = [
    "KNOWN_COLUMNS",
    "ManifestRow",
    "RowProblem",
    "json_kind",
    "suggest_column",
    "validate_row",
]

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
_MAX_KEY = 255
_MODEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
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


def suggest_column(name: str) -> str | None:
    """The known column ``name`` looks like a misspelling of, if any."""
    folded = re.sub(r"[^a-z0-9]", "", name.lower())
    if not folded:
        return None
    import difflib  # a misspelt column is rare; every run would pay the import

    match = difflib.get_close_matches(folded, _FOLDED, n=1, cutoff=_TYPO_CUTOFF)
    return _FOLDED[match[0]] if match else None


def _absent(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def json_kind(value: object) -> str:
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
        return json_kind(value)
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return repr(text if len(text) <= 40 else text[:37] + "...")


class RowProblem(Exception):
    """Why one row is not valid; the reader makes it a RowError naming file and line."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def validate_row(
    fields: Mapping[str, Any],
    *,
    line: int,
    physical: int,
    base: Path,
    typo_of: Callable[[str], str | None],
) -> ManifestRow:
    """One record's fields (column -> value) as a valid row; :class:`RowProblem` if not.

    ``line`` and ``physical`` are the row's number and the file line it starts
    on; ``base`` is the folder ``file`` paths are relative to; ``typo_of``
    names the known column an unknown one misspells, or None.
    """
    present = {name: value for name, value in fields.items() if not _absent(value)}
    project = present.get("apiProjectId")
    file = present.get("file")
    typos = [(name, typo) for name in present if (typo := typo_of(name))]
    if project is not None and file is not None:
        raise RowProblem("has both apiProjectId and file; give exactly one")
    if project is None and file is None:
        raise RowProblem(_no_source(present, typos, typo_of))
    if typos:
        name, suggestion = typos[0]
        raise RowProblem(
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
            raise RowProblem(f"{name} cannot be used: {exc}", name) from exc

    key = None
    if "idempotencyKey" in present:
        key = _text(present["idempotencyKey"], "idempotencyKey")
        # The API may count UTF-16 units (JavaScript): take the larger count.
        units = len(key.encode("utf-16-le")) // 2
        if units > _MAX_KEY:
            raise RowProblem(
                f"idempotencyKey is {units} characters after trimming;"
                f" the API accepts 1-{_MAX_KEY}",
                "idempotencyKey",
            )
    model = None
    if "model" in present:
        model = _text(present["model"], "model")
        if not _MODEL_KEY.match(model):
            raise RowProblem(
                f"model must be a model key such as diffio-3.5, got {_shown(model)}", "model"
            )
    output = _text(present["output"], "output") if "output" in present else None

    path: Path | None = None
    file_rel: str | None = None
    if project is not None:
        if output is not None:
            raise RowProblem("output applies only to file rows; remove it or use file", "output")
        kind, api_project_id = Kind.API_PROJECT, _text(project, "apiProjectId")
    else:
        kind, api_project_id = Kind.FILE, None
        file_rel = PurePosixPath(_text(file, "file")).as_posix()
        path = base / file_rel
        _check_regular_file(path)
    return ManifestRow(
        line=line,
        physical_line=physical,
        kind=kind,
        api_project_id=api_project_id,
        file=path,
        file_rel=file_rel,
        id=row_id,
        sampling=sampling,
        params=params,
        idempotency_key=key,
        model=model,
        output=output,
    )


def _no_source(present: Mapping[str, Any], typos: Sequence[tuple[str, str]],
               typo_of: Callable[[str], str | None]) -> str:
    message = "has neither apiProjectId nor file"
    if present:
        names = list(present)
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        message += f" (values in: {', '.join(names[:10])}{more})"
    for name, suggestion in typos:
        message += f"; unknown column {name!r}: did you mean {suggestion!r}?"
    ignored = [n for n in present if n not in KNOWN_COLUMNS and not typo_of(n)]
    if ignored:
        message += f"; unknown columns are ignored: {', '.join(ignored)}"
    return message


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{field} must be a string, got {json_kind(value)}", field)
    return value.strip()


def _seed(value: Any) -> int | float:
    number = value
    if isinstance(value, str):
        try:
            number = orjson.loads(value.strip())
        except orjson.JSONDecodeError:
            raise RowProblem(f"seed must be a number, got {_shown(value)}", "seed") from None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise RowProblem(f"seed must be a number, got {_shown(value)}", "seed")
    if isinstance(number, float):
        if not math.isfinite(number):
            raise RowProblem(f"seed must be a finite number, got {_shown(value)}", "seed")
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
            raise RowProblem(f"{field} is not valid JSON: {exc}", field) from None
        if value is None:
            return {}
    if not isinstance(value, dict):
        raise RowProblem(f"{field} must be a JSON object, got {json_kind(value)}", field)
    return dict(value)


def _check_regular_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise RowProblem(f"file not found: {path}", "file") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RowProblem(f"cannot read file {path}: {reason}", "file") from None
    if not stat.S_ISREG(mode):
        raise RowProblem(f"not a regular file: {path}", "file")
