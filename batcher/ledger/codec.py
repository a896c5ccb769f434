"""Rows as the ledger's tables store them, and back.

Every backend stores the same column values: JSON objects as text, the error
object with copies of its code and message (so a summary can group failures
without a dialect's JSON operators), booleans as the database's booleans.
SQLite and PostgreSQL write these values and decode what they read with
:func:`row_from_record`; the in-memory ledger builds its rows through the same
two steps, so it holds exactly what a database would give back.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson

from batcher.errors import LedgerError
from batcher.model import (
    UPDATE_COLUMNS,
    Event,
    Kind,
    LedgerRow,
    NewRow,
    Stage,
    Update,
    UploadPart,
    UploadSession,
)

__all__ = [
    "COMPUTED",
    "DELTAS",
    "REQUEST_FIELDS",
    "SET_COLUMNS",
    "STAGES",
    "Record",
    "dumps_object",
    "error_columns",
    "event_from_columns",
    "inserted_record",
    "json_copy",
    "moved",
    "new_row_values",
    "part_from_record",
    "part_values",
    "row_from_record",
    "transition_values",
    "update_fields",
]

STAGES: dict[str, Stage] = {s.value: s for s in Stage}
_KINDS: dict[str, Kind] = {k.value: k for k in Kind}

# The Update keys that add to a counter instead of setting a column.
DELTAS = frozenset({"attempts_delta", "polls_delta"})
# The columns a transition may set: the Update's, with error's two copies.
SET_COLUMNS: frozenset[str] = (UPDATE_COLUMNS - {"group"}) | {
    "group_key", "error_code", "error_message"}
# What the database computes in a transition, in the order a transition that
# was given the caller's row reads them back (see :func:`moved`).
COMPUTED: tuple[str, ...] = ("updated_at", "attempts", "polls", "version")

# What a manifest row says about its request, as LedgerRow fields: an import
# sets them on a new row, and on a row that failed validation and is valid now.
REQUEST_FIELDS: tuple[str, ...] = (
    "kind", "idempotency_key", "model_key", "api_project_id", "sampling", "params",
    "source_path", "source_sha256", "source_size", "output_rel", "explicit_key",
    "request_digest", "group", "leader_row_id",
)  # fmt: skip


def dumps_object(value: Mapping[str, Any] | None, what: str) -> str | None:
    """``value`` as the JSON text a column stores; LedgerError if it is not a JSON object."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise LedgerError(f"{what} must be a JSON object")
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        raise LedgerError(f"{what} is not JSON-serializable: {exc}") from exc


