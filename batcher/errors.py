"""batcher's one error tree.

Every failure that crosses a module boundary is one of these. Exceptions of
the libraries underneath are translated where they happen: HTTP-layer ones in
``storage.py`` (``Transport.error``), answers in ``classify.py``, local OS
errors around outputs in ``outputs.py``, the databases' in ``ledger/``::

    BatcherError
    ├── ConfigError              bad flags, job file or environment (exit 2)
    │   ├── WebhookSecretError   the webhook signing secret is missing or not whsec_…
    │   └── ListenAddressError   a --webhook-listen value that is not HOST:PORT
    ├── ManifestError            unreadable manifest, missing header (exit 2)
    ├── RowError                 one bad manifest row (row failed: invalidRow)
    ├── LedgerError              the ledger cannot be opened or written
    │   ├── LedgerLocked         another run holds this ledger (exit 4)
    │   ├── TransitionConflict   a compare-and-set matched no row
    │   │   └── LeaseLost        this host's lease on a row ran out (shared
    │   │                        ledger): the row is someone else's now
    │   ├── LedgerUnreachable    a transient failure: connection lost, server
    │   │                        restarting, database locked or disk full
    │   │                        (retryable; the run waits)
    │   └── LedgerUnavailable    the ledger stayed unreachable longer than the
    │                            patience (halts the run, exit 3)
    ├── LocalFileError           a local file: source unreadable or changed,
    │   │                        output unwritable (row fails; not the API's doing)
    │   └── OutputPathError      an output path would leave --out
    ├── RunHalted                a local stop: --max-spend reached, --halt-after
    │   │                        passed (halts submissions)
    │   └── DiskFull             no space left in --out (halts submissions;
    │                            finished generations wait for their download)
    ├── DeliveryRefused          one webhook delivery refused (never stops the
    │   │                        receiver); carries reason and http_status
    │   ├── VerificationError    headers, timestamp or signature do not hold
    │   └── EventError           signed, but not a generation event we understand
    └── ApiError                 anything the Diffio API or the network did
        ├── ApiUnavailable       the API host has been down longer than the
        │                        patience (halts the run; no row fails)
        ├── TransportError       no HTTP answer: connect, reset, timeout (retryable)
        ├── DecodeError          an answer that is not the JSON we need (retryable)
        ├── InvalidRequest       the request body cannot be encoded; nothing sent
        ├── SubmissionsStopped   a generation request not sent: the run stopped
        │                        submitting
        └── StatusError          an HTTP error status, with code and body
            ├── RateLimited      429; carries retry_after (retryable)
            ├── ServerError      500, 502-504, 408 (retryable)
            ├── AuthError        401, and 403 on the key itself (halts the run)
            ├── SpendLimit       402 (halts submissions; body figures kept)
            ├── Conflict         409 (idempotencyKeyConflict, not ready yet, …)
            ├── ModelRetired     410 model_retired: the API no longer serves the
            │                    model (halts the run; names the supported ones)
            └── ClientError      other 4xx: the row is wrong (not retried)
                ├── UrlExpired   a signed storage URL refused: ask for a new one
                └── RequestBug   405 or a redirect: our request is malformed
                                 (halts the run)

Every error says what it means for the run, as class attributes:
``retryable`` (the same request may succeed later), ``halts_submissions``
(post nothing more; what is in flight finishes; exit 3, resumable) and
``halts_run`` (stop everything now; exit 3, resumable). The runner reads
these and never tests an error's class to decide. Messages never contain the
API key: the client never puts it in one, and scrubs every answer of it (raw,
JSON-escaped or URL-encoded; :mod:`batcher.scrub`) before anything reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

__all__ = [
    "ApiError",
    "ApiUnavailable",
    "AuthError",
    "BatcherError",
    "ClientError",
    "ConfigError",
    "Conflict",
    "DecodeError",
    "DeliveryRefused",
    "DiskFull",
    "EventError",
    "InvalidRequest",
    "LeaseLost",
    "LedgerError",
    "LedgerLocked",
    "LedgerUnavailable",
    "LedgerUnreachable",
    "ListenAddressError",
    "LocalFileError",
    "ManifestError",
    "ModelRetired",
    "OutputPathError",
    "RateLimited",
    "RefusalReason",
    "RequestBug",
    "RowError",
    "RunHalted",
    "ServerError",
    "SpendLimit",
    "StatusError",
    "SubmissionsStopped",
    "TransitionConflict",
    "TransportError",
    "UrlExpired",
    "VerificationError",
    "WebhookSecretError",
    "exit_code_for",
    "find_error",
]


def find_error(exc: BaseException) -> BatcherError | None:
    """The BatcherError ``exc`` is or holds (task groups wrap errors in ExceptionGroups)."""
    if isinstance(exc, BatcherError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_error(inner)
            if found is not None:
                return found
    return None


def exit_code_for(err: BatcherError, *, sent: bool) -> int:
    """The exit code a run that ended with ``err`` has; ``sent``: requests went out.

    4: another run holds the ledger. 3: a resumable halt, which is what any
    infrastructure failure is once something was sent. 2: nothing was sent
    (flags, manifest, a ledger that cannot be opened). 1: anything else.
    """
    if isinstance(err, LedgerLocked):
        return 4
    if err.halts_run or err.halts_submissions:
        return 3
    if isinstance(err, LedgerError) and sent:
        return 3
    if isinstance(err, ConfigError | ManifestError | LedgerError):
        return 2
    return 1


class BatcherError(Exception):
    """Root of every error batcher raises on purpose."""

    # The same request may succeed if made again later.
    retryable: bool = False
    # Post no more generations; what is in flight finishes (exit 3, resumable).
    halts_submissions: bool = False
    # Stop everything now (exit 3, resumable); implies halts_submissions.
    halts_run: bool = False


class ConfigError(BatcherError):
    """Flags, environment or job file are wrong; nothing was sent."""


class ManifestError(BatcherError):
    """The manifest as a whole cannot be read (missing, no header, unknown type)."""


class RowError(BatcherError):
    """One manifest row is invalid; it fails with code ``invalidRow``.

    ``line`` is the data-row number (1 = first data row) and ``field`` the
    column or key at fault, when one is.
    """

    code = "invalidRow"

    def __init__(self, message: str, *, path: str, line: int, field: str | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        where = f"{path}: row {line}"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


class LedgerError(BatcherError):
    """The ledger cannot be opened, migrated or written."""


class LedgerLocked(LedgerError):
    """Another ``batcher run`` holds this ledger."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"ledger {path} is in use by {holder}")


