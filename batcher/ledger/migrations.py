"""Numbered schema migrations and named queries, read from ``ledger/sql/``.

Migrations are files named ``<dialect>_<NNNN>_<name>.sql`` (``sqlite_0001_initial.sql``).
Each one is applied in its own transaction together with the row that records
it in the ledger's ``ledger_migrations`` table, so a crash leaves the ledger at
one version or the next, never in between (the sqlite-utils way). A ledger
whose recorded version is newer than any file here was written by a newer
batcher and is refused rather than guessed at.

Numbers are handed out ahead of time to changes developed side by side, so
the numbers present may have a gap (1, 2, 3, 5) until the missing change
lands; a ledger records each version it applied, and a migration missing
from it is applied when it appears, even below the ledger's highest version.
Every migration therefore adds to the schema without depending on another
one it does not name.

Queries live in ``queries.sql`` as ``-- name: <name>`` blocks with ``:named``
parameters, shared by every backend (PostgreSQL rewrites the parameters).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from batcher.errors import LedgerError

__all__ = [
    "APPLIED_SQL",
    "BOOTSTRAP_SQL",
    "RECORD_SQL",
    "Migration",
    "load_migrations",
    "load_queries",
    "migrate_sqlite",
    "named_statements",
    "pending_migrations",
    "split_statements",
]

# Created before any migration runs; the one table every version agrees on.
BOOTSTRAP_SQL = """
CREATE TABLE IF NOT EXISTS ledger_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)
"""

APPLIED_SQL = "SELECT version FROM ledger_migrations ORDER BY version"
RECORD_SQL = "INSERT INTO ledger_migrations (version, name, applied_at) VALUES (:v, :n, :at)"

_FILE = re.compile(r"^(?P<dialect>[a-z]+)_(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_NAME = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step for one SQL dialect."""

    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file's statements, one per item, without the trailing semicolons."""
        return split_statements(self.sql)


def _sql_files() -> Iterable[tuple[str, str]]:
    root = resources.files("batcher.ledger").joinpath("sql")
    for entry in root.iterdir():
        if entry.name.endswith(".sql"):
            yield entry.name, entry.read_text(encoding="utf-8")


@cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """Every migration for ``dialect``, in version order.

    Versions are unique and start at 1 (the initial schema); later numbers
    may have gaps (see the module docstring).
    """
    found = []
    for name, text in _sql_files():
        m = _FILE.match(name)
        if m and m["dialect"] == dialect:
            found.append(Migration(int(m["version"]), m["name"], text))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions) or (versions and versions[0] != 1):
        raise LedgerError(f"{dialect} migrations must have unique numbers from 1: {versions}")
    return tuple(found)


def named_statements(file_name: str) -> dict[str, str]:
    """The ``-- name:`` blocks of ``sql/<file_name>``, without their semicolons."""
    text = resources.files("batcher.ledger").joinpath("sql", file_name).read_text("utf-8")
    marks = list(_NAME.finditer(text))
    queries: dict[str, str] = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        queries[mark["name"]] = text[mark.end() : end].strip().rstrip(";").strip()
    return queries


@cache
def load_queries() -> dict[str, str]:
    """The named statements of ``queries.sql``."""
    return named_statements("queries.sql")


def split_statements(sql: str) -> list[str]:
    """Split a script into statements.

    ``sqlite3.complete_statement`` knows SQL's quoting and comments, so a
    semicolon inside a string or a comment does not split. (PostgreSQL's
    dollar-quoted bodies are not handled; our migrations have none.)
    """
    statements: list[str] = []
    current = ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            stmt = current.strip().rstrip(";").strip()
            if _has_code(stmt):
                statements.append(stmt)
            current = ""
    if _has_code(current):
        raise LedgerError(f"unterminated SQL statement: {current.strip()[:80]!r}")
    return statements


def _has_code(text: str) -> bool:
    return any(ln.strip() and not ln.strip().startswith("--") for ln in text.splitlines())


def pending_migrations(dialect: str, applied: Iterable[int]) -> list[Migration]:
    """Migrations not yet applied; refuses a ledger from a newer batcher.

    A ledger that records a version this batcher has no file for was written
    by a newer one: refused rather than guessed at.
    """
    known = load_migrations(dialect)
    done = set(applied)
    unknown = done - {mig.version for mig in known}
    if unknown:
        latest = known[-1].version if known else 0
        raise LedgerError(
            f"ledger schema version {max(unknown)} is newer than this batcher knows "
            f"({latest}); upgrade batcher"
        )
    return [mig for mig in known if mig.version not in done]


def migrate_sqlite(conn: sqlite3.Connection, wall: Callable[[], float]) -> list[int]:
    """Bring a SQLite ledger up to date; return the versions applied now.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Every
    pending migration runs in one ``BEGIN IMMEDIATE`` transaction, which
    re-reads the applied versions inside it, so two processes racing here
    apply each step once; a step that fails rolls back them all (SQLite's
    schema changes are transactional). One transaction, one sync to disk: a
    new ledger is ready a few milliseconds sooner than with one per step.
    """
    conn.execute(BOOTSTRAP_SQL)
    applied_now: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    mig: Migration | None = None
    try:
        done = [r[0] for r in conn.execute(APPLIED_SQL)]
        for mig in pending_migrations("sqlite", done):
            for stmt in mig.statements():
                conn.execute(stmt)
            conn.execute(RECORD_SQL, {"v": mig.version, "n": mig.name, "at": wall()})
            applied_now.append(mig.version)
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            which = f"migration {mig.version} ({mig.name})" if mig else "reading the migrations"
            raise LedgerError(f"{which} failed: {exc}") from exc
        raise
    return applied_now