def json_copy(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    """What reading ``value`` back from a JSON column gives (tuples become lists)."""
    text = dumps_object(value, what)
    return None if text is None else dict(orjson.loads(text))


def error_columns(error: Mapping[str, Any] | None, what: str = "error") -> dict[str, Any]:
    """The error column and its code/message copies."""
    if error is None:
        return {"error": None, "error_code": None, "error_message": None}
    code, message = error.get("code"), error.get("message")
    return {
        "error": dumps_object(error, what),
        "error_code": None if code is None else str(code),
        "error_message": None if message is None else str(message),
    }


def new_row_values(new: NewRow) -> dict[str, Any]:
    """The columns an import writes for ``new`` (``leader_row_id`` still to decide)."""
    values: dict[str, Any] = {
        "row_id": new.row_id,
        "line": new.line,
        "kind": Kind(new.kind).value,
        "idempotency_key": new.idempotency_key,
        "model_key": new.model_key,
        "api_project_id": new.api_project_id,
        "sampling": dumps_object(new.sampling, "sampling"),
        "params": dumps_object(new.params, "params"),
        "source_path": new.source_path,
        "source_sha256": new.source_sha256,
        "source_size": new.source_size,
        "output_rel": new.output_rel,
        "explicit_key": bool(new.explicit_key),
        "request_digest": new.request_digest,
        "group_key": new.group,
        "leader_row_id": None,
    }
    values.update(error_columns(new.error))
    return values


def inserted_record(
    values: Mapping[str, Any], stage: Stage, leader_row_id: str | None, now: float
) -> dict[str, Any]:
    """The whole record a database holds right after inserting ``values``.

    The columns the insert does not name take their defaults, as in the
    ``ledger_rows`` table of the migrations.
    """
    return {
        "generation_id": None, "api_status": None, "output_path": None,
        "output_sha256": None, "output_size": None, "upload_url": None,
        "upload_method": None, "upload_expires_at": None, "content_type": None,
        "upload_session": None, "upload_id": None, "queue_position": None,
        "attempts": 0, "polls": 0, "retry_count": 0, "base_key": None, "retired": False,
        "version": 0,
        **values,
        "stage": stage.value, "leader_row_id": leader_row_id,
        "created_at": now, "updated_at": now,
    }  # fmt: skip


class Record(Protocol):
    """A database record: its columns by name (a dict, an ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def row_from_record(r: Record) -> LedgerRow:
    """Decode one ``ledger_rows`` record (a mapping of column names)."""
    error = r["error"]
    return LedgerRow(
        row_id=r["row_id"],
        line=r["line"],
        kind=_KINDS[r["kind"]],
        stage=STAGES[r["stage"]],
        idempotency_key=r["idempotency_key"],
        model_key=r["model_key"],
        api_project_id=r["api_project_id"],
        generation_id=r["generation_id"],
        api_status=r["api_status"],
        sampling=orjson.loads(r["sampling"]),
        params=orjson.loads(r["params"]),
        source_path=r["source_path"],
        source_sha256=r["source_sha256"],
        source_size=r["source_size"],
        output_rel=r["output_rel"],
        output_path=r["output_path"],
        output_sha256=r["output_sha256"],
        output_size=r["output_size"],
        upload_url=r["upload_url"],
        upload_method=r["upload_method"],
        upload_expires_at=r["upload_expires_at"],
        content_type=r["content_type"],
        upload_session=_session_from_column(r["upload_session"]),
        upload_id=r["upload_id"],
        queue_position=r["queue_position"],
        error=orjson.loads(error) if error is not None else None,
        attempts=r["attempts"],
        polls=r["polls"],
        retry_count=r["retry_count"],
        base_key=r["base_key"],
        explicit_key=bool(r["explicit_key"]),
        request_digest=r["request_digest"],
        group=r["group_key"],
        leader_row_id=r["leader_row_id"],
        retired=bool(r["retired"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        version=r["version"],
    )


def transition_values(row_id: str, to: Stage, update: Update) -> dict[str, Any]:
    """The named parameters of a transition statement for ``update``.

    The caller has checked the update's keys (see :func:`batcher.ledger.rules.check_move`).
    """
    fields: dict[str, Any] = dict(update)
    values: dict[str, Any] = {
        "row_id": row_id,
        "to_stage": to.value,
        "attempts_delta": int(fields.pop("attempts_delta", 0)),
        "polls_delta": int(fields.pop("polls_delta", 0)),
    }
    if "error" in fields:
        values.update(error_columns(fields.pop("error")))
    if "upload_session" in fields:
        values["upload_session"] = _session_column(fields.pop("upload_session"))
    for name in _JSON_FIELDS & fields.keys():
        values[name] = dumps_object(fields.pop(name), name) or "{}"
    if "group" in fields:
        values["group_key"] = fields.pop("group")
    if "kind" in fields:
        values["kind"] = Kind(fields.pop("kind")).value
    if "explicit_key" in fields:
        values["explicit_key"] = bool(fields.pop("explicit_key"))
    values.update(fields)
    return values


# Update fields stored as JSON text.
_JSON_FIELDS = frozenset({"sampling", "params"})


def _session_column(session: UploadSession | None) -> str | None:
    """The upload_session column: the session as a JSON object, or NULL."""
    if session is None:
        return None
    if not isinstance(session, UploadSession):
        raise LedgerError("upload_session must be an UploadSession")
    return orjson.dumps(session.to_json()).decode()


def _session_from_column(text: str | None) -> UploadSession | None:
    return None if text is None else UploadSession.from_json(orjson.loads(text))


def event_from_columns(row_id: str, at: float, from_stage: str | None, to_stage: str,
                       event: str, detail: str, run_id: str) -> Event:
    """An event of a row's history from its stored columns, in the events query's order."""
    return Event(row_id=row_id, at=at,
                 from_stage=STAGES[from_stage] if from_stage else None,
                 to_stage=STAGES[to_stage], event=event, detail=orjson.loads(detail),
                 run_id=run_id)


def part_values(row_id: str, upload_id: str, part: UploadPart, now: float) -> dict[str, Any]:
    """The named parameters of the ``record_part`` statement."""
    return {"row_id": row_id, "upload_id": upload_id, "part_number": part.number,
            "etag": part.etag, "size": part.size, "sha256": part.sha256, "now": now}


def part_from_record(r: Record) -> UploadPart:
    """Decode one ``ledger_upload_parts`` record."""
    return UploadPart(number=r["part_number"], etag=r["etag"], size=r["size"],
                      sha256=r["sha256"])


def update_fields(update: Update, error_json: str | None) -> dict[str, Any]:
    """The update's columns as :class:`LedgerRow` fields, as they are read back.

    ``error_json`` is the error column as written: decoding it gives the
    stored value (a JSON copy), not the caller's mapping.
    """
    fields: dict[str, Any] = {k: v for k, v in update.items() if k not in DELTAS}
    if "error" in fields:
        fields["error"] = orjson.loads(error_json) if error_json is not None else None
    for name in _JSON_FIELDS & fields.keys():
        fields[name] = orjson.loads(dumps_object(fields[name], name) or "{}")
    if "kind" in fields:
        fields["kind"] = Kind(fields["kind"])
    if "explicit_key" in fields:
        fields["explicit_key"] = bool(fields["explicit_key"])
    return fields


# LedgerRow's fields in __init__ order. `moved` rebuilds a row positionally:
# dataclasses.replace costs 5.7 us for this 36-field class (it checks every
# field by name), this 3.0 us; on SQLite the row is built on the writer
# thread, which holds the GIL that every other caller waits for.
_ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LedgerRow))
_ROW_VALUES = operator.attrgetter(*_ROW_FIELDS)
_ROW_INDEX: dict[str, int] = {name: i for i, name in enumerate(_ROW_FIELDS)}
_STAGE = _ROW_INDEX["stage"]
_COMPUTED_INDEX: tuple[int, ...] = tuple(_ROW_INDEX[name] for name in COMPUTED)


def moved(
    current: LedgerRow, to: Stage, fields: Mapping[str, Any], computed: Sequence[Any]
) -> LedgerRow:
    """``current`` after a transition to ``to`` that set ``fields``.

    ``computed`` holds the values of :data:`COMPUTED`, in that order, as the
    database returned them. The same row as ``dataclasses.replace(current,
    stage=to, **fields, **computed)``.
    """
    values = list(_ROW_VALUES(current))
    for name, value in fields.items():
        values[_ROW_INDEX[name]] = value
    values[_STAGE] = to
    for index, value in zip(_COMPUTED_INDEX, computed, strict=True):
        values[index] = value
    return LedgerRow(*values)
