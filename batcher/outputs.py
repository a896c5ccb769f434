"""Restored files: where they go, and how they appear there.

Where: an output path is relative to ``--out`` and never leaves it
(:func:`resolve_output`, checked again at write time); a file row that names
none gets ``<source name>.restored<ext>`` (:func:`default_output_for`), with a
tag before ``.restored`` when other rows could name the same file
(:func:`row_tag`, :func:`request_tag`).

How: an output appears under its final name only when complete — written to
a temporary file beside it, fsynced, renamed, and the rename made durable
(:func:`fetch_to_file`, :func:`copy_to_file`, :func:`write_bytes_atomically`).
The temporary file is created exclusively under an unpredictable name, and
both steps happen in the output's folder held open, reached from ``--out``
without following links (:mod:`batcher.safefs`): nothing is ever written
outside ``--out``, whatever links are planted in it, and when.
A local OS error on the way becomes a
:class:`~batcher.errors.LocalFileError` here, so the row fails with a code,
and the temporary file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mimetypes
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import anyio

from .errors import LocalFileError, OutputPathError
from .keys import canonical_json, normalize_model, sha256_file
from .model import LedgerRow
from .ops.logs import OUTPUT_CLEANUP_FAILED, event
from .safefs import TempFile, open_folder, remove_leftovers

if TYPE_CHECKING:
    from .storage import Storage

__all__ = [
    "copy_to_file",
    "default_output_for",
    "default_output_rel",
    "default_output_stem",
    "default_stem_of",
    "extension_for",
    "fetch_to_file",
    "output_intact",
    "request_tag",
    "resolve_output",
    "row_tag",
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


def default_output_stem(file_rel: str, tag: str = "") -> str:
    """``sub/take.wav`` -> ``sub/take.wav.restored``: the default output but its extension.

    The whole file name is kept, so ``take.wav`` and ``take.flac`` beside it
    get two outputs; as it depends on nothing but the source's path and the
    row's ``tag`` (see :func:`row_tag`, which goes between the name and
    ``.restored``), a row's default output is the same on every run and in
    any row order. A source outside the manifest's folder (``../x.wav``,
    absolute) goes to ``_outside/<folder name>-<8 hex digits>/``, the digits
    a hash of its folder as written, so ``/rec/day1/take1.wav`` and
    ``/rec/day2/take1.wav`` stay apart and the default never points outside
    ``--out``. The extension comes with the restored audio
    (:func:`default_output_rel`); intake compares outputs by this stem.
    """
    rel = PurePosixPath(file_rel.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        parent = str(rel.parent)
        digest = hashlib.sha256(parent.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in rel.parent.name)
        folder = f"{name.strip('.') or 'root'}-{digest}"
        rel = PurePosixPath(OUTSIDE_FOLDER, folder, rel.name)
    return str(rel.with_name(f"{rel.name}{tag}.restored"))


def default_output_rel(file_rel: str, mime_type: str | None, tag: str = "") -> str:
    """``sub/take.wav`` -> ``sub/take.wav.restored.mp3``: a pure function of the path and tag.

    :func:`default_output_stem` and the extension of the returned ``mime_type``.
    """
    return default_output_stem(file_rel, tag) + extension_for(mime_type)


_REQUEST_TAG = "req-"


def request_tag(*, model: str, plain_model: str, sampling: Mapping[str, Any],
                params: Mapping[str, Any], explicit_key: str | None) -> str:
    """What tells apart the default outputs of different requests on one file.

    ``""`` for the plain request (the run's model, no sampling, no params, no
    explicit key), so ordinary rows keep the plain name; else ``req-`` and 8
    hex digits hashed from what differs from it (a model other than the
    run's, sampling, params, explicit key; compared as keys compare them:
    ``7`` is ``7.0``, an alias is its model). Neither the path, the file's
    bytes, the row's position nor ``--key-namespace`` is in it: the name is
    stable across runs and reorderings, and an edited file keeps its output.
    """
    normal = normalize_model(model)
    # The run's model is left out, so a prompt keeps its name under a new
    # --model, as the plain request does (the new restoration replaces the old).
    other_model = None if normal == normalize_model(plain_model) else normal
    if other_model is None and not sampling and not params and explicit_key is None:
        return ""
    payload = {"v": 1, "model": other_model, "sampling": sampling, "params": params,
               "key": explicit_key}
    return _REQUEST_TAG + hashlib.sha256(canonical_json(payload)).hexdigest()[:8]


_DERIVED_ID = re.compile(r"r-[0-9a-f]{20}(~[0-9]+)?")
_TAG_MAX = 64


def row_tag(row_id: str, request: str = "") -> str:
    """What tells apart the default outputs of rows that name one file.

    A row with a derived id gets its ``request`` tag (:func:`request_tag`:
    empty for the plain request), so two requests on one file get two
    outputs, and a repeat of the same row its suffix (``~2``): its own copy.
    An explicit ``id`` is kept, made safe for a file name (``.job-1``), so
    rows that name one file under ids of their own get outputs of their own
    (ids are unique in a manifest, so the request is not needed there).
    """
    derived = _DERIVED_ID.fullmatch(row_id)
    if derived:
        return (f".{request}" if request else "") + (derived.group(1) or "")
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


def default_stem_of(source_path: str, manifest_dir: Path, row_id: str, request: str) -> str:
    """The default output stem (:func:`default_output_stem`) of a row's source and tags."""
    rel = os.path.relpath(source_path, manifest_dir).replace(os.sep, "/")
    return default_output_stem(rel, row_tag(row_id, request))


