"""The stages of a run, one module each, wired by :mod:`batcher.run.runner`."""

from .runner import Runner, RunResult

__all__ = ["RunResult", "Runner"]
