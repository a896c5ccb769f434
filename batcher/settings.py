"""Run settings: built once from flags, environment and job file, then frozen.

Precedence: command-line flag > environment (``BATCHER_*``) > job
file > default. The API key is kept out of every repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .bandwidth import parse_rate
from .errors import ConfigError
from .models import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "ENV_NAMES", "OPTION_SPECS", "OptionSpec", "Settings", "ledger_for",
           "parse_duration", "resolve"]

DEFAULT_BASE_URL = "https://api.diffio.ai/v1"


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One run option: its job-file key, type, default and environment name."""

    name: str
    kind: type
    default: Any
    help: str
    path: bool = False

    @property
    def env(self) -> str:
        return "BATCHER_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("manifest", str, None, "the manifest (job files only)", path=True),
    OptionSpec("ledger", str, None, "SQLite file path or postgresql:// URL "
               "[<manifest stem>.ledger.sqlite beside the manifest]", path=True),
    OptionSpec("model", str, DEFAULT_MODEL, "model key; requests go to {base}/{KEY}-generation"),
    OptionSpec("rate", float, 10.0, "most API requests per second over any 1 s window"),
    OptionSpec("concurrency", int, 16, "most API requests in flight at once"),
    OptionSpec("poll_interval", float, 5.0, "seconds before the first poll; later polls aim at "
               "each generation's predicted end"),
    OptionSpec("out", str, None, "folder for restored files [<manifest stem>.out/]", path=True),
    OptionSpec("key_namespace", str, "", "mixed into every derived idempotency key"),
    OptionSpec("api_base", str, None, "API base URL (also DIFFIO_API_BASE_URL)"),
    OptionSpec("max_attempts", int, 6, "HTTP attempts per request before a row fails"),
    OptionSpec("timeout", float, 60.0, "seconds before one HTTP request is abandoned"),
    OptionSpec("price_per_minute", float, None, "USD per audio minute, for estimates"),
    OptionSpec("max_spend", float, None, "stop submitting before estimated spend passes USD"),
    OptionSpec("halt_after", float, None, "stop submitting once more than PCT %% of finished "
               "rows failed (after 20)"),
    OptionSpec("report", str, None, "write a JSON report here at the end", path=True),
    OptionSpec("metrics", str, None, "write Prometheus textfile metrics here", path=True),
    OptionSpec("progress_every", float, 10.0, "seconds between plain progress lines off a tty"),
    OptionSpec("lease_ttl", float, 15.0, "shared (PostgreSQL) ledger: seconds a host's leases "
               "outlive its last heartbeat before other hosts take its rows over"),
    OptionSpec("max_bandwidth", str, None, "most bytes per second for uploads and downloads "
               "together, with a K, M or G suffix (512K, 10M) [no cap]"),
    OptionSpec("outage_patience", str, "10m", "how long the API host or the ledger may stay "
               "unreachable before the run halts resumably (exit 3); seconds, or with an "
               "s, m or h suffix (90s, 10m)"),
    OptionSpec("webhook_listen", str, None, "receive the API's signed generation events on "
               "HOST:PORT (a bare PORT binds 127.0.0.1) for the run's duration; polls "
               "become a safety net [off]"),
    OptionSpec("webhook_secret_env", str, None, "the environment variable holding the "
               "endpoint's signing secret (whsec_...); never the secret itself "
               "[BATCHER_WEBHOOK_SECRET]"),
    OptionSpec("webhook_events", str, None, "'ledger': move rows by the webhook events "
               "another process records in this shared ledger (batcher webhooks serve); "
               "polls become a safety net. --webhook-listen implies it [off]"),
    OptionSpec("webhook_poll_ceiling", float, 120.0, "with webhooks: longest wait after a "
               "generation is accepted before it is polled for want of an event"),
)
ENV_NAMES: Mapping[str, str] = {spec.name: spec.env for spec in OPTION_SPECS}
_SPECS = {spec.name: spec for spec in OPTION_SPECS}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything one run needs, resolved and validated."""

    manifest: Path
    ledger: str
    out: Path
    model: str = DEFAULT_MODEL
    rate: float = 10.0
    concurrency: int = 16
    poll_interval: float = 5.0
    key_namespace: str = ""
    api_base: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)
    max_attempts: int = 6
    timeout: float = 60.0
    retry_failed: bool = False
    dry_run: bool = False
    simulate: bool = False
    price_per_minute: float | None = None
    max_spend: float | None = None
    halt_after: float | None = None
    report: Path | None = None
    metrics: Path | None = None
    progress_every: float = 10.0
    lease_ttl: float = 15.0
    # Bytes per second for file transfers, up and down together (None: no cap).
    max_bandwidth: float | None = None
    # Seconds an outage (API host, ledger) is waited out before exit 3.
    outage_patience: float = 600.0
    # --webhook-listen HOST:PORT (None: webhooks off) and the name of the
    # variable holding the secret; the secret itself is never a setting.
    webhook_listen: str | None = None
    webhook_secret_env: str | None = None
    webhook_events: str | None = None
    webhook_poll_ceiling: float = 120.0
    job_file: Path | None = None

    @property
    def webhooks(self) -> bool:
        """Whether rows move by webhook events (and polls are a safety net)."""
        return self.webhook_listen is not None or self.webhook_events == "ledger"

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests, the Python API)."""
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, without the API key, for the ledger."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "api_key":
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _coerce(spec: OptionSpec, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        if spec.kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result: Any = float(value)
        elif spec.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            result = int(value)
        else:
            result = str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: {spec.name} must be a {spec.kind.__name__}, got {value!r}"
        ) from None
    return result


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a job file (TOML); relative paths resolve against its folder."""
    import tomllib  # only runs from a job file pay for the TOML parser

    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file {path}: {exc}") from None
    job = data.get("job", data)
    if not isinstance(job, dict):
        raise ConfigError(f"job file {path}: [job] must be a table")
    values: dict[str, Any] = {}
    for key, raw in job.items():
        name = key.replace("-", "_")
        spec = _SPECS.get(name)
        if spec is None:
            known = ", ".join(sorted(_SPECS))
            raise ConfigError(f"job file {path}: unknown key {key!r} (known: {known})")
        value = _coerce(spec, raw, f"job file {path}")
        if spec.path and value is not None and "://" not in value:
            value = str((path.parent / value).resolve())
        values[name] = value
    return values


def resolve(
    *,
    source: Path,
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    simulate: bool = False,
) -> Settings:
    """Build Settings from a manifest or job file plus flags and environment.

    ``flags`` maps option names to values given on the command line (None =
    not given).
    """
    env = os.environ if env is None else env
    job: dict[str, Any] = {}
    job_file: Path | None = None
    if source.suffix.lower() == ".toml":
        job_file = source.resolve()
        job = load_job_file(job_file)
        if not job.get("manifest"):
            raise ConfigError(f"job file {source}: no manifest given")
        manifest = Path(job["manifest"])
    else:
        manifest = source
    values: dict[str, Any] = {}
    for spec in OPTION_SPECS:
        if spec.name == "manifest":
            continue
        value = flags.get(spec.name)
        if value is not None:
            values[spec.name] = _coerce(spec, value, f"option {spec.flag}")
            continue
        raw = env.get(spec.env)
        if raw in (None, "") and spec.name == "api_base":
            # DIFFIO_API_BASE_URL, the API's own variable, is environment too: it beats
            # the job file.
            raw = env.get("DIFFIO_API_BASE_URL")
        if raw not in (None, ""):
            values[spec.name] = _coerce(spec, raw, f"environment {spec.env}")
            continue
        if spec.name in job:
            values[spec.name] = job[spec.name]
            continue
        values[spec.name] = spec.default

    manifest = manifest.expanduser().resolve()
    stem = manifest.name.split(".")[0] if manifest.name else "manifest"
    ledger = values.pop("ledger") or str(manifest.parent / f"{stem}.ledger.sqlite")
    out_raw = values.pop("out")
    out = Path(out_raw).expanduser() if out_raw else manifest.parent / f"{stem}.out"
    api_base = values.pop("api_base") or env.get("DIFFIO_API_BASE_URL") or DEFAULT_BASE_URL
    report = values.pop("report")
    metrics = values.pop("metrics")
    bandwidth = values.pop("max_bandwidth")
    try:
        max_bandwidth = None if bandwidth in (None, "") else parse_rate(str(bandwidth))
    except ValueError as exc:
        raise ConfigError(f"--max-bandwidth: {exc}") from None
    try:
        outage_patience = parse_duration(str(values.pop("outage_patience")))
    except ValueError as exc:
        raise ConfigError(f"--outage-patience: {exc}") from None
    settings = Settings(
        manifest=manifest,
        ledger=ledger,
        out=out.resolve(),
        api_base=api_base,
        api_key=env.get("DIFFIO_API_KEY", ""),
        retry_failed=retry_failed,
        dry_run=dry_run,
        simulate=simulate,
        report=Path(report) if report else None,
        metrics=Path(metrics) if metrics else None,
        max_bandwidth=max_bandwidth,
        outage_patience=outage_patience,
        job_file=job_file,
        **values,
    )
    _validate(settings)
    if settings.webhook_listen is not None and not (settings.simulate or settings.dry_run):
        # Checked now (exit 2, nothing sent), read again when the receiver starts.
        from .webhooks.secret import load_secret

        load_secret(settings.webhook_secret_env, environ=env)
    return settings


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m`` or ``1.5h`` (ValueError otherwise)."""
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in ("s", "m", "h") else ""
    number = raw[: len(raw) - len(unit)].strip()
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use seconds, or 90s, 10m, 1h)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r}")
    return seconds
