"""Start-up stays light: the command line imports only what a command uses.

Checked in a fresh interpreter (a subprocess), since this test process has
imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("asyncpg", "rich", "mutagen", "aiohttp", "aiohttp.web", "aiolimiter",
         "batcher.simulator.app", "batcher.simulator.server", "batcher.api", "batcher.run")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_command_line_loads_nothing_heavy() -> None:
    loaded = _imported_after("import batcher.cli")
    assert "batcher.cli" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_building_every_parser_loads_no_simulator_server_nor_asyncio() -> None:
    # `batcher --version` and `--help` build the whole parser, the simulator's options too.
    loaded = _imported_after("import batcher.cli\nbatcher.cli.build_parser()")
    assert not loaded & {*HEAVY, "asyncio"}, sorted(loaded & {*HEAVY, "asyncio"})


def test_the_public_api_is_still_there_on_first_use() -> None:
    loaded = _imported_after("import batcher\nassert callable(batcher.run_manifest)\n"
                             "assert batcher.RunResult.__name__ == 'RunResult'")
    assert "batcher.api" in loaded and "asyncpg" not in loaded


def test_what_a_run_imports_leaves_out_the_optional_parts() -> None:
    # A run on a SQLite ledger without webhooks, a bar or file rows: no
    # PostgreSQL driver, no web server (webhook receiver, simulator), no
    # webhook signatures, no terminal UI, no audio probing, and no aiohttp:
    # API requests go over the lean client; aiohttp comes with the first file.
    loaded = _imported_after("import batcher.api\nimport batcher.run.runner")
    optional = {"asyncpg", "aiohttp", "aiohttp.web", "standardwebhooks", "rich", "mutagen",
                "batcher.simulator.app", "batcher.webhooks.receiver", "batcher.ledger.postgres",
                "batcher.storage"}
    assert {"httptools", "batcher.http1"} <= loaded  # the client it does need
    assert not loaded & optional, sorted(loaded & optional)
