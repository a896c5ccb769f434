"""The events hook: each new generation's planned status changes, told to observers.

A generation's fate (duration, failure) is drawn when it is created, so its
whole timeline is known at once: ``queued`` at creation, ``processing`` when
it leaves the queue, then ``complete`` or ``failed``. Whatever needs to act on
status changes (a webhook sender, a test) registers a
:class:`GenerationObserver` with :meth:`Simulator.add_observer
<batcher.simulator.app.Simulator.add_observer>` and is told each new
generation's :class:`GenerationTimeline` right after the generation is
created and charged; replays of an existing generation tell nothing::

    class Printer:
        def generation_created(self, timeline: GenerationTimeline) -> None:
            for change in timeline.changes:
                print(timeline.generation_id, change.status, change.at)

    sim.add_observer(Printer())

Times come in both of the simulator's clocks: ``at`` on the injected
monotonic clock (``Simulator.state.clock``, the one :meth:`Generation.phase
<batcher.simulator.model.Generation.phase>` reads: asking for progress at
``at`` or later shows the new status), and ``wall`` in unix seconds
(``Simulator.state.wall``) for timestamps in payloads. Statuses use the
progress vocabulary (``queued``, ``processing``, ``complete``, ``failed``); a
webhook says ``error`` where progress says ``failed``. Changes that fall on the same instant (a zero
duration) are all listed, in order.

Observers are called synchronously inside the request that created the
generation: they must be quick and must not block (schedule work, do not do
it). An observer that raises is logged and skipped; the generation stands.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from batcher.ops.logs import SIMULATOR_OBSERVER_FAILED, event
from batcher.simulator.model import Generation

__all__ = [
    "GenerationObserver",
    "GenerationTimeline",
    "StatusChange",
    "api_key_id",
    "notify",
    "timeline_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """One planned status change of a generation."""

    status: str  # queued | processing | complete | failed
    at: float  # injected clock time at which it takes effect
    wall: float  # the same instant in unix seconds
    error: str | None = None  # failed only: the summary progress shows
    error_details: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationTimeline:
    """A new generation and every status change it will go through."""

    generation_id: str
    api_project_id: str
    model_key: str
    # A stable pseudonym of the owning key, for payloads (``apiKeyId``).
    api_key_id: str
    changes: tuple[StatusChange, ...]
    has_video: bool = False
    # The owning API key itself, to find that key's webhook settings; it must
    # never be written into a payload, a log or a repr.
    api_key: str = field(default="", repr=False)


class GenerationObserver(Protocol):
    """Told about each generation the simulator creates."""

    def generation_created(self, timeline: GenerationTimeline) -> None:
        """Called once per new generation, right after it is created and charged."""


def api_key_id(api_key: str) -> str:
    """A stable id for an API key that does not reveal the key."""
    return "key_" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


def timeline_of(gen: Generation) -> GenerationTimeline:
    """The planned timeline of ``gen`` (a pure function of the generation)."""

    def wall(at: float) -> float:
        return gen.created_wall + (at - gen.started)

    final = gen.final_phase()
    changes = (
        StatusChange("queued", gen.started, gen.created_wall),
        StatusChange("processing", gen.processing_at, wall(gen.processing_at)),
        StatusChange(final.status, gen.ends_at, wall(gen.ends_at), final.error,
                     final.error_details),
    )
    return GenerationTimeline(
        generation_id=gen.generation_id,
        api_project_id=gen.api_project_id,
        model_key=gen.model_key,
        api_key_id=api_key_id(gen.owner),
        changes=changes,
        api_key=gen.owner,
    )


def notify(observers: Iterable[GenerationObserver], gen: Generation) -> None:
    """Tell every observer about ``gen``; one that raises is logged, not fatal."""
    timeline: GenerationTimeline | None = None
    for observer in observers:
        timeline = timeline or timeline_of(gen)
        try:
            observer.generation_created(timeline)
        except Exception:
            # The generation is created and charged; a broken observer must
            # not turn that into an error answer the client would retry.
            log.exception("an observer of generation %s failed", gen.generation_id,
                          extra=event(SIMULATOR_OBSERVER_FAILED,
                                      generation_id=gen.generation_id))