def default_output_for(row: LedgerRow, manifest_dir: Path, mime_type: str | None, *,
                       plain_model: str) -> str:
    """The output path, relative to ``--out``, of a file row that names none.

    ``plain_model`` is the run's ``--model``: a row asking for it, with no
    sampling, params or explicit key, keeps the plain name.
    """
    assert row.source_path is not None
    key = (row.base_key or row.idempotency_key) if row.explicit_key else None
    request = request_tag(model=row.model_key, plain_model=plain_model,
                          sampling=row.sampling, params=row.params, explicit_key=key)
    return default_stem_of(row.source_path, manifest_dir, row.row_id, request) + (
        extension_for(mime_type))


async def fetch_to_file(storage: Storage, url: str, final: Path, *, root: Path | None = None,
                        token: Callable[[], str] | None = None) -> tuple[str, int]:
    """Download a signed URL to ``final``; return its ``(sha256 hex, size)``.

    ``final`` lies under ``root`` (``--out``; default: its own folder), which
    is reached without following any link below it (:mod:`batcher.safefs`).
    The body goes to a temporary file beside ``final``, created exclusively
    under an unpredictable name (``token`` makes its random part), flushed,
    fsynced and renamed into place. On any failure the temporary file is
    removed and ``final`` is untouched. Transfer failures are the client's
    ``ApiError``s; local ones are ``LocalFileError``s (``outputUnwritable``
    while writing, ``outputWriteFailed`` for the folder or the rename,
    ``unsafeOutputPath`` for a link on the way out of ``root``).
    """
    folder = await _open_folder(root, final)
    try:
        tmp = await _local(anyio.to_thread.run_sync(_new_temp, folder, final.name, token), final)
        digest = hashlib.sha256()
        size = 0
        where = final.parent / tmp.name
        try:
            async with anyio.wrap_file(os.fdopen(tmp.fd, "wb")) as out:

                async def write(chunk: bytes) -> None:
                    nonlocal size
                    digest.update(chunk)
                    size += len(chunk)
                    await _local(out.write(chunk), where)

                await storage.download(url=url, write=write)
                await _local(out.flush(), where)
                await _local(anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno()), where)
            await _local(anyio.to_thread.run_sync(tmp.publish), final, code="outputWriteFailed")
        except BaseException:
            await _discard(tmp, where)
            raise
    finally:
        os.close(folder)
    return digest.hexdigest(), size


async def copy_to_file(src: Path, final: Path, *, root: Path | None = None) -> None:
    """Publish a copy of ``src`` at ``final`` (under ``root``), as :func:`fetch_to_file` does."""
    folder = await _open_folder(root, final)
    try:
        await _local(anyio.to_thread.run_sync(_copy_publish, src, folder, final.name), final,
                     code="outputWriteFailed")
    finally:
        os.close(folder)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half.

    Through an exclusively created temporary file beside it: a link waiting
    at a predictable name cannot redirect the write.
    """
    folder = open_folder(path.parent, path.parent)
    try:
        _publish_written(folder, path.name, lambda fh: fh.write(data))
    finally:
        os.close(folder)


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


def _new_temp(folder: int, name: str, token: Callable[[], str] | None) -> TempFile:
    remove_leftovers(folder, name)  # a killed run's temporary file of this output
    return TempFile(folder, name) if token is None else TempFile(folder, name, token=token)


def _copy_publish(src: Path, folder: int, name: str) -> None:
    def copy(fout: BinaryIO) -> None:
        with src.open("rb") as fin:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)

    _publish_written(folder, name, copy)


def _publish_written(folder: int, name: str, write: Callable[[BinaryIO], object]) -> None:
    """``name`` in ``folder``, as ``write`` fills it: through a temporary file
    that is fsynced, then renamed in place (or removed on any failure)."""
    tmp = _new_temp(folder, name, None)
    try:
        with os.fdopen(tmp.fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.publish()
    except BaseException:
        tmp.discard()
        raise


async def _open_folder(root: Path | None, final: Path) -> int:
    """The held folder of ``final``; a link out of ``root`` is an unsafe output path."""
    try:
        return await anyio.to_thread.run_sync(
            open_folder, final.parent if root is None else root, final.parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            raise OutputPathError(
                f"output path {final} leads outside the output folder through a symlink"
            ) from exc
        raise LocalFileError(f"cannot write {final}: {exc}", code="outputWriteFailed") from exc


async def _local(awaitable: Awaitable[T], path: Path, *, code: str = "outputUnwritable"
                 ) -> T:
    """Await a local file operation; its OSError becomes a LocalFileError with ``code``."""
    try:
        return await awaitable
    except OSError as exc:
        # A write that fails says why in a word; a folder or rename, in full.
        reason = exc.strerror or exc if code == "outputUnwritable" else exc
        raise LocalFileError(f"cannot write {path}: {reason}", code=code) from exc


async def _discard(tmp: TempFile, where: Path) -> None:
    """Delete a temporary file, even while being cancelled."""
    try:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(tmp.discard)
    except OSError as exc:
        log.warning("could not remove the temporary file %s: %s", where, exc,
                    extra=event(OUTPUT_CLEANUP_FAILED, path=str(where), error=str(exc)))
