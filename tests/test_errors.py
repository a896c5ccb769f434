"""The error tree: drawn in errors.py's docstring, and what each error means for a run."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from batcher import errors
from batcher.answers import GenerationStatus
from batcher.errors import (
    ApiError,
    AuthError,
    BatcherError,
    LocalFileError,
    OutputPathError,
    RequestBug,
    RunHalted,
    SpendLimit,
)


def _drawn_tree() -> dict[str, str]:
    """child class name -> parent class name, read from the docstring's drawing."""
    assert errors.__doc__ is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        found = re.match(r"^[\s│├└─]*([A-Z][A-Za-z]+)\b", line)
        cls = getattr(errors, found.group(1), None) if found else None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        assert found is not None
        depth = found.start(1)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[found.group(1)] = stack[-1][1]
        stack.append((depth, found.group(1)))
    return parents


def test_the_drawing_is_the_class_tree_and_names_every_error() -> None:
    drawn = _drawn_tree()
    classes = {name: getattr(errors, name) for name in errors.__all__
               if isinstance(getattr(errors, name), type)
               and issubclass(getattr(errors, name), BaseException)}
    assert set(drawn) | {"BatcherError"} == set(classes)
    for name, parent in drawn.items():
        assert classes[name].__bases__ == (classes[parent],), name


def test_a_local_file_problem_is_its_own_branch_not_an_api_error() -> None:
    err = LocalFileError("cannot write /x: disk full", code="outputUnwritable")
    assert not isinstance(err, ApiError)
    assert err.to_record() == {"code": "outputUnwritable", "message": "cannot write /x: disk full",
                               "httpStatus": None}
    unsafe = OutputPathError("leaves --out")
    assert isinstance(unsafe, LocalFileError)
    assert unsafe.to_record()["code"] == "unsafeOutputPath"


@pytest.mark.parametrize(
    ("error", "submissions", "run"),
    [
        (AuthError("bad key", status=401), True, True),
        (RequestBug("405", status=405), True, True),
        (SpendLimit("402", status=402), True, False),
        (RunHalted("cap", code="maxSpendReached"), True, False),
        (LocalFileError("gone"), False, False),
        (ApiError("other"), False, False),
    ],
)
def test_halting_is_a_property_of_the_error(error: BatcherError, submissions: bool,
                                            run: bool) -> None:
    assert (error.halts_submissions, error.halts_run) == (submissions, run)


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("queued", GenerationStatus.RUNNING), ("pending", GenerationStatus.RUNNING),
        ("Processing", GenerationStatus.RUNNING), ("running", GenerationStatus.RUNNING),
        ("uploading", GenerationStatus.RUNNING), ("complete", GenerationStatus.COMPLETE),
        ("COMPLETED", GenerationStatus.COMPLETE), ("succeeded", GenerationStatus.COMPLETE),
        ("failed", GenerationStatus.FAILED), ("error", GenerationStatus.FAILED),
        ("cancelled", GenerationStatus.FAILED), ("canceled", GenerationStatus.FAILED),
        ("settling", GenerationStatus.UNKNOWN), ("", GenerationStatus.UNKNOWN),
        (None, GenerationStatus.UNKNOWN),
    ],
)
def test_the_apis_status_words_become_one_enum(word: str | None,
                                               status: GenerationStatus) -> None:
    assert GenerationStatus.of(word) is status


def test_the_reference_page_draws_the_same_tree() -> None:
    assert errors.__doc__ is not None
    drawn = errors.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    page = (Path(errors.__file__).parents[1] / "docs" / "reference" / "errors.md").read_text()
    tree = page.split("```text\n", 1)[1].split("```", 1)[0]
    assert tree == textwrap.dedent(drawn) + "\n"
