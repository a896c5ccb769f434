"""The endpoint's signing secret, as a value that never shows itself.

A Svix / Standard Webhooks secret is ``whsec_`` followed by the base64 of the
HMAC key. Whoever holds it can forge events that move ledger rows, so it is
read from the environment (a flag value would land in shell history and in
``ps``), kept inside :class:`WebhookSecret`, whose ``repr`` and ``str`` are
masked, and never logged, stored, counted or put in an error message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
from collections.abc import Callable, Mapping

from batcher.errors import WebhookSecretError

__all__ = ["DEFAULT_SECRET_ENV", "WebhookSecret", "load_secret"]

#: The environment variable read when the job file names no other.
DEFAULT_SECRET_ENV = "BATCHER_WEBHOOK_SECRET"

PREFIX = "whsec_"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class WebhookSecret:
    """An endpoint's signing key; ``repr``/``str`` show ``***``, never the value.

    Build it with :meth:`parse` (from ``whsec_…`` text) or :meth:`generate`;
    the key is only reached through the explicitly named :meth:`reveal` and
    :meth:`reveal_key`.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not key:
            raise WebhookSecretError("a webhook signing secret may not be empty")
        self._key = bytes(key)

    @classmethod
    def parse(cls, text: str, *, source: str = "the webhook signing secret") -> WebhookSecret:
        """Read ``whsec_<base64>``; ``source`` names where it came from in errors.

        The base64 may omit its padding (Svix's dashboards show it either
        way); anything else is refused with a message that names ``source``
        and never repeats the text.
        """
        value = text.strip()
        if not value.startswith(PREFIX):
            raise WebhookSecretError(f"{source} is not a signing secret: it must start with whsec_")
        body = value[len(PREFIX):]
        if not body or not _BASE64.fullmatch(body):
            raise WebhookSecretError(f"{source} is not a signing secret: whsec_ must be followed "
                                     "by base64 text")
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise WebhookSecretError(f"{source} is not a signing secret: its base64 does not "
                                     "decode") from None
        if not key:
            raise WebhookSecretError(f"{source} is not a signing secret: its key is empty")
        return cls(key)

    @classmethod
    def generate(cls, randbytes: Callable[[int], bytes] = os.urandom) -> WebhookSecret:
        """A fresh 24-byte secret, the size Svix issues; ``randbytes`` seeds tests."""
        return cls(randbytes(24))

    def reveal(self) -> str:
        """The ``whsec_…`` text: only for handing the secret to who must hold it."""
        return PREFIX + base64.b64encode(self._key).decode("ascii")

    def reveal_key(self) -> bytes:
        """The raw HMAC key."""
        return self._key

    def __repr__(self) -> str:
        return "WebhookSecret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WebhookSecret):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash((WebhookSecret, self._key))

    def __copy__(self) -> WebhookSecret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> WebhookSecret:
        return self

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the key wherever the pickle goes.
        raise TypeError("a WebhookSecret cannot be pickled")


def load_secret(
    env_name: str | None = None, *, environ: Mapping[str, str] | None = None
) -> WebhookSecret:
    """The signing secret from the environment variable ``env_name``.

    ``env_name`` defaults to ``BATCHER_WEBHOOK_SECRET``; a job file names
    another with ``webhook_secret_env = "NAME"``. Raises
    :class:`WebhookSecretError` naming the variable (never its value) when it
    is unset, empty or not ``whsec_…``; and when ``env_name`` is not a
    variable name at all, which usually means the secret itself was pasted
    where its variable's name belongs.
    """
    name = DEFAULT_SECRET_ENV if env_name is None else env_name
    if PREFIX in name:
        raise WebhookSecretError(
            "webhook_secret_env must name an environment variable, and this looks like the "
            "secret itself: put the secret in the environment and name its variable")
    if not _ENV_NAME.fullmatch(name):
        raise WebhookSecretError(
            "webhook_secret_env must be the name of an environment variable (letters, digits "
            "and _)")
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or not value.strip():
        raise WebhookSecretError(
            f"the webhook signing secret is missing: set the environment variable {name} to the "
            "endpoint's secret (whsec_…)")
    return WebhookSecret.parse(value, source=f"the environment variable {name}")
