"""Peak memory of the batcher process while 16 large files go up in parts.

Parts are streamed from disk in chunks: no upload holds a whole part (let
alone a whole file) in memory. The proof is a comparison: the same job of 16
files, uploaded 16 at a time, with files of one part, of a few parts and of
many parts. Streaming costs each upload in flight about one chunk of working
set, whatever the file's size, so the batcher process's peak RSS must stay
flat from the medium files to the large ones, where holding one part per
upload would add 16 x the part size.

The simulator runs in its own process (it keeps the bytes it receives: its
memory is not measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import ChildRun, Figure, SimProcess, batcher_run, section, workdir

__all__ = ["UploadResult", "bench_uploads"]

MIB = 1024 * 1024


@dataclass(slots=True)
class UploadResult:
    """The two runs: small files, then large ones."""

    files: int
    sizes_mb: tuple[int, ...]
    part_mb: int
    runs: list[ChildRun]

    @property
    def growth_mb(self) -> float:
        """Peak RSS of the largest files' run minus the medium files' run."""
        return self.runs[-1].maxrss_mb - self.runs[-2].maxrss_mb


def _files(folder: Path, count: int, size: int) -> Path:
    """``count`` files of ``size`` bytes (different bytes each) and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    block = bytes(range(256)) * (MIB // 256)
    lines = ["file"]
    for i in range(count):
        path = folder / f"take{i:02d}.wav"
        with path.open("wb") as f:
            f.write(f"file {i} of {count}\n".encode())
            left = size - f.tell()
            while left > 0:
                chunk = block[: min(len(block), left)]
                f.write(chunk)
                left -= len(chunk)
        lines.append(path.name)
    manifest = folder / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def bench_uploads(files: int = 16, large_mb: int = 128, part_mb: int = 16
                  ) -> tuple[UploadResult, list[Figure]]:
    """The same 16-at-a-time upload job with files of 1 MiB, ``large_mb`` / 4 and ``large_mb``."""
    sizes = (1, max(2, large_mb // 4), large_mb)
    section(f"uploads: {files} files at once in parts of {part_mb} MiB, files of "
            f"{', '.join(str(m) for m in sizes)} MiB")
    runs: list[ChildRun] = []
    for size_mb in sizes:
        with workdir() as d, SimProcess("--duration", "0.2,0.4", "--part-size",
                                        f"{part_mb}M") as sim:
            manifest = _files(d / f"f{size_mb}", files, size_mb * MIB)
            run = batcher_run(manifest, sim.base_url, "--concurrency", str(files),
                              "--rate", "50", "--poll-interval", "0.3", timeout=3600).check()
            stats = sim.stats()
            assert stats["projects_confirmed"] == files, stats
            print(f"{files} x {size_mb} MiB: peak RSS {run.maxrss_mb:.0f} MB, wall "
                  f"{run.wall:.1f} s, CPU {run.cpu:.1f} s; parts {stats['parts_received']}")
            runs.append(run)
    res = UploadResult(files, sizes, part_mb, runs)
    whole_parts = files * min(part_mb, sizes[1])
    print(f"peak RSS grew {res.growth_mb:+.1f} MB from {sizes[1]} MiB to {sizes[2]} MiB files "
          f"(holding one part per upload would mean about {whole_parts} MB more than one-part "
          f"files; those take {runs[0].maxrss_mb:.0f} MB)")
    figures = [
        Figure(f"peak RSS growth, {files} uploads of {sizes[2]} MiB vs {sizes[1]} MiB",
               f"{res.growth_mb:+.1f} MB", "< 16 MB", res.growth_mb < 16,
               "peak RSS " + " / ".join(f"{r.maxrss_mb:.0f}" for r in runs)
               + f" MB for {' / '.join(str(m) for m in sizes)} MiB files, parts of {part_mb} MiB"),
    ]
    return res, figures