class TransitionConflict(LedgerError):
    """A compare-and-set on a ledger row matched nothing.

    Either the row does not exist or its stage was not the expected one; a
    silent no-op here could hide a double submission, so it is an error.
    """

    def __init__(self, row_id: str, expected: str, actual: str | None) -> None:
        self.row_id = row_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"row {row_id}: expected stage {expected}, found {actual or 'no such row'}"
        )


class LedgerUnreachable(LedgerError):
    """A transient ledger failure: the connection dropped, the server is
    restarting or shutting down, the database is locked, or its disk is full.

    The same write may succeed a moment later; the run waits for it (up to
    its patience) instead of failing anything. The message names the ledger
    (a URL without its password, or the file).
    """

    retryable = True


class LedgerUnavailable(LedgerError):
    """The ledger stayed unreachable longer than the run's patience.

    Infrastructure, not a row's fault: no row fails; the run halts (exit 3)
    and the same command resumes it once the ledger is back. What the API
    answered but could not be written is answered again (a free replay).
    """

    halts_submissions = True
    halts_run = True
    code = "ledgerUnavailable"
class LeaseLost(TransitionConflict):
    """On a shared ledger, this host no longer holds the row's lease.

    It ran out (the host was paused, or cut off from the ledger, longer than
    ``--lease-ttl``) and another host may have taken the row over. Nothing
    more is sent for the row from here: the runner drops it and goes on.
    """

    def __init__(self, row_id: str) -> None:
        self.row_id = row_id
        self.expected = "this host's lease"
        self.actual = "expired or taken over"
        LedgerError.__init__(self, f"row {row_id}: this host's lease on it ran out; "
                                   "another host may have taken it over")


class LocalFileError(BatcherError):
    """A local file problem: the row fails, nothing is retried.

    ``code`` is ``fileUnreadable`` or ``fileChanged`` (the source),
    ``outputUnwritable`` or ``outputWriteFailed`` (the output).
    """

    code: str = "localFileError"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.message = message
        if code:
            self.code = code
        super().__init__(message)

    def to_record(self) -> dict[str, Any]:
        """The ``error`` object written to the ledger and the export."""
        return {"code": self.code, "message": self.message, "httpStatus": None}


