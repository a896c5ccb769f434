"""The run lock: one ``batcher run`` per SQLite ledger (a second one exits with code 4).

The lock is ``fcntl.flock`` on a sidecar file ``<ledger>.lock`` that holds the
holder's pid, host and start time as JSON. The kernel drops a flock when its
process dies, even on SIGKILL, so a lock left by a dead run is simply free and
the next run takes it over; no pid probing, no stale-file guessing. (flock is
per open file description: two opens in one process also exclude each other.
It is not reliable on some network file systems; keep ledgers on local disk.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from batcher.errors import LedgerError, LedgerLocked
from batcher.model import RunInfo
from batcher.ops.logs import LEDGER_LOCK_TAKEN_OVER, event

__all__ = ["RunLock", "describe_holder", "lock_path_for"]

log = logging.getLogger(__name__)

# A holder writes its JSON right after taking the lock; a contender that reads
# in between sees an empty or half-written file and looks again this often.
_READ_TRIES = 20
_READ_PAUSE = 0.01


def lock_path_for(ledger_path: Path) -> Path:
    """The sidecar lock file of a ledger file."""
    return ledger_path.with_name(ledger_path.name + ".lock")


def describe_holder(info: dict[str, Any] | None) -> str:
    """A one-line description of a lock holder for LedgerLocked's message."""
    if not info:
        return "another process (its details are unreadable)"
    started = info.get("started_at")
    when = "at an unknown time"
    if isinstance(started, int | float):
        when = datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds")
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"
    if info.get("run_id"):
        text += f" (run {info['run_id']})"
    return text


class RunLock:
    """An exclusive, non-blocking lock on one ledger, held by one open file."""

    def __init__(self, ledger_path: Path) -> None:
        self.ledger_path = ledger_path
        self.path = lock_path_for(ledger_path)
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"<RunLock {str(self.path)!r} {'held' if self.held else 'free'}>"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self, run: RunInfo) -> None:
        """Take the lock at once or raise LedgerLocked naming its holder."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot open the lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise LedgerLocked(str(self.ledger_path), describe_holder(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _parse(_read_all(fd))
        if previous and previous.get("pid") != run.pid:
            # The flock was free, so whoever wrote this has died (or closed
            # without cleaning up): its rows are ours to resume.
            log.warning(
                "the run that held this ledger is gone: taking its lock over",
                extra=event(LEDGER_LOCK_TAKEN_OVER, lock=str(self.path),
                            previous=describe_holder(previous)),
            )
        body = orjson.dumps(
            {
                "pid": run.pid,
                "host": run.host,
                "started_at": run.started_at,
                "run_id": run.run_id,
            }
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, body, 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock; safe to call when not held.

        The holder's details are erased first so a reader never names a run
        that is gone; the file itself stays (deleting it would race with a
        contender that has it open).
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        """The current holder's details as written in the lock file, if any."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return _parse(_read_all(fd))
        finally:
            os.close(fd)

    def _read_holder(self, fd: int) -> dict[str, Any] | None:
        for _ in range(_READ_TRIES):
            info = _parse(_read_all(fd))
            if info:
                return info
            time.sleep(_READ_PAUSE)
        return None


def _read_all(fd: int) -> bytes:
    return os.pread(fd, 64 * 1024, 0)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
