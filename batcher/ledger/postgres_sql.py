"""What the PostgreSQL ledger needs around its SQL: URLs, statements, migrations.

* **URLs**: :class:`PgUrl` splits a ``postgresql://`` URL into what asyncpg
  gets and what may be shown. The password (in the authority or a
  ``password=`` parameter) never appears in ``shown`` nor in a message that
  went through :meth:`PgUrl.scrub`. A ``schema=NAME`` parameter (ours, not
  libpq's) puts the ledger's tables in that schema, created on first use.
* **Statements**: ``queries.sql`` (shared with SQLite) and
  ``postgres_queries.sql`` are written with ``:named`` parameters;
  :func:`positional` turns them into asyncpg's ``$n``.
* **Migrations**: the ``postgres_NNNN_*.sql`` files, each applied in its own
  transaction with the row recording it, under a transaction-scoped advisory
  lock, so several hosts starting at once apply each step exactly once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from batcher.errors import ConfigError, LedgerError
from batcher.ledger.migrations import (
    APPLIED_SQL,
    BOOTSTRAP_SQL,
    load_migrations,
    load_queries,
    named_statements,
    pending_migrations,
)
from batcher.model import ACTIVE_STAGES

__all__ = [
    "ACTIVE_SQL",
    "MIGRATION_LOCK",
    "PgUrl",
    "PostgresPlumbing",
    "Query",
    "applied_versions",
    "load_pg_queries",
    "migrate_postgres",
    "positional",
]

T = TypeVar("T")

# pg_advisory_xact_lock key for migrations: any fixed 64-bit number; this is
# crc32("batcher.ledger.migrate"). Database-wide, so ledgers in two schemas
# of one database migrate one after the other, which costs nothing.
MIGRATION_LOCK = 0xC907_2C21

# ACTIVE_STAGES as the lease statements and the partial index spell them.
ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STAGES))

_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_SCHEMA = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_SCHEMES = ("postgresql", "postgres")


# -- URLs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgUrl:
    """A PostgreSQL URL: ``dsn`` for asyncpg, ``shown`` for people."""

    dsn: str
    shown: str
    schema: str | None = None
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        return f"PgUrl({self.shown!r})"

    @classmethod
    def parse(cls, url: str) -> PgUrl:
        """Split ``url``; ConfigError (without the password) when it is not one."""
        secrets = _secrets_of(url)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError as exc:
            raise ConfigError(
                f"not a PostgreSQL URL: {_scrub(redact_url(url), secrets)}: "
                f"{_scrub(str(exc), secrets)}"
            ) from None
        if parts.scheme not in _SCHEMES:
            raise ConfigError(f"not a PostgreSQL URL: {redact_url(url)}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = None
        kept = []
        for key, value in query:
            if key == "schema":
                schema = value
            else:
                kept.append((key, value))
        if schema is not None and not _SCHEMA.fullmatch(schema):
            raise ConfigError(f"schema must be a plain identifier (letters, digits, _): {schema!r}")
        dsn = urlunsplit(parts._replace(query=urlencode(kept)))
        return cls(dsn=dsn, shown=redact_url(url), schema=schema, secrets=secrets)

    def scrub(self, text: str) -> str:
        """``text`` with every form of the password replaced by ``***``."""
        return _scrub(text, self.secrets)


def redact_url(url: str) -> str:
    """``url`` with the password (authority or query parameter) as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = [
        (k, "***" if k in _SECRET_PARAMS else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def _secrets_of(url: str) -> tuple[str, ...]:
    found: set[str] = set()
    m = re.search(r"//([^/@?#]*)@", url)
    if m and ":" in m.group(1):
        found.add(m.group(1).split(":", 1)[1])
    for part in re.split(r"[?&]", url.split("?", 1)[1] if "?" in url else ""):
        key, _, value = part.partition("=")
        if key in _SECRET_PARAMS:
            found.add(value)
    forms = {form for s in found for form in (s, unquote(s))}
    # Longest first, so a password containing another form is scrubbed whole.
    return tuple(sorted((s for s in forms if s), key=len, reverse=True))


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# -- statements ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A statement with ``$n`` parameters and the names they stand for."""

    text: str
    names: tuple[str, ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``params`` (every name must be there)."""
        return [params[name] for name in self.names]


def positional(sql: str) -> Query:
    """Rewrite ``:name`` parameters as ``$n`` (one number per distinct name)."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return Query(_PARAM.sub(number, sql), tuple(names))


@cache
def load_pg_queries() -> dict[str, str]:
    """``queries.sql`` and ``postgres_queries.sql``, the latter winning on a name."""
    own = named_statements("postgres_queries.sql")
    return {**load_queries(), **{k: v.replace("{active}", ACTIVE_SQL) for k, v in own.items()}}


# -- migrations ------------------------------------------------------------------

_RECORD = "INSERT INTO ledger_migrations (version, name, applied_at) VALUES ($1, $2, $3)"
_TABLES = (
    "SELECT to_regclass('ledger_migrations') IS NOT NULL, to_regclass('ledger_rows') IS NOT NULL"
)


async def applied_versions(conn: asyncpg.Connection[Any]) -> list[int] | None:
    """The versions recorded, or None when this schema holds no ledger.

    Raises LedgerError when ``ledger_rows`` exists without the migrations
    table: some other application's table of that name, left alone.
    """
    has_migrations, has_rows = await conn.fetchrow(_TABLES) or (False, False)
    if not has_migrations:
        if has_rows:
            raise LedgerError("the database has a ledger_rows table but is not a batcher ledger")
        return None
    return [int(r[0]) for r in await conn.fetch(APPLIED_SQL)]


async def migrate_postgres(
    conn: asyncpg.Connection[Any], wall: Callable[[], float], schema: str | None
) -> list[int]:
    """Bring the ledger in ``conn``'s search_path up to date; the versions applied now.

    Each step takes the advisory lock inside its transaction and re-reads the
    applied versions under it, so of several processes migrating at once one
    applies a step and the others find it done.
    """
    done = await applied_versions(conn)
    if done is not None and not pending_migrations("postgres", done):
        return []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        if schema is not None:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(BOOTSTRAP_SQL)
    applied_now: list[int] = []
    for mig in load_migrations("postgres"):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            done = [int(r[0]) for r in await conn.fetch(APPLIED_SQL)]
            if mig not in pending_migrations("postgres", done):
                continue
            try:
                await conn.execute(mig.sql)
            except asyncpg.PostgresError as exc:
                raise LedgerError(f"migration {mig.version} ({mig.name}) failed: {exc}") from exc
            await conn.execute(_RECORD, mig.version, mig.name, wall())
        applied_now.append(mig.version)
    return applied_now


class PostgresPlumbing:
    """What the PostgreSQL ledger's mixins call on the ledger.

    :class:`~batcher.ledger.postgres.PostgresLedger` defines each of these;
    the mixins (``postgres_reads``, ``postgres_parts``, ``postgres_leases``,
    ``postgres_webhooks``) inherit the declarations, so each is typed once.
    """

    _q: dict[str, Query]
    _wall: Callable[[], float]
    _page_size: int

    def _pool_for(self, *, write: bool) -> asyncpg.Pool[asyncpg.Record]:
        raise NotImplementedError

    def _translate(self, doing: str) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    async def _exec(self, name: str, params: Mapping[str, Any], doing: str) -> str:
        raise NotImplementedError

    async def _retrying(self, doing: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _run_id(self) -> str:
        raise NotImplementedError
