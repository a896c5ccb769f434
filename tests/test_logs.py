"""Log events: stable names from one module, data in fields, a sentence for people."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import batcher
from batcher.ops import logs
from batcher.ops.logs import ROW_FAILED, event

NAME = re.compile(r"^[a-z]+\.[a-z]+(?:_[a-z]+)*$")
SOURCE = Path(batcher.__file__).parent


def test_event_names_are_constants_of_one_style() -> None:
    constants = {value for name, value in vars(logs).items()
                 if name.isupper() and isinstance(value, str)}
    assert constants == logs.EVENTS
    for name in logs.EVENTS:
        assert NAME.match(name), name


def test_the_docs_list_every_event() -> None:
    page = (SOURCE.parent / "docs" / "guide" / "watching.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_.]+)` \|", page, re.MULTILINE))
    assert listed == logs.EVENTS


def _log_calls() -> Iterator[tuple[str, str]]:
    """(file, call text) of every log call in batcher's own modules."""
    for path in SOURCE.rglob("*.py"):
        rel = path.relative_to(SOURCE).as_posix()
        text = path.read_text()
        for found in re.finditer(r"\blog\.(?:debug|info|warning|error|exception)\(", text):
            depth, end = 0, found.end() - 1
            for end in range(found.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            yield rel, text[found.start():end + 1]


def test_every_log_call_names_its_event_with_a_constant() -> None:
    calls = list(_log_calls())
    assert len(calls) > 15
    for rel, call in calls:
        named = re.search(r"extra=(?:log_)?event\(([A-Z_]+)", call)
        assert named, f"{rel}: a log call without extra=event(CONSTANT, ...): {call}"
        assert getattr(logs, named.group(1)) in logs.EVENTS, (rel, call)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    root = logging.getLogger("batcher")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = True
    root.setLevel(logging.NOTSET)


def _configure(stream: io.StringIO, *, json: bool) -> None:
    logs.configure(level=logging.INFO, json=json, secret="k-secret")
    (handler,) = logging.getLogger("batcher").handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)


def test_json_records_carry_the_event_the_sentence_and_the_fields(stream: io.StringIO) -> None:
    _configure(stream, json=True)
    logging.getLogger("batcher.run.context").warning(
        "row %s failed: %s", "r-1", "key k-secret refused",
        extra=event(ROW_FAILED, row="r-1", code="notFound"))
    record = json.loads(stream.getvalue())
    assert record["event"] == "row.failed"
    assert record["message"] == "row r-1 failed: key *** refused"
    assert (record["row"], record["code"], record["level"]) == ("r-1", "notFound", "warning")
    assert record["logger"] == "batcher.run.context"


def test_plain_lines_are_the_sentence_then_the_event_and_fields(stream: io.StringIO) -> None:
    _configure(stream, json=False)
    logging.getLogger("batcher.run.context").warning(
        "row %s failed: %s", "r-1", "gone", extra=event(ROW_FAILED, row="r-1", code="notFound"))
    assert stream.getvalue() == (
        "batcher: warning: row r-1 failed: gone [row.failed row=r-1 code=notFound]\n")