class OutputPathError(LocalFileError):
    """An output path from the manifest would be written outside ``--out``."""

    code = "unsafeOutputPath"


class RunHalted(BatcherError):
    """The run stopped itself before the API did: a local cap or failure share.

    Like a 402 it stops new submissions, lets what is in flight finish, and
    the run exits 3, resumable.
    """

    halts_submissions = True

    def __init__(self, message: str, *, code: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class DiskFull(RunHalted):
    """No space left on the device of ``--out`` (or a quota reached).

    Not the row's fault: submissions stop at once (no generation is bought
    that could not be saved), rows whose generation is done stay waiting
    for their download, and the run exits 3; the same command finishes them
    once space is freed. ``folder`` is where space is needed, ``needed`` the
    bytes the failed download wanted (None when unknown).
    """

    def __init__(self, message: str, *, folder: str, needed: int | None) -> None:
        super().__init__(message, code="diskFull")
        self.folder = folder
        self.needed = needed


class ApiError(BatcherError):
    """Something the Diffio API or the network did.

    ``endpoint`` is the API path (``diffio-3.5-generation``, or ``upload`` /
    ``download`` for signed URLs); ``row_id`` is attached by the caller when
    known.
    """

    code: str = "apiError"
    # Set by the transport: the host gave no answer, and none to any other
    # request either since this one first failed (maybe an outage, not the
    # request's fault). The run then spends none of the row's attempts on it.
    outage: bool = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        row_id: str | None = None,
    ) -> None:
        self.message = message
        self.endpoint = endpoint
        self.row_id = row_id
        super().__init__(message)

    @property
    def http_status(self) -> int | None:
        """The HTTP status, or None when there was no HTTP answer."""
        return None

    def __str__(self) -> str:
        parts = [self.message]
        if self.endpoint:
            parts.append(f"(endpoint {self.endpoint}")
            if self.row_id:
                parts[-1] += f", row {self.row_id}"
            parts[-1] += ")"
        return " ".join(parts)

    def to_record(self) -> dict[str, Any]:
        """The ``error`` object written to the ledger and the export."""
        return {"code": self.code, "message": self.message, "httpStatus": self.http_status}


class ApiUnavailable(ApiError):
    """The API host did not answer for longer than the run's patience.

    Infrastructure, not a row's fault: no row fails; the run halts (exit 3)
    and the same command resumes it once the host is back. ``host`` names
    the host (never a URL with credentials).
    """

    halts_submissions = True
    halts_run = True
    code = "apiUnavailable"

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class TransportError(ApiError):
    """No usable HTTP answer: connection refused or reset, timeout, cut body."""

    retryable = True
    code = "transportError"


class DecodeError(ApiError):
    """An answer arrived but is not the JSON the endpoint promises."""

    retryable = True
    code = "badResponse"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str = "",
        endpoint: str = "",
        row_id: str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, row_id=row_id)
        self.status = status
        self.body = body[:500]

    @property
    def http_status(self) -> int | None:
        return self.status


class InvalidRequest(ApiError):
    """The request body could not be encoded as JSON; nothing was sent (row fails)."""

    code = "badRequest"


class SubmissionsStopped(ApiError):
    """A generation request was not sent: the run stopped submitting (a halt)."""

    code = "submissionsStopped"


class StatusError(ApiError):
    """An HTTP error status with the API's ``error`` text and ``code``."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        body: Mapping[str, Any] | None = None,
        endpoint: str = "",
        row_id: str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, row_id=row_id)
        self.status = status
        self.body: dict[str, Any] = dict(body or {})
        if code:
            self.code = code

    @property
    def http_status(self) -> int | None:
        return self.status

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.code}: {super().__str__()}"


class RateLimited(StatusError):
    """429: slow down; ``retry_after`` seconds when the server said so."""

    retryable = True
    code = "rateLimited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(StatusError):
    """500 and 502–504: the server failed; the same request may succeed later."""

    retryable = True
    code = "serverError"


class AuthError(StatusError):
    """401, or 403 on the key itself (inactive, lacks permission): halt the run."""

    halts_submissions = True
    halts_run = True
    code = "unauthorized"


class SpendLimit(StatusError):
    """402: the key's spend limit or a billing hold; stop submitting.

    The body's figures (``spendLimitUsd``, ``usedUsd``, ``estimatedCostUsd``…)
    are kept in ``body`` so the CLI can show them.
    """

    halts_submissions = True
    code = "spendLimitExceeded"

    def figures(self) -> str:
        """One line with the 402 body's figures, for the operator."""
        keys = ("spendLimitUsd", "usedUsd", "pendingUsd", "estimatedCostUsd", "periodEnd")
        shown = [f"{k}={self.body[k]}" for k in keys if k in self.body]
        return ", ".join(shown) if shown else "no figures in the answer"


