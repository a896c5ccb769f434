"""Logging: stable event names, and the handlers the CLI installs.

Every log call names its event with one of the constants below and carries
its data as fields; the message is a sentence for people, not the name::

    log.warning("row %s failed: %s", row_id, text, extra=event(ROW_FAILED, row=row_id))

With ``--log-json`` each record is one JSON object: ``event`` (the constant:
group, count and alert on it), ``message`` (the sentence), ``level``,
``logger``, ``ts`` and the fields. The plain output shows the sentence, then
the event and the fields in brackets. Modules log through
``logging.getLogger(__name__)``; only the CLI calls :func:`configure`.

Event names are ``subject.what_happened``, lower case, words joined by ``_``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from batcher.scrub import KeyScrubber

__all__ = [
    "API_PROBE_FAILED",
    "API_REACHABLE",
    "API_UNREACHABLE",
    "DISK_FULL",
    "DOWNLOAD_RETRY_SCHEDULED",
    "EVENTS",
    "LEDGER_CLOSE_FAILED",
    "LEDGER_COMMIT_FAILED",
    "LEDGER_LOCK_TAKEN_OVER",
    "LEDGER_MIGRATED",
    "LEDGER_REACHABLE",
    "LEDGER_RETRY",
    "LEDGER_ROWS_RETIRED",
    "LEDGER_UNREACHABLE",
    "OUTPUT_CLEANUP_FAILED",
    "POLL_RETRY_SCHEDULED",
    "POLL_UNKNOWN_STATUS",
    "RATE_CLAIM_FAILED",
    "RATE_LIMITED",
    "REPORT_COUNTS_FAILED",
    "REQUEST_RETRY_SCHEDULED",
    "ROW_FAILED",
    "ROW_INVALID",
    "ROW_MOVED_ELSEWHERE",
    "ROW_OUTPUT_MISSING",
    "ROW_REQUEST_CHANGED",
    "ROW_SOURCE_CHANGED",
    "ROW_TOOK_OVER",
    "RUN_HALTED",
    "RUN_PROGRESS",
    "SIMULATOR_OBSERVER_FAILED",
    "UPLOAD_ABANDONED",
    "UPLOAD_RESTARTED",
    "UPLOAD_RESUMED",
    "UPLOAD_URL_EXPIRED",
    "WEBHOOK_ACCEPTED",
    "WEBHOOK_APPLIED",
    "WEBHOOK_APPLY_FAILED",
    "WEBHOOK_COUNTS_FAILED",
    "WEBHOOK_LISTENING",
    "WEBHOOK_REFUSED",
    "WEBHOOK_SINK_FAILED",
    "WORKER_HEARTBEAT_FAILED",
    "WORKER_JOINED",
    "WORKER_LEAVE_FAILED",
    "RedactFilter",
    "configure",
    "event",
]

# -- the run --------------------------------------------------------------------
RUN_HALTED = "run.halted"  # code: why; the run stops submitting (exit 3)
RUN_PROGRESS = "run.progress"  # done, todo, failed, inFlight, ... (--log-json progress lines)
# -- rows -------------------------------------------------------------------------
ROW_FAILED = "row.failed"  # row, code: the row is failed in the ledger
ROW_INVALID = "row.invalid"  # row: a manifest row that cannot be sent (file, line, field)
ROW_SOURCE_CHANGED = "row.source_changed"  # row: its file changed; it is a new request now
ROW_REQUEST_CHANGED = "row.request_changed"  # row: asks for another request under its id
ROW_TOOK_OVER = "row.took_over"  # row, from: a duplicate goes on with its leader's request
ROW_OUTPUT_MISSING = "row.output_missing"  # row: a complete row's output is downloaded again
ROW_MOVED_ELSEWHERE = "row.moved_elsewhere"  # row, step: another host moved it first
# -- requests -------------------------------------------------------------------
REQUEST_RETRY_SCHEDULED = "request.retry_scheduled"  # row, code, attempt, wait
POLL_RETRY_SCHEDULED = "poll.retry_scheduled"  # row, code: polled again later
POLL_UNKNOWN_STATUS = "poll.unknown_status"  # row, status: a status word batcher does not know
DOWNLOAD_RETRY_SCHEDULED = "download.retry_scheduled"  # row, code, attempt, wait
UPLOAD_URL_EXPIRED = "upload.url_expired"  # row: a fresh project is created
UPLOAD_RESUMED = "upload.resumed"  # row, parts: a killed upload goes on from its next part
UPLOAD_RESTARTED = "upload.restarted"  # row, code: a new upload in the same session
UPLOAD_ABANDONED = "upload.abandoned"  # row, code: an upload given up is aborted at the host
RATE_LIMITED = "rate.limited"  # retry_after, pause, rate: a 429 paused and slowed everyone
# -- several hosts ------------------------------------------------------------------
WORKER_JOINED = "worker.joined"  # worker, live
WORKER_LEAVE_FAILED = "worker.leave_failed"  # worker, error
WORKER_HEARTBEAT_FAILED = "worker.heartbeat_failed"  # worker, error
RATE_CLAIM_FAILED = "rate.claim_failed"  # error, wait: the shared pace could not be read
# -- the ledger and files -----------------------------------------------------------
LEDGER_ROWS_RETIRED = "ledger.rows_retired"  # rows: no longer in the manifest
LEDGER_UNREACHABLE = "ledger.unreachable"  # ledger, error: writes wait for it
LEDGER_REACHABLE = "ledger.reachable"  # ledger, down_seconds: writes go on
LEDGER_CLOSE_FAILED = "ledger.close_failed"  # error: the run's end was not recorded
DISK_FULL = "disk.full"  # folder, row, needed: submissions stop
LEDGER_MIGRATED = "ledger.migrated"  # ledger, versions: schema migrations applied
LEDGER_RETRY = "ledger.retry"  # doing, attempt, error: a transient ledger error, tried again
LEDGER_COMMIT_FAILED = "ledger.commit_failed"  # error, jobs: a group commit rolled back
LEDGER_LOCK_TAKEN_OVER = "ledger.lock_taken_over"  # lock, previous: a dead run's lock file
OUTPUT_CLEANUP_FAILED = "output.cleanup_failed"  # path, error
REPORT_COUNTS_FAILED = "report.counts_failed"  # the report was written without counts
# -- the API host (circuit breaker) ---------------------------------------------------
API_UNREACHABLE = "api.unreachable"  # host, failed_requests: requests pause
API_PROBE_FAILED = "api.probe_failed"  # host, next_probe_in
API_REACHABLE = "api.reachable"  # host, down_seconds: requests go out again
# -- webhook deliveries -------------------------------------------------------------
WEBHOOK_ACCEPTED = "webhook.accepted"  # message_id, disposition, generation, event_type
WEBHOOK_REFUSED = "webhook.refused"  # reason, detail, message_id
WEBHOOK_SINK_FAILED = "webhook.sink_failed"  # message_id, generation, error: answered 503
WEBHOOK_APPLIED = "webhook.applied"  # row, generation, status: an event moved a row on
WEBHOOK_APPLY_FAILED = "webhook.feed_failed"  # error: events unread for now; polls cover
WEBHOOK_COUNTS_FAILED = "webhook.counts_failed"  # error: counters not added to the ledger
WEBHOOK_LISTENING = "webhook.listening"  # address: the receiver is serving
# -- the embedded simulator -----------------------------------------------------------
SIMULATOR_OBSERVER_FAILED = "simulator.observer_failed"  # generation_id

EVENTS: frozenset[str] = frozenset({
    RUN_HALTED, RUN_PROGRESS, ROW_FAILED, ROW_INVALID, ROW_SOURCE_CHANGED, ROW_OUTPUT_MISSING,
    ROW_REQUEST_CHANGED, ROW_TOOK_OVER,
    ROW_MOVED_ELSEWHERE, REQUEST_RETRY_SCHEDULED, POLL_RETRY_SCHEDULED, POLL_UNKNOWN_STATUS,
    DOWNLOAD_RETRY_SCHEDULED, UPLOAD_URL_EXPIRED, UPLOAD_RESUMED, UPLOAD_RESTARTED,
    UPLOAD_ABANDONED, RATE_LIMITED, WORKER_JOINED,
    WORKER_LEAVE_FAILED, WORKER_HEARTBEAT_FAILED, RATE_CLAIM_FAILED,
    LEDGER_ROWS_RETIRED, LEDGER_UNREACHABLE, LEDGER_REACHABLE, LEDGER_CLOSE_FAILED, DISK_FULL,
    LEDGER_MIGRATED, LEDGER_RETRY, LEDGER_COMMIT_FAILED,
    LEDGER_LOCK_TAKEN_OVER, SIMULATOR_OBSERVER_FAILED,
    OUTPUT_CLEANUP_FAILED, REPORT_COUNTS_FAILED, API_UNREACHABLE, API_PROBE_FAILED,
    API_REACHABLE, WEBHOOK_ACCEPTED, WEBHOOK_REFUSED, WEBHOOK_SINK_FAILED, WEBHOOK_APPLIED,
    WEBHOOK_APPLY_FAILED, WEBHOOK_COUNTS_FAILED, WEBHOOK_LISTENING,
})
"""Every event batcher logs."""


def event(name: str, **fields: Any) -> dict[str, Any]:
    """The ``extra`` of a log call: its event name and its fields."""
    return {"event": name, **fields}

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RedactFilter(logging.Filter):
    """Replaces the API key, in any form (:mod:`batcher.scrub`), wherever it would
    reach a log line (defence in depth: the client already scrubbed the API's answers)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._scrub = KeyScrubber(secret)

    def __repr__(self) -> str:
        return "RedactFilter(secret=***)"

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._scrub:
            return True
        message = record.getMessage()
        clean = self._scrub.text(message)
        if clean != message:
            record.msg = clean
            record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                clean = self._scrub.text(value)
                if clean != value:
                    setattr(record, key, clean)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD and k != "event" and not k.startswith("_")}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            # A record from outside batcher's modules may have no event name.
            "event": getattr(record, "event", None) or message,
            "message": message,
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"batcher: {record.levelname.lower()}: {record.getMessage()}"
        extras = [f"{k}={v}" for k, v in _fields(record).items()]
        name = getattr(record, "event", None)
        if name:
            extras.insert(0, str(name))
        if extras:
            line += " [" + " ".join(extras) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(*, level: int = logging.WARNING, json: bool = False, secret: str = "") -> None:
    """Send batcher's logs to stderr at ``level``; redact ``secret``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json else _PlainFormatter())
    handler.addFilter(RedactFilter(secret))
    root = logging.getLogger("batcher")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # aiohttp's own loggers may print URLs; they never carry our key, but keep
    # them quiet unless asked for.
    logging.getLogger("aiohttp").setLevel(max(level, logging.WARNING))
    # asyncpg's pool reports each reconnection it retries with a traceback;
    # the ledger waits those outages out and says so itself (ledger.*).
    quiet = logging.getLogger("asyncpg")
    for old in list(quiet.handlers):
        quiet.removeHandler(old)
    quiet.addHandler(handler)
    quiet.addFilter(_without_traceback)
    quiet.setLevel(max(level, logging.ERROR))
    quiet.propagate = False


def _without_traceback(record: logging.LogRecord) -> bool:
    """Keep the record's message, drop its traceback (never shown to users)."""
    record.exc_info = None
    record.exc_text = None
    return True