# What ``run`` takes as its SOURCE: a manifest, or a job file naming one.
SOURCE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".toml")


def ledger_for(given: str, *, ledger: str | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """The ledger ``status`` and ``export`` read for what they were given.

    ``given`` is what ``run`` takes (a manifest or job file: its ledger is
    found as ``run`` finds it, ``--ledger`` first, then ``BATCHER_LEDGER``,
    the job file, and ``<manifest stem>.ledger.sqlite`` beside the manifest)
    or a ledger itself (a SQLite path, a ``postgresql://`` URL), returned
    as is. No API key is needed to find a ledger.
    """
    env = os.environ if env is None else env
    if "://" in given or Path(given).suffix.lower() not in SOURCE_SUFFIXES:
        return given
    flags = {"ledger": ledger}
    # A dry run needs no key; only the ledger of the resolved settings is used.
    return resolve(source=Path(given), flags=flags, env=env, dry_run=True).ledger


def _validate(s: Settings) -> None:
    if not s.rate > 0:
        raise ConfigError(f"--rate must be above 0, got {s.rate}")
    if s.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {s.concurrency}")
    if s.poll_interval < 0:
        raise ConfigError(f"--poll-interval must not be negative, got {s.poll_interval}")
    if s.max_attempts < 1:
        raise ConfigError(f"--max-attempts must be at least 1, got {s.max_attempts}")
    if not s.model.strip():
        raise ConfigError("--model must not be empty")
    if s.max_spend is not None and s.max_spend < 0:
        raise ConfigError(f"--max-spend must not be negative, got {s.max_spend}")
    if s.max_spend is not None and s.price_per_minute is None:
        raise ConfigError("--max-spend needs --price-per-minute to estimate what a "
                          "generation costs (the API publishes no prices)")
    if s.price_per_minute is not None and s.price_per_minute < 0:
        raise ConfigError(f"--price-per-minute must not be negative, got {s.price_per_minute}")
    if s.max_bandwidth is not None and not s.max_bandwidth > 0:
        raise ConfigError(f"--max-bandwidth must be above 0, got {s.max_bandwidth}")
    if s.lease_ttl < 3:
        raise ConfigError(f"--lease-ttl must be at least 3 seconds, got {s.lease_ttl}")
    if s.halt_after is not None and not 0 <= s.halt_after <= 100:
        raise ConfigError(f"--halt-after must be a percentage 0-100, got {s.halt_after}")
    if s.webhook_poll_ceiling <= 0:
        raise ConfigError(f"--webhook-poll-ceiling must be above 0, got {s.webhook_poll_ceiling}")
    if s.webhook_events not in (None, "", "ledger"):
        raise ConfigError(f"--webhook-events takes 'ledger', got {s.webhook_events!r}")
    if s.webhook_listen is not None:
        from .webhooks.server import parse_listen

        parse_listen(s.webhook_listen)
    if not (s.dry_run or s.simulate) and not s.api_key:
        raise ConfigError(
            "DIFFIO_API_KEY is not set (use --simulate to rehearse without a key)"
        )
