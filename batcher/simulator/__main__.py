"""``python -m batcher.simulator``: the same server as ``batcher simulate``."""

from __future__ import annotations

import argparse
import sys

from batcher.simulator.cli import add_arguments, main


def _run() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batcher.simulator",
        description="Serve the embedded Diffio API simulator until interrupted.",
    )
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_run())
