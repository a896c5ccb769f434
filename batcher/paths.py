"""Where restored files go, and the guarantee that they stay under ``--out``."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import OutputPathError

__all__ = ["default_output_rel", "extension_for", "resolve_output", "write_atomically_target"]

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


def default_output_rel(file_rel: str, mime_type: str | None) -> str:
    """``sub/take.wav`` -> ``sub/take.restored.mp3``.

    A source outside the manifest's folder (``../x.wav``, absolute) keeps only
    its name, so the default never points outside ``--out``.
    """
    rel = PurePosixPath(file_rel.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        rel = PurePosixPath(rel.name)
    stem = rel.name.rsplit(".", 1)[0] if "." in rel.name[1:] else rel.name
    return str(rel.with_name(f"{stem}.restored{extension_for(mime_type)}"))


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


def write_atomically_target(final: Path, row_id: str) -> Path:
    """The temporary path, beside ``final``, that a download is written to first."""
    safe = "".join(c if c.isalnum() or c in "-_~" else "_" for c in row_id)
    return final.with_name(f".{final.name}.{safe}.part")
