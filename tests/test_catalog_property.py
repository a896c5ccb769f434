"""A catalog lived with for several nights, as a property: pay once, restore right.

Hypothesis draws a small catalog of WAV files (3-6, tiny, each its own audio)
and a few "nights". Each night changes the manifest and the files the way
real catalogs change (rows reordered; a file duplicated under another name
or folder; ``take.flac`` beside ``take.wav``; a file edited, same length or
not; a file renamed with its row; the leading row of a set of duplicates
removed; a row's prompt or seed changed; explicit ``id``s, and a changed
request under the same ``id``; rows naming existing projects), then runs
``batcher run`` as a real subprocess, to its end or SIGKILLed after a drawn
delay, optionally with ``--retry-failed``. One simulator process, one ledger
and one ``--out`` serve every night of an example.

After a final clean run, :class:`CatalogModel` (the test's own record of what
it did, not a copy of batcher's logic) says what batcher owes:

* the simulator charged each logical request at most once, and exactly the
  requests that were needed: every request of a night that ran to its end,
  plus any of the requests of a killed night (which may or may not have been
  posted before the kill; that is why the count is a pair of bounds rather
  than one number when a night was killed);
* every row is complete and the exit status is 0;
* every file row's output exists, is a regular file of its own (no two rows
  share one) and is the simulator's restoration of the bytes its file has now;
* no run wrote anything outside ``--out`` (besides the ledger).

Runs are few in CI (``BATCHER_PROPERTY_EXAMPLES``, default 10), derandomized,
without shrinking. To hunt for failures at length, randomly, with the
minimal example shrunk::

    BATCHER_PROPERTY_EXAMPLES=500 BATCHER_PROPERTY_RANDOM=1 BATCHER_PROPERTY_SHRINK=1 \\
        python -m pytest tests/test_catalog_property.py -p no:randomly -x
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from catalog_helpers import job_args, ledger_of, sha256, tree_snapshot, write_csv_manifest
from conftest import export_records, kill_repeatedly, run_batcher, start_simulator, write_wav
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from batcher.models import DEFAULT_MODEL
from batcher.simulator import logical_request_key, restored_audio

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("BATCHER_PROPERTY_EXAMPLES", "10"))
RANDOM = os.environ.get("BATCHER_PROPERTY_RANDOM") == "1"
SHRINK = os.environ.get("BATCHER_PROPERTY_SHRINK") == "1"

# Where catalog files live, relative to the manifest's folder; the last two
# are outside it, where only a file's name is left to tell it apart.
FOLDERS = ("", "a/", "b/a/", "../rec/day1/", "../rec/day2/")
PROMPTS = ("clean", "less hiss")
SEEDS = (1, 2)
RATE = 8000  # WAV samples (2 bytes each) per second

# One logical request: (source, prompt, seed); source is "sha256:<hex>" of a
# file's bytes or "project:<apiProjectId>".
Request = tuple[str, str, int]


# ------------------------------------------------------------------ the model


@dataclass
class Row:
    """One manifest row as the test wrote it."""

    file: str | None = None  # relative to the manifest's folder
    project: str | None = None
    prompt: str = PROMPTS[0]
    seed: int = SEEDS[0]
    id: str | None = None

    def cells(self) -> dict[str, str]:
        """The row's CSV cells."""
        return {"id": self.id or "", "file": self.file or "", "apiProjectId": self.project or "",
                "prompt": self.prompt, "seed": str(self.seed)}