class Conflict(StatusError):
    """409: ``idempotencyKeyConflict`` (row fails) or a resource not ready yet."""

    code = "conflict"


class ModelRetired(StatusError):
    """410 ``model_retired``: the API no longer serves the model; halt the run.

    Every later row with that model would get the same answer, and nothing
    was charged: the run halts (exit 3), rows stay pending, and the same
    command resumes once the model is changed. ``retired_model`` and
    ``supported_models`` come from the answer's ``retiredModel`` and
    ``supportedModels``; the message names both, in one line.
    """

    halts_submissions = True
    halts_run = True
    code = "model_retired"

    def __init__(self, message: str, *, retired_model: str,
                 supported_models: tuple[str, ...], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retired_model = retired_model
        self.supported_models = supported_models

    def __str__(self) -> str:
        return self.message


class ClientError(StatusError):
    """Other 4xx: the request is wrong for this row; not retried."""

    code = "badRequest"


class UrlExpired(ClientError):
    """A signed storage URL was refused (401/403/410, or a 400 saying expired).

    Retrying the same URL is pointless: get a fresh one (a new project for an
    upload, a new ``get_generation_download`` for a download).
    """

    code = "urlExpired"


class RequestBug(ClientError):
    """405 or a 3xx from the API: the request itself is malformed.

    Every later request would fail the same way (wrong method, wrong base
    URL, a redirect that would turn our POST into a GET), so the run halts
    loudly instead of failing row after row.
    """

    halts_submissions = True
    halts_run = True
    code = "methodNotAllowed"


# -- webhook deliveries ------------------------------------------------------------


class RefusalReason(StrEnum):
    """Why a delivery was refused; the values are the counters' names."""

    # A signing header (id, timestamp, signature) is absent or unreadable.
    MISSING_HEADERS = "missingHeaders"
    # No ``v1`` signature matches: a third party, a tampered body, a wrong secret.
    BAD_SIGNATURE = "badSignature"
    # Signed longer ago than the tolerance: a replay, or a sender's clock far behind.
    STALE_TIMESTAMP = "staleTimestamp"
    # Signed further ahead than the tolerance: a sender's clock far ahead.
    FUTURE_TIMESTAMP = "futureTimestamp"
    # Verified, but not JSON, or not a generation event (missing field, unknown type).
    BAD_BODY = "badBody"
    # Longer than the receiver's body cap.
    TOO_LARGE = "tooLarge"


# What the sender is told. 4xx makes Svix retry later, which is right for a
# clock problem and harmless for a forgery; 413 and 400 say "do not resend as is".
_REFUSAL_HTTP_STATUS: dict[RefusalReason, int] = {
    RefusalReason.MISSING_HEADERS: 400,
    RefusalReason.BAD_SIGNATURE: 401,
    RefusalReason.STALE_TIMESTAMP: 401,
    RefusalReason.FUTURE_TIMESTAMP: 401,
    RefusalReason.BAD_BODY: 400,
    RefusalReason.TOO_LARGE: 413,
}


class WebhookSecretError(ConfigError):
    """The signing secret is missing or malformed.

    The message names the environment variable, never the value.
    """


class ListenAddressError(ConfigError):
    """A listen address that is not ``HOST:PORT`` (or ``PORT``)."""


class DeliveryRefused(BatcherError):
    """One webhook delivery was refused; the receiver answers ``http_status``."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")

    @property
    def http_status(self) -> int:
        """The HTTP status the receiver answers with."""
        return _REFUSAL_HTTP_STATUS[self.reason]


class VerificationError(DeliveryRefused):
    """The delivery's signing headers, timestamp or signature do not hold."""


class EventError(DeliveryRefused):
    """The body is authentic but not a generation event this receiver understands."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(RefusalReason.BAD_BODY, message)
