"""Scrubbing the API key out of text that came back from outside.

A server may repeat the caller's key in an answer: in an error message, in a
``Location`` header, in a field of a 200. It rarely repeats it verbatim: JSON
writers escape ``/`` as ``\\/`` (and anything as ``\\u002f``), URLs carry it
percent-encoded (``%2F`` or ``%2f``), forms turn a space into ``+``. A plain
``text.replace(key, "***")`` misses all of those.

:class:`KeyScrubber` matches the key in every one of those forms at once,
character by character, so even a mixture (half escaped, half not) is
caught. The API client applies it to every answer's body and headers before
anything reads them (the one seam: classification, error messages, the
ledger, the export, the report and the logs all see only scrubbed text), and
the log filter applies it again as a second line of defence.

Forms not covered: encodings that change the whole string rather than its
characters one by one (base64, hashes). A server that base64-encodes a key
it was sent is not one we know of.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "KeyScrubber"]

MASK = "***"
"""What replaces the key, in whatever form it was found."""


def _hex(text: str) -> str:
    """A pattern for hex digits in either case."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


def _char_forms(c: str) -> str:
    """A pattern matching one character of the key in any of the forms it takes in text."""
    forms = [re.escape(c)]
    # URL-encoded: one %XX per UTF-8 byte, hex in either case.
    forms.append("".join("%" + _hex(f"{b:02X}") for b in c.encode()))
    # JSON-escaped: \uXXXX (surrogate pairs for characters beyond the BMP), and
    # the short escapes JSON writers use for these three.
    units = c.encode("utf-16-be")
    forms.append("".join(r"\\u" + _hex(units[i:i + 2].hex().upper())
                         for i in range(0, len(units), 2)))
    if c in '/"\\':
        forms.append(re.escape("\\" + c))
    if c == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


class KeyScrubber:
    """Replaces one secret, raw, JSON-escaped or URL-encoded, with :data:`MASK`.

    Works on ``str`` (:meth:`text`) and on ``bytes`` (:meth:`bytes`, for
    answers before they are decoded). An empty secret scrubs nothing. The
    repr never shows the secret.
    """

    __slots__ = ("_bytes_pattern", "_first", "_text_pattern")

    def __init__(self, secret: str) -> None:
        self._text_pattern: re.Pattern[str] | None = None
        self._bytes_pattern: re.Pattern[bytes] | None = None
        if secret:
            pattern = "".join(_char_forms(c) for c in secret)
            self._text_pattern = re.compile(pattern)
            self._bytes_pattern = re.compile(pattern.encode())

    def __repr__(self) -> str:
        return f"KeyScrubber(secret={MASK if self._text_pattern else ''!r})"

    def __bool__(self) -> bool:
        return self._text_pattern is not None

    def text(self, value: str) -> str:
        """``value`` with every form of the secret replaced."""
        if self._text_pattern is None:
            return value
        return self._text_pattern.sub(MASK, value)

    def bytes(self, value: bytes) -> bytes:
        """``value`` (an answer's raw bytes) with every form of the secret replaced."""
        if self._bytes_pattern is None:
            return value
        return self._bytes_pattern.sub(MASK.encode(), value)
