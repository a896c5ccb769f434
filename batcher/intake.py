"""Intake: manifest rows become ledger rows (validated, keyed, identified), in batches.

The manifest is read on a worker thread in batches, so a huge CSV neither
blocks the event loop nor sits in memory: the runner pulls one batch at a
time, as its bounded streams make room (back-pressure from the workers).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import OutputPathError, RowError
from .keys import (
    FileSource,
    ProjectSource,
    RowIdAssigner,
    derive_key,
    derive_row_id,
    request_digest,
    request_group,
    sha256_file,
)
from .manifest import ManifestRow, open_manifest
from .model import Kind, NewRow
from .outputs import resolve_output
from .settings import Settings

__all__ = ["Intake", "OutputClaims", "intake_batches", "intake_row", "invalid_row"]


@dataclass(frozen=True, slots=True)
class Intake:
    """What turning a manifest row into a ledger row depends on."""

    manifest: Path
    model: str
    namespace: str
    out: Path

    @classmethod
    def of(cls, settings: Settings) -> Intake:
        """The intake of a run with these settings."""
        return cls(manifest=settings.manifest, model=settings.model,
                   namespace=settings.key_namespace, out=settings.out)


class OutputClaims:
    """Explicit outputs given out so far in one manifest: two rows never share one.

    Paths compare as they resolve under ``--out`` (``a/../x.mp3`` is
    ``x.mp3``). Only explicit outputs are kept (default names are unique by
    construction, see :func:`batcher.outputs.default_output_rel`), so memory
    grows with the rows that name one.
    """

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: dict[str, int] = {}

    def claim(self, resolved: str, line: int) -> int | None:
        """Give ``resolved`` to the row at ``line``; the line that has it already, if any."""
        first = self._lines.setdefault(os.path.normcase(resolved), line)
        return None if first == line else first


def intake_row(row: ManifestRow, ctx: Intake, assigner: RowIdAssigner,
               outputs: OutputClaims | None = None) -> NewRow:
    """A valid manifest row as a NewRow (hashing its file if it has one).

    Raises RowError for problems only visible now (unreadable file, unsafe
    output path, an output another row of the manifest names already).
    """
    model = row.model or ctx.model
    sampling = dict(row.sampling)
    params = dict(row.params)
    source: ProjectSource | FileSource
    sha: str | None = None
    size: int | None = None
    path = str(ctx.manifest)
    if row.kind == "file":
        assert row.file is not None and row.file_rel is not None
        try:
            sha, size = sha256_file(row.file)
        except OSError as exc:
            raise RowError(f"cannot read {row.file}: {exc.strerror or exc}", path=path,
                           line=row.line, field="file") from None
        source = FileSource(sha)
        identity = row.file_rel
    else:
        assert row.api_project_id is not None
        source = ProjectSource(row.api_project_id)
        identity = row.api_project_id
    if row.output is not None:
        if row.kind != "file":
            raise RowError("output is only for file rows", path=path, line=row.line,
                           field="output")
        try:
            resolved = resolve_output(ctx.out, row.output)
        except OutputPathError as exc:
            raise RowError(str(exc), path=path, line=row.line, field="output") from None
        first = outputs.claim(str(resolved), row.line) if outputs is not None else None
        if first is not None:
            raise RowError(
                f"output {row.output!r} is already the output of row {first}; two rows never "
                "share an output: give this row another one", path=path, line=row.line,
                field="output")
    key = row.idempotency_key or derive_key(
        model=model, source=source, sampling=sampling, params=params, namespace=ctx.namespace
    )
    base_id = row.id or derive_row_id(
        model=model, source_identity=identity, sampling=sampling, params=params,
        explicit_key=row.idempotency_key, namespace=ctx.namespace,
    )
    row_id = assigner.assign(base_id)
    source_id = f"project:{row.api_project_id}" if row.kind != "file" else f"sha256:{sha}"
    return NewRow(
        row_id=row_id,
        line=row.line,
        kind=Kind.FILE if row.kind == "file" else Kind.API_PROJECT,
        idempotency_key=key,
        model_key=model,
        api_project_id=row.api_project_id,
        source_path=str(row.file) if row.file is not None else None,
        source_sha256=sha,
        source_size=size,
        sampling=sampling,
        params=params,
        # Only an explicit output is stored; the default name needs the
        # returned mimeType and is made at download time.
        output_rel=row.output,
        explicit_key=row.idempotency_key is not None,
        request_digest=request_digest(model=model, source_id=source_id, sampling=sampling,
                                      params=params),
        # The API's identity of a generation is (key, project); see request_group.
        group=request_group(key, source_id),
    )


def invalid_row(err: RowError, model: str) -> NewRow:
    """A bad row, imported straight as failed with code invalidRow."""
    return NewRow(
        row_id=f"invalid~{err.line}",
        line=err.line,
        kind=Kind.FILE if err.field in ("file", "output") else Kind.API_PROJECT,
        idempotency_key=None,
        model_key=model,
        error={"code": RowError.code, "message": str(err), "httpStatus": None,
               "field": err.field},
    )


def _iterate(ctx: Intake) -> Iterator[NewRow]:
    manifest = open_manifest(ctx.manifest)
    assigner = RowIdAssigner()
    outputs = OutputClaims()
    for item in manifest:
        if isinstance(item, RowError):
            yield invalid_row(item, ctx.model)
            continue
        try:
            yield intake_row(item, ctx, assigner, outputs)
        except RowError as err:
            yield invalid_row(err, item.model or ctx.model)


async def intake_batches(ctx: Intake, batch_size: int = 256,
                         first_size: int = 16) -> AsyncIterator[list[NewRow]]:
    """The manifest's rows as NewRows in manifest order, a batch at a time, read on a thread.

    The first batch is small (``first_size``), so the first request leaves
    as soon as a few rows are committed; later batches double up to
    ``batch_size``. ``open_manifest`` errors (ManifestError) surface from
    the first batch.
    """
    rows = _iterate(ctx)
    size = max(1, min(first_size, batch_size))

    def take() -> list[NewRow]:
        out: list[NewRow] = []
        for new in rows:
            out.append(new)
            if len(out) >= size:
                break
        return out

    while True:
        batch = await anyio.to_thread.run_sync(take)
        if not batch:
            return
        yield batch
        size = min(batch_size, 2 * size)
