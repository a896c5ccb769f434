"""Logging setup for the CLI: plain or JSON lines on stderr, key redacted.

Modules log through ``logging.getLogger(__name__)`` with stable event names
and ``extra`` fields (row, key, generation, attempt); only the CLI calls
:func:`configure`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

__all__ = ["RedactFilter", "configure"]

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RedactFilter(logging.Filter):
    """Replaces the API key wherever it would reach a log line (defence in depth)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    def __repr__(self) -> str:
        return "RedactFilter(secret=***)"

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secret:
            return True
        message = record.getMessage()
        if self._secret in message:
            record.msg = message.replace(self._secret, "***")
            record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str) and self._secret in value:
                setattr(record, key, value.replace(self._secret, "***"))
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"batcher: {record.levelname.lower()}: {record.getMessage()}"
        extras = [f"{k}={v}" for k, v in record.__dict__.items()
                  if k not in _STANDARD and not k.startswith("_")]
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
