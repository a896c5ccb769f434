"""Intake: manifest rows become ledger rows (validated, keyed, identified), in batches.

The manifest is read on a worker thread in batches, so a huge CSV neither
blocks the event loop nor sits in memory: the runner pulls one batch at a
time, as its bounded streams make room (back-pressure from the workers).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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
from .outputs import default_stem_of, request_tag, resolve_output
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


class _LineMap64:
    """64-bit hashes to line numbers (below 2**32) in two arrays: 24–48 bytes per member.

    Open addressing with linear probing, at most half full; 0 marks an empty
    slot, so the hash 0 is stored as 1. A dict of ints would spend ~100 bytes
    per member, and every file row of a manifest has a default output.
    """

    __slots__ = ("_hashes", "_lines", "_mask", "_n")

    def __init__(self, size: int = 1024) -> None:
        self._hashes = array("Q", [0]) * size
        self._lines = array("I", [0]) * size
        self._mask = size - 1
        self._n = 0

    def _slot(self, h: int) -> int:
        """The slot holding ``h``, or the empty one where it would go (linear probing)."""
        i = h & self._mask
        while (cur := self._hashes[i]) and cur != h:
            i = (i + 1) & self._mask
        return i

    def setdefault(self, h: int, line: int) -> int:
        """The line stored for ``h``, storing ``line`` first if there was none."""
        h = h or 1
        i = self._slot(h)
        if self._hashes[i]:
            return self._lines[i]
        if 2 * (self._n + 1) > len(self._hashes):
            self._grow()
            return self.setdefault(h, line)
        self._hashes[i], self._lines[i] = h, line
        self._n += 1
        return line

    def get(self, h: int) -> int | None:
        """The line stored for ``h``, if any."""
        i = self._slot(h or 1)
        return self._lines[i] if self._hashes[i] else None

    def _grow(self) -> None:
        old = zip(self._hashes, self._lines, strict=True)
        size = 2 * len(self._hashes)
        self._hashes, self._lines = array("Q", [0]) * size, array("I", [0]) * size
        self._mask, self._n = size - 1, 0
        for h, line in old:
            if h:
                self.setdefault(h, line)


def _hash64(text: str) -> int:
    data = os.path.normcase(text).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class OutputClaims:
    """Outputs given out so far in one manifest: two rows never share one.

    Explicit paths compare as they resolve under ``--out`` (``a/../x.mp3``
    is ``x.mp3``). A default output's extension is known only when its audio
    comes back, so defaults compare by their stem (``take.wav.restored``,
    :func:`batcher.outputs.default_output_stem`): an explicit output that is
    a default name with any extension claims that default. Explicit outputs
    are kept as text; defaults, one per file row, as 64-bit hashes (a
    collision, about 1 in 4·10^7 for 10^6 rows, would fail a row that needs
    an ``output`` of its own: it never lets two rows share one).
    """

    __slots__ = ("_defaults", "_lines", "_stems")

    def __init__(self) -> None:
        self._lines: dict[str, int] = {}
        self._stems: dict[str, int] = {}  # stems of explicit outputs named like a default
        self._defaults = _LineMap64()

    def claim(self, resolved: str, line: int, rel: str | None = None) -> int | None:
        """Give the explicit output ``resolved`` to the row at ``line``.

        ``rel`` is the output relative to ``--out``, POSIX form: if it is
        named like a default output, it also claims that default. Returns
        the line of the row that has it already, if any.
        """
        path = os.path.normcase(resolved)
        first = self._lines.get(path)
        if first is not None and first != line:
            return first
        stem = _default_like(rel) if rel is not None else None
        if stem is not None:
            first = self._defaults.get(_hash64(stem))
            if first is not None and first != line:
                return first
            # Kept apart from the defaults: ``x.restored.mp3`` and ``x.restored.wav``
            # are two explicit outputs, but both are the name of a default.
            self._stems.setdefault(os.path.normcase(stem), line)
        # Claimed only once the row may have it: a failed row holds nothing.
        self._lines.setdefault(path, line)
        return None

    def claim_default(self, stem: str, line: int) -> int | None:
        """Give the default output ``stem`` to the row at ``line``; the line that has it, if any."""
        first = self._stems.get(os.path.normcase(stem))
        if first is not None and first != line:
            return first
        first = self._defaults.setdefault(_hash64(stem), line)
        return None if first == line else first


def _default_like(rel: str) -> str | None:
    """``x/take.wav.restored`` for ``x/take.wav.restored.mp3``; None for other names."""
    suffix = PurePosixPath(rel).suffix
    stem = rel[: -len(suffix)] if suffix else rel
    return stem if suffix and stem.endswith(".restored") else None


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
        rel = os.path.relpath(resolved, ctx.out.resolve()).replace(os.sep, "/")
        first = outputs.claim(str(resolved), row.line, rel) if outputs is not None else None
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
    if row.kind == "file" and row.output is None and outputs is not None:
        _claim_default(row, ctx, row_id, outputs, model, sampling, params)
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


def _claim_default(row: ManifestRow, ctx: Intake, row_id: str, outputs: OutputClaims,
                   model: str, sampling: dict[str, Any], params: dict[str, Any]) -> None:
    """Claim the row's default output; raise RowError if an earlier row has it."""
    request = request_tag(model=model, plain_model=ctx.model, sampling=sampling, params=params,
                          explicit_key=row.idempotency_key)
    stem = default_stem_of(str(row.file), ctx.manifest.parent, row_id, request)
    first = outputs.claim_default(stem, row.line)
    if first is not None:
        raise RowError(
            f"its default output {stem + '.<ext>'!r} is already the output of row {first}; "
            "two rows never share an output: give this row an output (or an id)",
            path=str(ctx.manifest), line=row.line, field="output")


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
