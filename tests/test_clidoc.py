"""The committed command-line reference cannot drift from ``--help``.

``docs/reference/cli.md`` is generated from the argument parser (itself built
from the option definitions). These tests fail, naming the command that
regenerates the page, when an option is added, renamed or reworded without
regenerating it.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

import pytest

from batcher import clidoc
from batcher.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / clidoc.REFERENCE

# An option as --help prints it: "-o", "--output", "--max-spend".
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _stale(why: str) -> str:
    return f"{why}\ndocs/reference/cli.md is stale; regenerate it: {clidoc.REGENERATE}"


def _sections(text: str) -> dict[str, str]:
    """``{"batcher run": text of its section, …}`` from the page's ``## `` headings."""
    found: dict[str, str] = {}
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        found[title.strip()] = body
    return found


def test_committed_reference_is_what_the_generator_writes_now() -> None:
    committed = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    generated = clidoc.render()
    if committed != generated:
        diff = "\n".join(list(difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated",
            lineterm="", n=1))[:40])
        pytest.fail(_stale(diff), pytrace=False)


@pytest.mark.parametrize("command", ["batcher", "batcher run", "batcher status",
                                     "batcher export", "batcher simulate"])
def test_every_option_in_help_is_in_its_section(command: str) -> None:
    parser = clidoc.commands()[command]
    help_text = parser.format_help()
    section = _sections(PAGE.read_text(encoding="utf-8")).get(command)
    assert section is not None, _stale(f"no '## {command}' section")
    # Each option as --help shows it, in the option column of a table row.
    in_page = set(re.findall(r"^\| (`[^|]*?`(?:, `[^|]*?`)*) \|", section, flags=re.MULTILINE))
    in_page_options = {m for cell in in_page for m in _OPTION.findall(cell)}
    # --help's invocation column: "  -o OUTPUT, --output OUTPUT   file [stdout]".
    invocations = re.findall(r"^  (-\S.*?)(?:  |$)", help_text, flags=re.MULTILINE)
    in_help = {o for part in invocations for o in _OPTION.findall(part)}
    assert "-h" in in_help and "--help" in in_help  # the help layout is understood
    missing = sorted(in_help - in_page_options)
    assert not missing, _stale(f"{command} --help has {missing}, the page does not")
    # And the other way: nothing in the page that --help does not have.
    extra = sorted(in_page_options - in_help)
    assert not extra, _stale(f"the page lists {extra} for {command}; --help does not")


def test_every_option_has_a_meaning_and_run_options_name_their_variable() -> None:
    sections = _sections(clidoc.render())
    for command, parser in clidoc.commands().items():
        for action in parser._actions:
            if not action.option_strings:
                continue
            row = next(line for line in sections[command].splitlines()
                       if f"`{action.option_strings[-1]}" in line)
            meaning = row.split(" | ")[1]
            assert meaning.strip(), f"{command} {action.option_strings}: no help text"
    run = sections["batcher run"]
    for variable in re.findall(r"\(env (BATCHER_[A-Z_]+)\)",
                               clidoc.commands()["batcher run"].format_help()):
        assert f"`{variable}`" in run


def test_markdown_special_characters_are_escaped() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--path", metavar="P",
                        help="a <dir> | *not* emphasis [default: <stem>.out] (env TOOL_PATH)")
    page = clidoc.render(parser)
    row = next(line for line in page.splitlines() if line.startswith("| `--path P`"))
    assert "&lt;dir&gt; \\| \\*not\\* emphasis" in row
    assert "`<stem>.out`" in row and "`TOOL_PATH`, `path`" in row


def test_check_mode_names_the_command_when_stale(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "cli.md"
    page.write_text(clidoc.render(), encoding="utf-8")
    assert clidoc.main(["--check", str(page)]) == 0
    page.write_text(clidoc.render().replace("--max-spend", "--spend-cap"), encoding="utf-8")
    assert clidoc.main(["--check", str(page)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and clidoc.REGENERATE in err and "--spend-cap" in err
    assert clidoc.main(["--check", str(tmp_path / "missing.md")]) == 1
    assert clidoc.REGENERATE in capsys.readouterr().err


def test_output_mode_writes_what_stdout_gets(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert clidoc.main([]) == 0
    printed = capsys.readouterr().out
    assert clidoc.main(["-o", str(tmp_path / "ref" / "cli.md")]) == 0
    assert (tmp_path / "ref" / "cli.md").read_text(encoding="utf-8") == printed
    assert printed == clidoc.render(build_parser())
