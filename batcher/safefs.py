"""Writing under a folder without following links out of it.

An output is written to a temporary file and renamed into place. Both steps
are made relative to a folder held open (``dir_fd``), reached from the root
(``--out``) one component at a time with ``O_NOFOLLOW``: a symlink planted
anywhere below the root — at the temporary name, at the final name, or as a
folder on the way — is never followed, whenever it was planted.

* **Folders.** :func:`open_folder` opens (creating what is missing) the real
  path of the folder, checked to be under the root's real path, walking it
  with ``O_DIRECTORY | O_NOFOLLOW``. A symlinked folder that stays inside the
  root is accepted through its real path; one that leads out, or a link
  swapped in while walking, makes the open fail.
* **Temporary files.** :class:`TempFile` is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` under an unpredictable name (random
  bytes), so nothing can be waiting at it, not even a link.
* **Leftovers.** A run killed mid-write leaves its temporary file; the next
  write of the same output removes it (:func:`remove_leftovers`: names of
  our own form only, links unlinked, never followed).
* **Publishing.** ``rename`` within the held folder; a link at the final name
  is replaced, never followed. The folder is fsynced so the rename survives
  a power loss.

Everything here blocks: call it from a worker thread. OS errors propagate as
``OSError``; callers turn them into the error tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["TempFile", "open_folder", "remove_leftovers"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_TRIES = 16
_TOKEN = re.compile(r"[0-9a-f]{16}")


def open_folder(root: Path, folder: Path) -> int:
    """A descriptor of ``folder`` (``root`` or below it), created if missing.

    ``root`` itself is created and followed if it is a link (it is the
    user's choice); below it nothing is followed. Raises ``OSError``:
    ``EXDEV`` when the folder's real path is not under the root's, ``ELOOP``
    or ``ENOTDIR`` when a link or a file is met on the way.
    """
    os.makedirs(root, exist_ok=True)
    top = root.resolve()
    real = folder.resolve()
    if real != top and top not in real.parents:
        raise OSError(errno.EXDEV, f"{folder} leads outside {root}")
    fd = os.open(top, _DIR_FLAGS)
    try:
        for part in real.relative_to(top).parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_leftovers(folder_fd: int, final_name: str) -> int:
    """Remove temporary files of ``final_name`` that killed writers left; return how many.

    Only names :class:`TempFile` makes (``.NAME.<16 hex>.part``); a link with
    such a name is removed itself, never followed.
    """
    prefix, removed = f".{final_name}.", 0
    with os.scandir(folder_fd) as entries:
        names = [e.name for e in entries if e.name.startswith(prefix)
                 and e.name.endswith(".part")
                 and _TOKEN.fullmatch(e.name[len(prefix):-len(".part")])]
    for name in names:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(name, dir_fd=folder_fd)
            removed += 1
    return removed


class TempFile:
    """A new file with an unpredictable name in a held folder, then published.

    ``folder_fd`` stays owned by the caller. ``token`` makes the random part
    of the name (injected in tests).
    """

    def __init__(self, folder_fd: int, final_name: str, *,
                 token: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self.folder_fd = folder_fd
        self.final_name = final_name
        for _ in range(_TEMP_TRIES):
            name = f".{final_name}.{token()}.part"
            try:
                self.fd = os.open(name, _TEMP_FLAGS, 0o666, dir_fd=folder_fd)
            except FileExistsError:
                continue
            self.name = name
            return
        raise FileExistsError(errno.EEXIST,
                              f"no free temporary name for {final_name} after {_TEMP_TRIES} tries")

    def publish(self) -> None:
        """Rename the (written, fsynced, closed) file to its final name, durably."""
        os.rename(self.name, self.final_name, src_dir_fd=self.folder_fd,
                  dst_dir_fd=self.folder_fd)
        os.fsync(self.folder_fd)

    def discard(self) -> None:
        """Remove the temporary file (gone already: nothing to do)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name, dir_fd=self.folder_fd)
