"""Idempotency keys and row identities, as pure functions of a row's content.

A derived key is a hash of the canonical request content (model, source,
sampling, params, key namespace); never random, never time-based. The same
content gives the same key on every machine and run, so a resumed run
re-posts with the key the API already knows and is not charged again.
Numbers compare by value (``7 == 7.0``), dict key order does not matter, and
a model alias is its target (``diffio-4.5-flash`` is ``diffio-4.6-flash``,
``diffio-3.4`` is ``diffio-3.5``: see :mod:`batcher.models`).

A row's default *identity* (``rowId``) is derived the same way but from what
the user wrote (the file path rather than the file's bytes), so editing an
audio file keeps its rowId while its key changes.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .models import normalize_model

__all__ = [
    "KEY_PREFIX",
    "ROW_ID_PREFIX",
    "FileSource",
    "HashSet64",
    "ProjectSource",
    "RowIdAssigner",
    "Source",
    "canonical_json",
    "derive_key",
    "derive_row_id",
    "normalize_model",
    "request_digest",
    "request_group",
    "sha256_file",
]

# Bump the version inside the hashed payload (and this prefix) only together:
# any change to what is hashed changes every derived key, i.e. pays again.
KEY_PREFIX = "bk1-"
ROW_ID_PREFIX = "r-"
_ROW_ID_HEX = 20  # 80 bits: collisions among 10^6 rows are ~1e-12 likely

# orjson writes integers in this range natively; outside it we write the
# exact decimal digits ourselves, so every integral value has one spelling.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
# orjson refuses to write deeper than 254 levels, and recursing deeper than
# Python's stack allows would raise RecursionError: refuse early, as a value.
_MAX_DEPTH = 128

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ProjectSource:
    """An existing Diffio project named by an ``apiProjectId`` row."""

    api_project_id: str


@dataclass(frozen=True, slots=True)
class FileSource:
    """A local file, known by the sha256 of its bytes (not its name)."""

    sha256: str


Source = ProjectSource | FileSource


def _normalize(value: Any, depth: int = 0) -> Any:
    """Return ``value`` in its one canonical spelling (see canonical_json)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
    # The exact types a manifest gives, first: an exact-type test is a
    # fraction of isinstance against a union or an ABC, and every row's
    # sampling and params pass here.
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int and _INT_MIN <= value <= _INT_MAX:
        return value
    if kind is dict:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str and not isinstance(k, str):
                raise TypeError(f"object keys must be strings, got {type(k).__name__}")
            out[k] = _normalize(v, depth + 1)
        return out
    # bool is a subclass of int: test it first so True stays true, not 1.
    if isinstance(value, bool | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number")
        if not value.is_integer():
            return value
        value = int(value)  # 7.0 -> 7 and -0.0 -> 0: numbers compare by value
    if isinstance(value, int):
        if _INT_MIN <= value <= _INT_MAX:
            return int(value)  # plain int, also for int subclasses (IntEnum)
        return orjson.Fragment(str(int(value)).encode("ascii"))
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"object keys must be strings, got {type(k).__name__}")
            out[k] = _normalize(v, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_normalize(v, depth + 1) for v in value]
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj``: equal values give equal bytes.

    Object keys are sorted at every level; numbers are written by value, so an
    integral float is written as the integer (``7.0`` as ``7``, ``-0.0`` as
    ``0``) while bools stay ``true``/``false``. Raises ValueError for NaN,
    infinities, strings that are not valid Unicode and excessive nesting, and
    TypeError for values JSON cannot hold (non-string keys, sets, objects).
    """
    normal = _normalize(obj)
    try:
        return orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        # Types were checked above, so what is left is a bad value (surrogates).
        raise ValueError(str(exc)) from exc


def _source_json(source: Source) -> dict[str, str]:
    if isinstance(source, ProjectSource):
        return {"apiProjectId": source.api_project_id}
    return {"fileSha256": source.sha256}


def derive_key(
    *,
    model: str,
    source: Source,
    sampling: Mapping[str, Any],
    params: Mapping[str, Any],
    namespace: str = "",
    retry: int = 0,
) -> str:
    """The derived idempotency key of one logical request.

    ``retry`` > 0 gives the key of the n-th deliberate retry of a failed
    request (``--retry-failed``): the API replays a failed generation forever,
    so a retry needs a new key, and deriving it from a counter the ledger keeps
    means a crash during the retry still cannot charge twice. The result is
    ``"bk1-"`` and 64 hex digits, well inside the API's 1–255 characters.
    """
    if retry < 0:
        raise ValueError(f"retry must be >= 0, got {retry}")
    payload: dict[str, Any] = {
        "v": 1,
        "model": normalize_model(model),
        "source": _source_json(source),
        "sampling": sampling,
        "params": params,
        "ns": namespace,
    }
    # Absent rather than 0, so keys of first attempts need no retry field.
    if retry:
        payload["retry"] = retry
    return KEY_PREFIX + hashlib.sha256(canonical_json(payload)).hexdigest()


def derive_row_id(
    *,
    model: str,
    source_identity: str,
    sampling: Mapping[str, Any],
    params: Mapping[str, Any],
    explicit_key: str | None,
    namespace: str,
) -> str:
    """A row's default identity (``rowId`` before duplicate suffixes).

    ``source_identity`` is the apiProjectId of a project row, or for a file row
    the path as written relative to the manifest's folder (POSIX form): the
    rowId follows what the user wrote, so a file edited in place keeps its row
    while its key (from the file's bytes) changes. Returns ``"r-"`` and 20 hex
    digits.
    """
    payload = {
        "v": 1,
        "model": normalize_model(model),
        "source": source_identity,
        "sampling": sampling,
        "params": params,
        "key": explicit_key,
        "ns": namespace,
    }
    digest = hashlib.sha256(canonical_json(payload)).hexdigest()
    return ROW_ID_PREFIX + digest[:_ROW_ID_HEX]


def request_digest(*, model: str, source_id: str, sampling: Mapping[str, Any],
                   params: Mapping[str, Any]) -> str:
    """What a request asks for (model, source, sampling, params), as 32 hex digits.

    ``source_id`` is ``sha256:<hex>`` of a file's bytes or ``project:<id>``.
    Two rows with one key but different digests ask for different things.
    """
    request = {"model": normalize_model(model), "source": source_id,
               "sampling": sampling, "params": params}
    return hashlib.sha256(canonical_json(request)).hexdigest()[:32]


def request_group(key: str, source_id: str) -> str:
    """The identity of one logical request at the API: its key and its source.

    Derived keys already hash the source; an explicit key needs it added.
    Rows of one group are one request: one of them sends it, the others
    follow (see :mod:`batcher.run.followers`).
    """
    return f"{key}|{source_id}"


def _hash64(text: str) -> int:
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashSet64:
    """A set of 64-bit hashes in one ``array('Q')``: 16–32 bytes per member.

    A Python ``set[int]`` spends about 70 bytes per member (a 32-byte int
    object plus its slot in a table kept at most 60 % full). Here a member is
    its 8 bytes, in an open-addressing table with linear probing that is kept
    at most half full and doubles when it would pass that; 0 marks an empty
    slot, so the hash 0 is stored as 1 (one more harmless collision of the
    kind :class:`RowIdAssigner` already accepts). The hashes must be uniform
    in their low bits (they pick the slot), as blake2b's are.
    """

    __slots__ = ("_limit", "_mask", "_n", "_slots")

    def __init__(self, capacity: int = 1024) -> None:
        size = 8
        while size < capacity:
            size *= 2
        self._slots = array("Q", [0]) * size
        self._mask = size - 1
        self._limit = size // 2  # the most members before the table doubles
        self._n = 0

    def add(self, h: int) -> bool:
        """Add ``h`` (0 <= h < 2**64); True if it was not a member yet."""
        h = h or 1
        slots, mask = self._slots, self._mask
        i = h & mask
        while cur := slots[i]:
            if cur == h:
                return False
            i = (i + 1) & mask
        if self._n >= self._limit:
            self._grow()
            return self.add(h)
        slots[i] = h
        self._n += 1
        return True

    def __contains__(self, h: object) -> bool:
        if not isinstance(h, int):
            return False
        h = h or 1
        slots, mask = self._slots, self._mask
        i = h & mask
        while cur := slots[i]:
            if cur == h:
                return True
            i = (i + 1) & mask
        return False

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<HashSet64 members={self._n} capacity={len(self._slots)}>"

    @property
    def capacity(self) -> int:
        """Slots in the table (a power of two, at least twice the members)."""
        return len(self._slots)

    def _grow(self) -> None:
        old = self._slots
        size = 2 * len(old)
        slots = array("Q", [0]) * size
        mask = size - 1
        for h in filter(None, old):  # the members; filter skips empty slots in C
            i = h & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = h
        self._slots, self._mask, self._limit = slots, mask, size // 2


class RowIdAssigner:
    """Makes row ids unique in manifest order: ``id``, ``id~2``, ``id~3``, …

    Feed every row's base id (derived or explicit) in manifest order. The first
    occurrence keeps its id; later ones get the next free suffix. An id already
    taken, e.g. an explicit ``a~2`` before the second ``a``, is skipped.

    Memory stays small for 10^6 rows: the 64-bit hashes of the ids given out
    in a :class:`HashSet64` (16–32 bytes per row; 10^6 rows take 16 MB) and a
    dict only for base ids seen twice. A 64-bit collision (about 1 in 4·10^7
    for 10^6 rows) would give a unique row a suffix it does not need:
    harmless, and the same on every run.
    """

    __slots__ = ("_next", "_seen")

    def __init__(self) -> None:
        self._seen = HashSet64()
        self._next: dict[int, int] = {}  # base id hash -> last suffix given

    def assign(self, base_id: str) -> str:
        """The unique id for the next row whose base id is ``base_id``."""
        base_hash = _hash64(base_id)
        if self._seen.add(base_hash):
            return base_id
        n = self._next.get(base_hash, 1)
        while True:
            n += 1
            candidate = f"{base_id}~{n}"
            if self._seen.add(_hash64(candidate)):
                break
        self._next[base_hash] = n
        return candidate

    def __repr__(self) -> str:
        return f"<RowIdAssigner ids={len(self._seen)} repeated={len(self._next)}>"


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest and size in bytes of a file, read in 1 MiB chunks.

    OSError (missing, unreadable) propagates: the caller fails the row.
    """
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size
