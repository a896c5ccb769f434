"""Every knob of the simulator, in one frozen dataclass.

A :class:`SimConfig` is built once (defaults, then a JSON/TOML file, then
flags) and replaced wholesale when a test or ``POST /_sim/config`` patches
it; nothing reads a knob from anywhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.bandwidth import parse_rate
from batcher.errors import ConfigError
from batcher.simulator.catalog import API_GENERATIONS, ApiGeneration, api_for_model

__all__ = [
    "DEFAULT_API_KEY",
    "KeySpec",
    "SimConfig",
    "download_ttl_for",
    "load_config_file",
    "parse_size",
    "run_config",
]

DEFAULT_API_KEY = "sim-key"
MIB = 1024 * 1024
# Download URL lifetimes when ``download_ttl`` is not set, per API generation.
_DOWNLOAD_TTL: dict[ApiGeneration, float] = {"seed": 7200.0, "current": 6 * 3600.0}

Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One API key the simulator accepts.

    ``active=False`` answers 403 on every request; ``read``/``write`` are the
    seed era's legacy permission object; ``spend_limit_usd`` makes the key
    "restricted" (402 once ``used + pending + estimate`` would pass it).
    """

    active: bool = True
    read: bool = True
    write: bool = True
    spend_limit_usd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data."""
        return dataclasses.asdict(self)

    def patched(self, changes: Mapping[str, Any]) -> KeySpec:
        """A copy with ``changes`` (field name -> value) applied, validated."""
        values = self.to_dict()
        for name, value in changes.items():
            attr = _norm(name)
            if attr not in values:
                raise ConfigError(f"unknown API key setting {name!r}")
            values[attr] = value
        for flag in ("active", "read", "write"):
            if not isinstance(values[flag], bool):
                raise ConfigError(f"API key setting {flag!r} must be true or false")
        limit = values["spend_limit_usd"]
        if limit is not None:
            limit = _number("spend_limit_usd", limit, minimum=0.0)
        return KeySpec(values["active"], values["read"], values["write"], limit)


def _default_keys() -> dict[str, KeySpec]:
    return {DEFAULT_API_KEY: KeySpec()}


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulator's knobs; the defaults make a friendly demo server.

    Rates are shares in [0, 1], drawn independently per request from the
    seeded random source; ranges are ``(min, max)`` seconds drawn uniformly.
    """

    # Which API generation is served: "current" (4.6 models, uploads in parts)
    # or "seed" (3.5 models, one signed PUT). Switchable while serving.
    api: ApiGeneration = "current"
    # API keys accepted, key -> its state, permissions and spend limit.
    api_keys: Mapping[str, KeySpec] = field(default_factory=_default_keys)
    # Extra wait before every /v1 answer (seconds).
    latency: Range = (0.0, 0.0)
    # Share of /v1 requests answered 500 before anything is created.
    error_rate: float = 0.0
    # Share of generation requests whose answer is lost after create and charge.
    lost_rate: float = 0.0
    # Share of /v1 requests answered by a proxy's HTML 502 page.
    html_rate: float = 0.0
    # Share of /v1 200 answers whose JSON body is cut short (after the work).
    truncated_rate: float = 0.0
    # Most requests per key in any sliding 1 s window; above it 429.
    rate_limit: float | None = None
    # How long a generation takes from create to complete/failed (seconds).
    duration: Range = (1.0, 3.0)
    # Share of generations that end `failed`.
    failure_rate: float = 0.0
    # USD per second of audio (60 s minimum) when the upload is a readable WAV.
    price_per_second: float = 0.001
    # USD per generation when the project holds no readable WAV.
    flat_price: float = 0.06
    # Lifetime of the seed's signed upload URLs (seconds).
    upload_ttl: float = 3600.0
    # Lifetime of signed download URLs; None: 2 h (seed) or 6 h (current).
    download_ttl: float | None = None
    # The current API's upload sessions: partSizeBytes and maxBytes that
    # create_project hands out, and how long a session lasts. The lifetime is
    # read live, so shortening it expires sessions already handed out.
    part_size: int = 32 * MIB
    max_upload_bytes: int = 2048 * MIB
    upload_session_ttl: float = 3600.0
    # partSizeBytes in the upload host's start answer, overriding the
    # session's (None: the start answer repeats the session's).
    edge_part_size: int | None = None
    # Faults of the upload host's part PUTs: a share answered 500 before the
    # part is stored, a share whose answer is lost after it is stored, and
    # extra seconds before each part is answered.
    part_error_rate: float = 0.0
    part_lost_rate: float = 0.0
    part_latency: Range = (0.0, 0.0)
    # Seed of the one random source (ids, durations, failures, faults).
    seed: int = 0
    # Create unknown apiProjectIds on a generation request (batcher run --simulate).
    auto_create_projects: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SimConfig:
        """Build a config from a JSON/TOML-style mapping over the defaults.

        Keys are the field names (``error_rate``; ``error-rate`` also works).
        ``api_keys`` is a table ``{key: {active, read, write, spend_limit_usd}}``
        or a list of keys with default settings; when given, it replaces the
        default ``sim-key``. Raises ``ConfigError``.
        """
        base = cls()
        if any(_norm(name) == "api_keys" for name in data):
            # Keys named in a file replace the demo key rather than join it.
            base = dataclasses.replace(base, api_keys={})
        return base.patched(data)

    def patched(self, changes: Mapping[str, Any]) -> SimConfig:
        """A copy with ``changes`` applied; ``api_keys`` entries are merged.

        An ``api_keys`` entry that is a mapping updates that key's settings
        (creating the key when new), a :class:`KeySpec` replaces them, and
        ``None`` removes the key.
        """
        values: dict[str, Any] = {}
        for name, raw in changes.items():
            attr = _norm(name)
            if attr not in _FIELDS:
                raise ConfigError(f"unknown simulator setting {name!r}")
            if attr == "api_keys":
                values[attr] = _merge_keys(self.api_keys, raw)
            else:
                values[attr] = _coerce(attr, raw)
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (ranges as two-element lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_keys":
                value = {k: spec.to_dict() for k, spec in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_FIELDS = frozenset(f.name for f in dataclasses.fields(SimConfig))
_RATES = frozenset({
    "error_rate", "lost_rate", "html_rate", "truncated_rate", "failure_rate",
    "part_error_rate", "part_lost_rate",
})
_RANGES = frozenset({"latency", "duration", "part_latency"})
_AMOUNTS = frozenset({"price_per_second", "flat_price", "upload_ttl", "upload_session_ttl"})
_SIZES = frozenset({"part_size", "max_upload_bytes"})


def download_ttl_for(config: SimConfig) -> float:
    """Seconds a fresh download URL stays valid under ``config``."""
    if config.download_ttl is not None:
        return config.download_ttl
    return _DOWNLOAD_TTL[config.api]


def run_config(base: SimConfig | Mapping[str, Any] | None, model_key: str) -> SimConfig:
    """The config of the simulator ``batcher run --simulate`` starts.

    ``base`` is a config, a ``--sim-config`` file's mapping, or None for the
    defaults; the API generation is the one that serves ``model_key``.
    """
    if base is None:
        config = SimConfig()
    elif isinstance(base, SimConfig):
        config = base
    else:
        config = SimConfig.from_mapping(base)
    return dataclasses.replace(config, api=api_for_model(model_key))


def _norm(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def _number(name: str, value: Any, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return number


def parse_range(name: str, value: Any) -> Range:
    """``"0.1,0.5"``, ``[0.1, 0.5]`` or a single number ``x`` (meaning x..x)."""
    parts: list[Any]
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = [value]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ConfigError(f"{name} must be 'MIN,MAX' or one number, got {value!r}")
    low, high = (_number(name, p, minimum=0.0) for p in parts)
    if low > high:
        raise ConfigError(f"{name}: minimum {low} is above maximum {high}")
    return (low, high)


def parse_size(name: str, value: Any) -> int:
    """A byte count: a whole number, or text with a K, M or G suffix (powers of 1024)."""
    problem = f"{name} must be a whole number of bytes such as 4096 or 32M, got {value!r}"
    if isinstance(value, str):
        try:
            number = parse_rate(value)  # the same suffixes as --max-bandwidth
        except ValueError:
            raise ConfigError(problem) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ConfigError(problem)
    if not number.is_integer() or number < 1:
        raise ConfigError(problem)
    return int(number)


def _coerce(attr: str, value: Any) -> Any:
    if attr == "api":
        api = value.strip().lower() if isinstance(value, str) else value
        if api not in API_GENERATIONS:
            raise ConfigError(f"api must be one of {', '.join(API_GENERATIONS)}, got {value!r}")
        return api
    if attr in _SIZES:
        return parse_size(attr, value)
    if attr == "edge_part_size":
        return None if value is None or value == 0 else parse_size(attr, value)
    if attr == "download_ttl":
        return None if value is None else _number(attr, value, minimum=0.0)
    if attr in _RATES:
        rate = _number(attr, value, minimum=0.0)
        if rate > 1.0:
            raise ConfigError(f"{attr} is a share between 0 and 1, got {value!r}")
        return rate
    if attr in _RANGES:
        return parse_range(attr, value)
    if attr in _AMOUNTS:
        return _number(attr, value, minimum=0.0)
    if attr == "rate_limit":
        if value is None or value == 0:
            return None
        limit = _number(attr, value, minimum=0.0)
        return limit
    if attr == "seed":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"seed must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"seed must be an integer, got {value!r}") from None
    if attr == "auto_create_projects":
        if not isinstance(value, bool):
            raise ConfigError(f"auto_create_projects must be true or false, got {value!r}")
        return value
    raise ConfigError(f"unknown simulator setting {attr!r}")  # pragma: no cover


def _merge_keys(current: Mapping[str, KeySpec], raw: Any) -> dict[str, KeySpec]:
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list | tuple):
        raw = {key: {} for key in raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("api_keys must be a table of key -> settings or a list of keys")
    merged = dict(current)
    for key, spec in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError("API keys must be non-empty strings")
        if spec is None:
            merged.pop(key, None)
        elif isinstance(spec, KeySpec):
            merged[key] = spec
        elif isinstance(spec, Mapping):
            merged[key] = merged.get(key, KeySpec()).patched(spec)
        else:
            raise ConfigError("each API key's settings must be a table")
    return merged


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.json`` or ``.toml`` config file into a mapping (ConfigError if bad)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read simulator config {p}: {exc.strerror}") from None
    import json  # the parsers only when a knob file is read: every run builds this parser
    import tomllib

    try:
        data: Any = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"simulator config {p} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"simulator config {p} must hold a table of settings")
    return data
