"""What can go wrong with webhook deliveries, as knobs of the simulator's sender.

Real deliveries are lost, retried, late and out of order, and anyone who
finds the endpoint can post to it. Each knob is a share in [0, 1] drawn per
event from the sender's seeded random source (so a seed replays the same
faults), or a number of seconds:

- ``drop``: the event is never delivered (the receiver must poll for it).
- ``duplicate``: a second delivery of the same message id, a little later.
- ``delay`` / ``delay_max``: delivered up to ``delay_max`` seconds late,
  which reorders it among the others.
- ``reorder``: held back until the generation's next event has gone out.
- ``forged``: an extra delivery from a third party, signed with a secret of
  its own, claiming the generation failed.
- ``tampered``: an extra copy carrying a valid signature of the genuine body
  but an altered body (the status changed to ``error``), sent first.
- ``replay``: the genuine delivery sent again byte for byte ``replay_after``
  seconds later (same id, timestamp and signature).
- ``stale`` / ``future``: an extra copy, validly signed under a new id, whose
  timestamp is ``skew`` seconds in the past or the future.

Dropping is decided first; a dropped event gets none of the others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batcher.errors import ConfigError

__all__ = ["WebhookFaults"]

_SHARES = ("drop", "duplicate", "delay", "reorder", "forged", "tampered", "replay", "stale",
           "future")
_SECONDS = ("delay_max", "replay_after", "skew")


@dataclass(frozen=True, slots=True)
class WebhookFaults:
    """Fault shares (0..1) and their seconds; all off by default."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    reorder: float = 0.0
    forged: float = 0.0
    tampered: float = 0.0
    replay: float = 0.0
    stale: float = 0.0
    future: float = 0.0
    # Longest extra wait of a delayed event or of a duplicate (seconds).
    delay_max: float = 1.0
    # Wait before a replay (seconds); inside the receiver's tolerance it must be a duplicate.
    replay_after: float = 0.5
    # How far a stale or future timestamp is from now (seconds); past the 5 minutes allowed.
    skew: float = 600.0

    def __post_init__(self) -> None:
        for name in _SHARES:
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"webhook fault {name} is a share between 0 and 1, "
                                  f"got {value!r}")
        for name in _SECONDS:
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"webhook fault {name} is a number of seconds >= 0, "
                                  f"got {value!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WebhookFaults:
        """Build from a config table; names as the fields (``delay-max`` works too)."""
        return cls().patched(data)

    def patched(self, changes: Mapping[str, Any]) -> WebhookFaults:
        """A copy with ``changes`` applied and validated (ConfigError when wrong)."""
        values: dict[str, Any] = {}
        for name, value in changes.items():
            attr = name.strip().replace("-", "_").lower()
            if attr not in _SHARES and attr not in _SECONDS:
                raise ConfigError(f"unknown webhook fault {name!r}")
            values[attr] = float(value) if _is_number(value) else value
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, float]:
        """The knobs as plain data."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
