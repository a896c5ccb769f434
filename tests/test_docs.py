"""The docs stand alone and stay true to the code they describe.

Every test the docs name exists; every page is in the site's navigation;
every link from the README resolves; the README stays a short front door whose
commands are the ones CI runs; and nothing in the docs, examples, benchmarks
or tests points outside the repository.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"

# "tests/test_faults.py::test_crash_campaign_sigkill_20_times_pays_each_request_once"
_TEST_REF = re.compile(r"tests/(test_\w+\.py)::(\w+)")


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@cache
def _test_names(file: str) -> frozenset[str]:
    tree = ast.parse((REPO / "tests" / file).read_text(encoding="utf-8"))
    return frozenset(node.name for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))


def test_every_test_the_docs_name_exists() -> None:
    refs = [(page, *ref) for page in [README, *_pages()]
            for ref in _TEST_REF.findall(page.read_text(encoding="utf-8"))]
    assert len(refs) > 50  # the guarantees page names its tests
    missing = [f"{page.relative_to(REPO)}: tests/{file}::{name}" for page, file, name in refs
               if not (REPO / "tests" / file).exists() or name not in _test_names(file)]
    assert not missing, ("the docs name tests that do not exist (renamed or moved? update "
                         "the page):\n" + "\n".join(missing))


def test_every_page_is_in_the_navigation_and_every_entry_exists() -> None:
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    in_nav = set(re.findall(r":\s*(\S+\.md)\s*$", config, flags=re.MULTILINE))
    pages = {str(page.relative_to(DOCS)) for page in _pages()}
    assert pages - in_nav == set(), "pages missing from mkdocs.yml's nav"
    assert in_nav - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_is_a_front_door_with_the_ci_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "keep the README short: move detail to docs/"
    first_block = re.search(r"```(?:sh|console)\n(.*?)```", text, flags=re.DOTALL)
    assert first_block is not None and "batcher run" in first_block.group(1)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("python -m pytest -q", "ruff check batcher tests bench jobs",
                    "mkdocs build --strict"):
        assert command in ci, f".ci/run no longer runs {command!r}: update the docs too"
    assert "python -m pytest -q" in text


# What a reader of the repository cannot follow: files of the machine it was
# written on, and trackers or design notes that are not part of it.
_OUTSIDE = re.compile(
    r"\.\./shared|/work/|\b(?:CONTRACT|DIFFIO-API|DESIGN|STYLE)\.md\b"
    r"|(?i:\bissues? #?\d+|\binvariants? \d+)"
)
_CHECKED = ("README.md", "mkdocs.yml", "docs", "jobs", "bench", "tests", "batcher", ".ci",
            "pyproject.toml")
_TEXT = {".md", ".py", ".toml", ".yml", ".csv", ".txt", ".sql"}


def _checked_files() -> list[Path]:
    files: list[Path] = []
    for name in _CHECKED:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in _TEXT
                      and "__pycache__" not in p.parts]
    # This file spells the patterns out to look for them.
    return [f for f in files if f != Path(__file__).resolve()]


@pytest.mark.parametrize("path", _checked_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_points_outside_the_repository(path: Path) -> None:
    found = [f"line {n}: {line.strip()}"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if _OUTSIDE.search(line)]
    assert not found, (f"{path.relative_to(REPO)} points outside the repository; say it in "
                       "our own words:\n" + "\n".join(found))
