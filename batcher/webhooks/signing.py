"""Standard Webhooks / Svix signatures: signing a delivery, verifying one.

A delivery carries three headers (Svix's names; the Standard Webhooks names
``webhook-id``/``-timestamp``/``-signature`` are accepted too)::

    svix-id:         msg_2b…                        the message id, stable across retries
    svix-timestamp:  1769603696                     unix seconds of this attempt
    svix-signature:  v1,K5oZ… v1,…                  one or more space-separated entries

and ``v1`` = base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")).

The HMAC is computed by the ``standardwebhooks`` library (the specification's
own implementation, which ``svix`` itself wraps), over the body exactly as it
arrived: re-serialised JSON would differ in spacing or key order and never
match. The library also checks the timestamp, but against the real clock
with a fixed five minutes, so the window is checked here instead, with the
injected ``wall`` clock and a ``tolerance`` parameter; the signature is then
compared with the library's own expected value in constant time.

A timestamp more than ``tolerance`` away from now is refused whatever its
signature: that is what makes a captured delivery useless to replay later,
and why the receiver need only remember message ids for that long.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from standardwebhooks import Webhook

from batcher.errors import RefusalReason, VerificationError
from batcher.webhooks.secret import WebhookSecret

__all__ = ["DEFAULT_TOLERANCE", "SignedDelivery", "Verifier", "sign", "signed_headers"]

#: Seconds a delivery's timestamp may be away from now, either way.
DEFAULT_TOLERANCE = 300.0

_HEADER_NAMES = {
    "id": ("svix-id", "webhook-id"),
    "timestamp": ("svix-timestamp", "webhook-timestamp"),
    "signature": ("svix-signature", "webhook-signature"),
}
# Svix ids are ~31 characters; a bound keeps the receiver's memory of ids small.
MAX_MESSAGE_ID = 256
_TIMESTAMP = re.compile(r"[0-9]{1,15}")


def sign(secret: WebhookSecret, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery, as Svix computes it.

    ``body`` must be UTF-8 (JSON is): the scheme signs text.
    """
    moment = datetime.fromtimestamp(timestamp, UTC)
    return Webhook(secret.reveal_key()).sign(message_id, moment, body.decode("utf-8"))


def signed_headers(
    secret: WebhookSecret, message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three ``svix-*`` headers of a delivery of ``body``."""
    return {
        "svix-id": message_id,
        "svix-timestamp": str(timestamp),
        "svix-signature": sign(secret, message_id, timestamp, body),
    }


@dataclass(frozen=True, slots=True)
class SignedDelivery:
    """What verification established about a delivery."""

    message_id: str
    timestamp: int  # unix seconds the sender signed


class Verifier:
    """Checks deliveries signed with one endpoint secret.

    ``wall`` gives unix seconds (injected for tests); ``tolerance`` is the
    allowed distance of the signed timestamp from it, either way.
    """

    __slots__ = ("_webhook", "tolerance", "wall")

    def __init__(
        self,
        secret: WebhookSecret,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not tolerance > 0:
            raise ValueError("tolerance must be a positive number of seconds")
        self._webhook = Webhook(secret.reveal_key())
        self.tolerance = float(tolerance)
        self.wall = wall

    def __repr__(self) -> str:
        return f"Verifier(secret=***, tolerance={self.tolerance:g})"

    def verify(self, body: bytes, headers: Mapping[str, str]) -> SignedDelivery:
        """Check ``body`` (the raw bytes received) against its signing headers.

        Order: headers present and readable, timestamp inside the window,
        then a ``v1`` entry matching. Raises :class:`VerificationError` with
        the reason; returns the message id and timestamp.
        """
        message_id = _header(headers, "id")
        raw_timestamp = _header(headers, "timestamp")
        signatures = _header(headers, "signature")
        if len(message_id) > MAX_MESSAGE_ID:
            raise VerificationError(RefusalReason.MISSING_HEADERS,
                                    f"the message id is longer than {MAX_MESSAGE_ID} characters")
        if not _TIMESTAMP.fullmatch(raw_timestamp):
            raise VerificationError(RefusalReason.MISSING_HEADERS,
                                    "the timestamp header is not unix seconds")
        timestamp = int(raw_timestamp)
        now = self.wall()
        if timestamp < now - self.tolerance:
            raise VerificationError(RefusalReason.STALE_TIMESTAMP,
                                    f"signed {now - timestamp:.0f} s ago, more than "
                                    f"{self.tolerance:g} s")
        if timestamp > now + self.tolerance:
            raise VerificationError(RefusalReason.FUTURE_TIMESTAMP,
                                    f"signed {timestamp - now:.0f} s in the future, more than "
                                    f"{self.tolerance:g} s")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            # The scheme signs text: bytes that are not UTF-8 cannot carry a valid signature.
            raise VerificationError(RefusalReason.BAD_SIGNATURE,
                                    "the body is not UTF-8 text") from None
        expected = self._webhook.sign(message_id, datetime.fromtimestamp(timestamp, UTC), text)
        wanted = base64.b64decode(expected.partition(",")[2])
        for entry in signatures.split():
            version, _, encoded = entry.partition(",")
            if version != "v1":
                continue
            try:
                given = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(wanted, given):
                return SignedDelivery(message_id, timestamp)
        raise VerificationError(RefusalReason.BAD_SIGNATURE, "no v1 signature matches")


def _header(headers: Mapping[str, str], which: str) -> str:
    # aiohttp's headers are case-insensitive; a plain dict from a test may not be.
    lowered = None
    for name in _HEADER_NAMES[which]:
        value = headers.get(name)
        if value is None:
            if lowered is None:
                lowered = {key.lower(): val for key, val in headers.items()}
            value = lowered.get(name)
        if value is not None and value.strip():
            return value.strip()
    raise VerificationError(RefusalReason.MISSING_HEADERS,
                            f"the {_HEADER_NAMES[which][0]} header is missing")
