"""Restored files: their default names and the atomic publish.

An output appears under its final name only when complete: written to a
temporary file beside it, fsynced, renamed, and the rename made durable.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from .keys import sha256_file
from .model import LedgerRow
from .paths import default_output_rel

__all__ = ["copy_publish", "default_output_for", "output_intact", "publish"]


def default_output_for(row: LedgerRow, manifest_dir: Path, mime_type: str | None) -> str:
    """The output path, relative to ``--out``, of a file row that names none."""
    assert row.source_path is not None
    rel = os.path.relpath(row.source_path, manifest_dir).replace(os.sep, "/")
    return default_output_rel(rel, mime_type)


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` into place and make the rename durable."""
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_publish(src: Path, tmp: Path, final: Path) -> None:
    """Publish a copy of ``src`` at ``final`` (through ``tmp``)."""
    with src.open("rb") as fin, tmp.open("wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    publish(tmp, final)


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
