"""Restored files: where they go, and how they appear there.

Where: an output path is relative to ``--out`` and never leaves it
(:func:`resolve_output`, checked again at write time); a file row that names
none gets ``<source name>.restored<ext>`` (:func:`default_output_for`).

How: an output appears under its final name only when complete — written to
a temporary file beside it, fsynced, renamed, and the rename made durable
(:func:`fetch_to_file`, :func:`copy_to_file`, :func:`write_bytes_atomically`).
A local OS error on the way becomes a
:class:`~batcher.errors.LocalFileError` here, so the row fails with a code,
and the temporary file is removed.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
from collections.abc import Awaitable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, TypeVar

import anyio

from .errors import LocalFileError, OutputPathError
from .keys import sha256_file
from .model import LedgerRow
from .ops.logs import OUTPUT_CLEANUP_FAILED, event

if TYPE_CHECKING:
    from .storage import Storage

__all__ = [
    "copy_to_file",
    "default_output_for",
    "default_output_rel",
    "extension_for",
    "fetch_to_file",
    "output_intact",
    "resolve_output",
    "row_tag",
    "temp_path",
    "write_bytes_atomically",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHUNK = 1 << 20

# mimetypes maps audio/mpeg to ".mp2" on some systems; the API's audio is MP3.
_PREFERRED = {"audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/wav": ".wav",
              "audio/x-wav": ".wav", "audio/flac": ".flac", "audio/ogg": ".ogg",
              "audio/mp4": ".m4a", "application/json": ".json"}


def extension_for(mime_type: str | None) -> str:
    """The file extension for a returned mimeType ('.bin' when unknown)."""
    if not mime_type:
        return ".bin"
    base = mime_type.split(";", 1)[0].strip().lower()
    return _PREFERRED.get(base) or mimetypes.guess_extension(base) or ".bin"


# Where the default outputs of sources outside the manifest's folder go.
OUTSIDE_FOLDER = "_outside"


def default_output_rel(file_rel: str, mime_type: str | None, tag: str = "") -> str:
    """``sub/take.wav`` -> ``sub/take.wav.restored.mp3``: a pure function of the path.

    The whole file name is kept, so ``take.wav`` and ``take.flac`` beside it
    get two outputs; as it depends on nothing but the source's path, a
    row's default output is the same on every run and in any row order. A
    source outside the manifest's folder (``../x.wav``, absolute) goes to
    ``_outside/<folder name>-<8 hex digits>/``, the digits a hash of its
    folder as written, so ``/rec/day1/take1.wav`` and ``/rec/day2/take1.wav``
    stay apart and the default never points outside ``--out``. ``tag``
    (see :func:`row_tag`) goes between the name and ``.restored``.
    """
    rel = PurePosixPath(file_rel.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        parent = str(rel.parent)
        digest = hashlib.sha256(parent.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in rel.parent.name)
        folder = f"{name.strip('.') or 'root'}-{digest}"
        rel = PurePosixPath(OUTSIDE_FOLDER, folder, rel.name)
    return str(rel.with_name(f"{rel.name}{tag}.restored{extension_for(mime_type)}"))


_DERIVED_ID = re.compile(r"r-[0-9a-f]{20}(~[0-9]+)?")
_TAG_MAX = 64


def row_tag(row_id: str) -> str:
    """What tells apart the default outputs of rows that name one file.

    A derived row id follows the file's path and request, so only a repeat
    of the same row (``~2``) needs its suffix; an explicit ``id`` is kept,
    made safe for a file name (``.job-1``), so rows that name one file under
    ids of their own get outputs of their own.
    """
    derived = _DERIVED_ID.fullmatch(row_id)
    if derived:
        return derived.group(1) or ""
    safe = "".join(c if c.isalnum() or c in "-_~" else "_" for c in row_id)[:_TAG_MAX]
    if len(row_id) > _TAG_MAX or safe != row_id:
        # Made safe or cut: add a hash, so two ids never end up as one tag.
        safe = f"{safe}-{hashlib.sha256(row_id.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return f".{safe}"


def resolve_output(out: Path, rel: str) -> Path:
    """The absolute path for ``rel`` under ``out``; raise if it would escape.

    Rejects absolute paths, drive letters, ``..`` that climbs out, and
    symlinked folders that lead outside ``out`` (checked on the real path of
    the deepest existing parent, so a link planted later is caught at write
    time by calling this again).
    """
    if not rel or not rel.strip():
        raise OutputPathError("output path is empty")
    if "\x00" in rel:
        raise OutputPathError(f"output path {rel!r} contains a NUL byte")
    posix = PurePosixPath(rel.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(rel).drive:
        raise OutputPathError(f"output path {rel!r} is absolute; it must be relative to --out")
    root = out.resolve()
    target = (root / Path(*posix.parts)).absolute()
    normal = Path(os.path.normpath(target))
    if normal != root and root not in normal.parents:
        raise OutputPathError(f"output path {rel!r} leaves the output folder {root}")
    if normal == root:
        raise OutputPathError(f"output path {rel!r} names the output folder itself")
    # A symlink anywhere on the way may point elsewhere: check the real path.
    real = normal.resolve()
    if real != root and root not in real.parents:
        raise OutputPathError(
            f"output path {rel!r} leads outside the output folder {root} through a symlink"
        )
    return normal


def default_output_for(row: LedgerRow, manifest_dir: Path, mime_type: str | None) -> str:
    """The output path, relative to ``--out``, of a file row that names none."""
    assert row.source_path is not None
    rel = os.path.relpath(row.source_path, manifest_dir).replace(os.sep, "/")
    return default_output_rel(rel, mime_type, row_tag(row.row_id))


def temp_path(final: Path, row_id: str) -> Path:
    """The temporary path, beside ``final``, that an output is written to first."""
    safe = "".join(c if c.isalnum() or c in "-_~" else "_" for c in row_id)
    return final.with_name(f".{final.name}.{safe}.part")


async def fetch_to_file(storage: Storage, url: str, final: Path, row_id: str
                        ) -> tuple[str, int]:
    """Download a signed URL to ``final``; return its ``(sha256 hex, size)``.

    The body goes to a temporary file beside ``final``, which is flushed,
    fsynced and renamed into place. On any failure the temporary file is
    removed and ``final`` is untouched. Transfer failures are the client's
    ``ApiError``s; local ones are ``LocalFileError``s (``outputUnwritable``
    while writing, ``outputWriteFailed`` for the folder or the rename).
    """
    await _local(anyio.Path(final.parent).mkdir(parents=True, exist_ok=True), final,
                 code="outputWriteFailed")
    tmp = temp_path(final, row_id)
    digest = hashlib.sha256()
    size = 0
    try:
        async with await _local(anyio.open_file(tmp, "wb"), tmp) as out:

            async def write(chunk: bytes) -> None:
                nonlocal size
                digest.update(chunk)
                size += len(chunk)
                await _local(out.write(chunk), tmp)

            await storage.download(url=url, write=write)
            await _local(out.flush(), tmp)
            await _local(anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno()), tmp)
        await _local(anyio.to_thread.run_sync(_publish, tmp, final), final,
                     code="outputWriteFailed")
    except BaseException:
        await _remove(tmp)
        raise
    return digest.hexdigest(), size


async def copy_to_file(src: Path, final: Path, row_id: str) -> None:
    """Publish a copy of ``src`` at ``final`` (through a temporary file beside it)."""
    tmp = temp_path(final, row_id)
    try:
        await _local(anyio.to_thread.run_sync(_copy_publish, src, tmp, final), final,
                     code="outputWriteFailed")
    except BaseException:
        await _remove(tmp)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _publish(tmp, path)


async def output_intact(row: LedgerRow) -> bool:
    """True when the row's recorded output is on disk with its recorded hash."""
    path = row.output_path
    if not path or row.output_sha256 is None:
        return False
    try:
        sha, size = await anyio.to_thread.run_sync(sha256_file, Path(path))
    except OSError:
        return False
    return sha == row.output_sha256 and (row.output_size is None or size == row.output_size)


def _publish(tmp: Path, final: Path) -> None:
    """Rename into place and make the rename durable (fsync the folder)."""
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_publish(src: Path, tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, tmp.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    _publish(tmp, final)


async def _local(awaitable: Awaitable[T], path: Path, *, code: str = "outputUnwritable"
                 ) -> T:
    """Await a local file operation; its OSError becomes a LocalFileError with ``code``."""
    try:
        return await awaitable
    except OSError as exc:
        # A write that fails says why in a word; a folder or rename, in full.
        reason = exc.strerror or exc if code == "outputUnwritable" else exc
        raise LocalFileError(f"cannot write {path}: {reason}", code=code) from exc


async def _remove(path: Path) -> None:
    """Delete a temporary file, even while being cancelled."""
    try:
        with anyio.CancelScope(shield=True):
            await anyio.Path(path).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove the temporary file %s: %s", path, exc,
                    extra=event(OUTPUT_CLEANUP_FAILED, path=str(path), error=str(exc)))
