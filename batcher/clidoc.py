"""The command-line reference, generated from the argument parser.

``batcher.cli.build_parser()`` is built from the option definitions, so a
page written from it says exactly what ``--help`` says::

    python -m batcher.clidoc -o docs/reference/cli.md   # regenerate
    python -m batcher.clidoc --check                     # exit 1 if stale

The page is made of tables read from the parser's actions, not of the
``--help`` text itself, whose layout changes with the terminal width and the
Python version. argparse has no public way to list a parser's actions; the
``_actions``/``_action_groups`` attributes read here have been stable since
argparse began and are what every help-to-docs tool reads.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from batcher.cli import build_parser

__all__ = ["REFERENCE", "REGENERATE", "commands", "main", "render"]

REFERENCE = Path("docs/reference/cli.md")
"""Where the generated page lives, relative to the repository's root."""

REGENERATE = f"python -m batcher.clidoc -o {REFERENCE}"
"""The command that rewrites the page; failures name it."""

_ENV = re.compile(r"\s*\(env ([A-Z][A-Z0-9_]*)\)\s*$")
_DEFAULT = re.compile(r"\s*\[(?:default: )?([^\[\]]+)\]\s*$")


def commands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """``{"batcher": top, "batcher run": run, …}``: every parser, in help order."""
    top = parser or build_parser()
    found = {top.prog: top}
    _add_commands(top.prog, top, found)
    return found


def _add_commands(prefix: str, parser: argparse.ArgumentParser,
                  found: dict[str, argparse.ArgumentParser]) -> None:
    """Every subcommand of ``parser``, and theirs (``batcher webhooks serve``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix} {name}"] = sub
                _add_commands(f"{prefix} {name}", sub, found)


def _summaries(prefix: str, parser: argparse.ArgumentParser, into: dict[str, str]) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                into[f"{prefix} {choice.dest}"] = choice.help or ""
            for name, sub in action.choices.items():
                _summaries(f"{prefix} {name}", sub, into)


def _escape(text: str) -> str:
    """Plain text safe in a Markdown table cell (no HTML, no emphasis, no pipes)."""
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;"),
                          (">", "&gt;")):
        text = text.replace(char, escaped)
    return text


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _expanded_help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` prints it (``%(default)s`` and ``%%`` expanded)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return " ".join((action.help % params).split())


def _value(action: argparse.Action) -> str:
    """What follows the option on the command line (``FILE``, ``{jsonl,csv}``)."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper()


def _split_help(action: argparse.Action, prog: str) -> tuple[str, str, str]:
    """``(meaning, default, environment variable)`` read from one action."""
    text = _expanded_help(action, prog)
    env = ""
    found = _ENV.search(text)
    if found:
        env, text = found.group(1), text[: found.start()]
    default = ""
    found = _DEFAULT.search(text)
    if found:
        default, text = found.group(1), text[: found.start()]
    elif action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        default = str(action.default)
    if not text and action.choices is not None:
        text = "one of " + ", ".join(str(c) for c in action.choices)
    return text.strip(), default.strip(), env


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    words = [name]
    has_options = False
    for action in parser._actions:
        if action.option_strings:
            has_options = True
        elif isinstance(action, argparse._SubParsersAction):
            words.append("COMMAND")
        else:
            words.append(_value(action) if action.metavar else action.dest.upper())
    if has_options:
        words.insert(len(name.split()), "[options]")
    return " ".join(words)


def _positionals(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        meaning, _default, _env = _split_help(action, prog)
        name = action.metavar if action.metavar else action.dest.upper()
        rows.append(f"| {_code(str(name))} | {_escape(meaning)} |")
    if not rows:
        return []
    return ["| argument | meaning |", "|---|---|", *rows, ""]


def _options(actions: Sequence[argparse.Action], prog: str) -> list[str]:
    rows = []
    with_env = False
    for action in actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        meaning, default, env = _split_help(action, prog)
        value = _value(action)
        flags = [_code(s) for s in action.option_strings[:-1]]
        flags.append(_code(f"{action.option_strings[-1]} {value}".strip()))
        env_cell = ""
        if env:
            with_env = True
            env_cell = f"{_code(env)}, {_code(action.dest)}"
        rows.append((", ".join(flags), _escape(meaning),
                     _code(default) if default else "", env_cell))
    if not rows:
        return []
    if with_env:
        head = ["| option | meaning | default | environment, job-file key |", "|---|---|---|---|"]
        body = [f"| {o} | {m} | {d} | {e} |" for o, m, d, e in rows]
    else:
        head = ["| option | meaning | default |", "|---|---|---|"]
        body = [f"| {o} | {m} | {d} |" for o, m, d, _ in rows]
    return [*head, *body, ""]


def _section(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"## {name}", ""]
    text = " ".join((parser.description or summary).split()) if summary else ""
    if text:
        lines += [_escape(text[:1].upper() + text[1:]), ""]
    lines += ["```", _synopsis(name, parser), "```", ""]
    lines += _positionals(parser, name)
    for group in parser._action_groups:
        rows = _options(group._group_actions, name)
        if not rows:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            lines += [f"### {name}: {group.title}", ""]
        lines += rows
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference page, as Markdown."""
    top = parser or build_parser()
    parsers = commands(top)
    summaries: dict[str, str] = {}
    _summaries(top.prog, top, summaries)
    lines = [
        f"<!-- Generated by `python -m batcher.clidoc` from the option definitions: do not "
        f"edit by hand. Regenerate with: {REGENERATE} -->",
        "",
        "# Command line",
        "",
        _escape(" ".join((top.description or "").split())),
        "",
        "Every option of `batcher run` with an environment variable can also be set by "
        "that variable or by the job-file key named beside it; a flag beats the "
        "environment, which beats the job file, which beats the default. An empty "
        "environment value counts as unset.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name in list(parsers)[1:]:
        anchor = name.replace(" ", "-")
        lines.append(f"| [`{name}`](#{anchor}) | {_escape(summaries.get(name, ''))} |")
    lines.append("")
    for name, sub in parsers.items():
        lines += _section(name, sub, summaries.get(name, ""))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m batcher.clidoc [-o FILE | --check [FILE]]``."""
    ap = argparse.ArgumentParser(prog="python -m batcher.clidoc",
                                 description="Write the command-line reference (Markdown).")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("-o", "--output", type=Path, help="write it to FILE [stdout]")
    mode.add_argument("--check", nargs="?", type=Path, const=REFERENCE, metavar="FILE",
                      help=f"exit 1 if FILE differs from what would be written [{REFERENCE}]")
    args = ap.parse_args(argv)
    text = render()
    if args.check is not None:
        try:
            committed = args.check.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"{args.check}: {exc.strerror or exc}; regenerate it: {REGENERATE}",
                  file=sys.stderr)
            return 1
        if committed == text:
            return 0
        diff = difflib.unified_diff(committed.splitlines(), text.splitlines(),
                                    str(args.check), "generated", lineterm="", n=1)
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        print(f"{args.check} is out of date with the option definitions; regenerate it: "
              f"{REGENERATE}", file=sys.stderr)
        return 1
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