class CatalogModel:
    """The test's record of one catalog job, and what batcher therefore owes.

    ``files`` is every source file on disk (relative path -> bytes) and
    ``rows`` the manifest, both kept in step with the disk by the methods
    below, the only way the test changes either. ``needed`` holds the
    requests of runs that ended by themselves, ``maybe`` those of killed runs.
    """

    def __init__(self, job: Path) -> None:
        self.job = job
        self.manifest = job / "m.csv"
        self.out = job / "m.out"
        self.files: dict[str, bytes] = {}
        self.rows: list[Row] = []
        self.needed: set[Request] = set()
        self.maybe: set[Request] = set()
        self._fresh = itertools.count()

    # -- files and rows ---------------------------------------------------

    def fresh(self) -> int:
        """A number never handed out before in this job (names, ids, audio)."""
        return next(self._fresh)

    def write_audio(self, rel: str, samples: int) -> None:
        """Write ``rel``: ``samples`` of audio no other file of this job ever had."""
        freq = 150.0 + 23.0 * self.fresh()  # stays far below RATE / 2
        # Half a sample more, so float rounding cannot lose the last one.
        seconds = (samples + 0.5) / RATE
        self.files[rel] = write_wav(self.job / rel, seconds=seconds, freq=freq,
                                    rate=RATE).read_bytes()

    def copy_file(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst`` byte for byte."""
        (self.job / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.job / src, self.job / dst)
        self.files[dst] = self.files[src]

    def rename_file(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``; every row naming ``src`` now names ``dst``."""
        (self.job / dst).parent.mkdir(parents=True, exist_ok=True)
        (self.job / src).rename(self.job / dst)
        self.files[dst] = self.files.pop(src)
        for row in self.rows:
            if row.file == src:
                row.file = dst

    def free_name(self, folder: str, name: str) -> str:
        """``folder + name`` if no file has it, else a fresh name in ``folder``."""
        rel = folder + name
        if rel in self.files:
            rel = f"{folder}take{self.fresh()}{PurePosixPath(name).suffix}"
        return rel

    def samples(self, rel: str) -> int:
        """How many samples ``rel`` holds (after its 44-byte WAV header)."""
        return (len(self.files[rel]) - 44) // 2

    def write_manifest(self) -> None:
        write_csv_manifest(self.manifest, [row.cells() for row in self.rows])

    # -- what batcher owes --------------------------------------------------

    def request(self, row: Row) -> Request:
        """The logical request a row asks for, with its file as it is now."""
        if row.file is not None:
            return (f"sha256:{sha256(self.files[row.file])}", row.prompt, row.seed)
        return (f"project:{row.project}", row.prompt, row.seed)

    def ran(self, *, to_its_end: bool) -> None:
        """Record a run over the manifest as it is now."""
        asked = {self.request(row) for row in self.rows}
        (self.needed if to_its_end else self.maybe).update(asked)

    @staticmethod
    def charge_key(request: Request) -> str:
        """The simulator's name of a request in its ``charges_by_request``."""
        source, prompt, seed = request
        _, _, value = source.partition(":")
        # An apiProjectId row's project holds no upload: its id is its source.
        return logical_request_key(DEFAULT_MODEL, value, {"seed": seed}, {"prompt": prompt})


# ---------------------------------------------------- what can change a night


def file_rows(model: CatalogModel) -> list[Row]:
    return [row for row in model.rows if row.file is not None]


def pick(items: list[Any], index: int) -> Any:
    return items[index % len(items)] if items else None


@dataclass(frozen=True)
class Reorder:
    """The listing comes sorted another way."""

    seed: int

    def apply(self, model: CatalogModel) -> None:
        random.Random(self.seed).shuffle(model.rows)


@dataclass(frozen=True)
class OnFileRow:
    """A change to the ``row``-th file row (counted round); none without file rows."""

    row: int

    def apply(self, model: CatalogModel) -> None:
        row = pick(file_rows(model), self.row)
        if row is not None:
            self.change(model, row)

    def change(self, model: CatalogModel, row: Row) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Duplicate(OnFileRow):
    """A copy of a row's file (same bytes) under another folder or name, with its own row."""

    folder: int
    at: int

    def change(self, model: CatalogModel, row: Row) -> None:
        assert row.file is not None
        rel = model.free_name(FOLDERS[self.folder % len(FOLDERS)], PurePosixPath(row.file).name)
        model.copy_file(row.file, rel)
        copy = Row(file=rel, prompt=row.prompt, seed=row.seed)
        model.rows.insert(self.at % (len(model.rows) + 1), copy)


@dataclass(frozen=True)
class Clash(OnFileRow):
    """``take.flac`` appears beside ``take.wav`` (same stem), with a row."""

    same_bytes: bool

    def change(self, model: CatalogModel, row: Row) -> None:
        assert row.file is not None
        path = PurePosixPath(row.file)
        rel = str(path.with_suffix(".flac" if path.suffix == ".wav" else ".wav"))
        if rel in model.files:
            return
        if self.same_bytes:
            model.copy_file(row.file, rel)
        else:
            model.write_audio(rel, model.samples(row.file))
        model.rows.insert(model.rows.index(row) + 1, Row(file=rel))


@dataclass(frozen=True)
class Edit(OnFileRow):
    """A row's file gets new audio in place, of the same length or not."""

    same_length: bool

    def change(self, model: CatalogModel, row: Row) -> None:
        assert row.file is not None
        samples = model.samples(row.file)
        model.write_audio(row.file, samples if self.same_length else samples + 160)


@dataclass(frozen=True)
class Rename(OnFileRow):
    """A row's file moves to another name or folder, and its row follows."""

    folder: int

    def change(self, model: CatalogModel, row: Row) -> None:
        assert row.file is not None
        folder = FOLDERS[self.folder % len(FOLDERS)]
        rel = model.free_name(folder, f"take{model.fresh()}{PurePosixPath(row.file).suffix}")
        model.rename_file(row.file, rel)


@dataclass(frozen=True)
class RemoveLeader:
    """The first of several rows asking the same thing leaves the manifest.

    Without such duplicates, some row leaves (one row always stays).
    """

    row: int

    def apply(self, model: CatalogModel) -> None:
        requests = [model.request(row) for row in model.rows]
        repeated = [r for r in dict.fromkeys(requests) if requests.count(r) > 1]
        if repeated:
            del model.rows[requests.index(pick(repeated, self.row))]
        elif len(model.rows) > 1:
            del model.rows[self.row % len(model.rows)]


@dataclass(frozen=True)
class ChangeRequest:
    """A row asks for another prompt or seed (keeping its id, if it has one)."""

    row: int
    prompt: str
    seed: int

    def apply(self, model: CatalogModel) -> None:
        row = pick(model.rows, self.row)
        row.prompt, row.seed = self.prompt, self.seed


@dataclass(frozen=True)
class GiveId:
    """A row gets an explicit ``id``."""

    row: int

    def apply(self, model: CatalogModel) -> None:
        row = pick(model.rows, self.row)
        row.id = row.id or f"id-{model.fresh()}"


@dataclass(frozen=True)
class Repoint(OnFileRow):
    """A row keeps its explicit ``id`` but names another row's file."""

    to: int

    def change(self, model: CatalogModel, row: Row) -> None:
        row.id = row.id or f"id-{model.fresh()}"
        row.file = pick(file_rows(model), self.to).file


@dataclass(frozen=True)
class AddProjectRow:
    """A row naming a project that already exists at the API."""

    project: int
    at: int

    def apply(self, model: CatalogModel) -> None:
        model.rows.insert(self.at % (len(model.rows) + 1), Row(project=f"p-{self.project}"))


@dataclass(frozen=True)
class Run:
    """``batcher run`` to its end, or SIGKILLed after ``kill_after`` seconds."""

    kill_after: float | None
    retry_failed: bool


@dataclass(frozen=True)
class Night:
    """Changes to the catalog, then one run."""

    changes: list[Any] = field(default_factory=list)
    run: Run = Run(None, False)


index = st.integers(0, 7)
folder = st.integers(0, len(FOLDERS) - 1)
changes = st.one_of(
    st.builds(Reorder, seed=st.integers(0, 3)),
    st.builds(Duplicate, row=index, folder=folder, at=index),
    st.builds(Clash, row=index, same_bytes=st.booleans()),
    st.builds(Edit, row=index, same_length=st.booleans()),
    st.builds(Rename, row=index, folder=folder),
    st.builds(RemoveLeader, row=index),
    st.builds(ChangeRequest, row=index, prompt=st.sampled_from(PROMPTS),
              seed=st.sampled_from(SEEDS)),
    st.builds(GiveId, row=index),
    st.builds(Repoint, row=index, to=index),
    st.builds(AddProjectRow, project=st.integers(0, 1), at=index),
)
runs = st.builds(Run, kill_after=st.one_of(st.none(), st.sampled_from([0.5, 0.8, 1.2])),
                 retry_failed=st.booleans())
nights = st.lists(st.builds(Night, changes=st.lists(changes, max_size=3), run=runs),
                  min_size=1, max_size=3)


# ------------------------------------------------------------------ the test


def outside_out(model: CatalogModel) -> dict[str, str]:
    """The job's folder tree, but for --out, the ledger and the manifest."""
    def skip(path: Path) -> bool:
        return (path == model.out or path == model.manifest
                or path.name.startswith(ledger_of(model.manifest).name))
    return tree_snapshot(model.job.parent, skip)


def run_night(model: CatalogModel, api_base: str, run: Run) -> int | None:
    """One run over the manifest as it is now; its exit status, None when killed."""
    model.write_manifest()
    before = outside_out(model)
    args = job_args(model.manifest, api_base, *(["--retry-failed"] if run.retry_failed else []))
    status: int | None = None
    if run.kill_after is None:
        status = run_batcher(*args).returncode
    else:
        for _ in kill_repeatedly(args, seed=0, kills=1, window=(run.kill_after,) * 2):
            pass
    model.ran(to_its_end=run.kill_after is None)
    assert outside_out(model) == before, "a run wrote outside --out"
    return status


def check_outputs(model: CatalogModel, records: list[dict[str, Any]]) -> None:
    """Every row complete; every file row's output its own restoration of its file now."""
    assert [r["line"] for r in records] == list(range(1, len(model.rows) + 1))
    problems = [(r["line"], r["status"], (r["error"] or {}).get("code")) for r in records
                if r["status"] != "complete"]
    assert not problems, f"rows not complete after a clean run: {problems}"
    outputs = [r["output"] for r in records if r["kind"] == "file"]
    shared = sorted({o for o in outputs if outputs.count(o) > 1})
    assert not shared, f"rows share an output: {shared}"
    for row, record in zip(model.rows, records, strict=True):
        if row.file is None:
            continue
        output = Path(record["output"])
        assert model.out.resolve() in output.resolve().parents, output
        assert output.is_file() and not output.is_symlink(), f"line {record['line']}: {output}"
        assert output.read_bytes() == restored_audio(model.files[row.file]), (
            f"line {record['line']}: {output} is not the restoration of {row.file} as it is now")


def check_charges(model: CatalogModel, stats: dict[str, Any]) -> None:
    """Each needed request paid once; nothing else paid (killed runs: within bounds)."""
    charged = stats["charges_by_request"]
    twice = {k: n for k, n in charged.items() if n > 1}
    assert not twice and stats["extra_charges"] == 0, f"charged more than once: {twice}"
    names = {model.charge_key(r): r for r in model.needed | model.maybe}
    unasked = sorted(set(charged) - set(names))
    assert not unasked, f"charged for {len(unasked)} request(s) no manifest asked for"
    unpaid = sorted(model.needed - {names[k] for k in charged})
    assert not unpaid, f"needed requests never charged: {unpaid}"
    assert len(model.needed) <= stats["charges"] <= len(model.needed | model.maybe)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM,
          **({} if RANDOM else {"database": None}),
          phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(folders=st.lists(folder, min_size=3, max_size=6), nights=nights)
def test_a_catalog_changed_between_runs_is_paid_once_and_restored_right(
        folders: list[int], nights: list[Night]) -> None:
    with tempfile.TemporaryDirectory(prefix="catalog-") as tmp:
        model = CatalogModel(Path(tmp) / "job")
        for i, where in enumerate(folders):
            rel = f"{FOLDERS[where]}take{model.fresh()}.wav"
            model.write_audio(rel, 400 + 80 * (i % 2))
            model.rows.append(Row(file=rel))
        sim = start_simulator("--duration", "0.2,0.6", "--auto-create-projects")
        try:
            for night in nights:
                for change in night.changes:
                    change.apply(model)
                run_night(model, sim.base_url, night.run)
            final = run_night(model, sim.base_url, Run(None, False))
            records = export_records(ledger_of(model.manifest))
            check_outputs(model, records)
            assert final == 0
            check_charges(model, sim.stats())
        finally:
            sim.stop()
