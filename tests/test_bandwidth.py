"""The --max-bandwidth byte budget: parsing, and the cap over real time."""

from __future__ import annotations

import time

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.bandwidth import Bandwidth, format_rate, parse_rate


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500000", 500000),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("10M", 10 * 1024**2),
        ("1.5G", 1.5 * 1024**3),
        ("10MiB/s", 10 * 1024**2),
        ("10MB", 10 * 1024**2),
        (" 64 K ", 64 * 1024),
    ],
)
def test_parse_rate_reads_binary_suffixes(text: str, expected: float) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "10X", "-5M", "0", "0K", "1e6", "M"])
def test_parse_rate_refuses_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ValueError, match=r"bandwidth|byte rate"):
        parse_rate(text)


@given(st.integers(min_value=1, max_value=10**12))
def test_parse_rate_reads_plain_byte_counts(n: int) -> None:
    assert parse_rate(str(n)) == n


def test_format_rate_is_readable() -> None:
    assert format_rate(512) == "512.0 B/s"
    assert format_rate(10 * 1024**2) == "10.0 MiB/s"
    assert format_rate(3 * 1024**3) == "3.0 GiB/s"


@pytest.mark.anyio
async def test_no_cap_takes_at_once_and_counts() -> None:
    bw = Bandwidth(None)
    start = time.monotonic()
    for _ in range(1000):
        await bw.take(1 << 20)
    assert time.monotonic() - start < 1.0
    assert bw.taken == 1000 << 20
    assert not bw.capped
    assert bw.seconds_for(1 << 20) == 0.0


@pytest.mark.anyio
async def test_cap_holds_over_real_time_for_concurrent_takers() -> None:
    """Four transfers of 16 KiB chunks share a 256 KiB/s cap.

    Lower bounds only: on a loaded machine a transfer may be slower than the
    cap, never faster. 384 KiB at 256 KiB/s with a 64 KiB bucket needs at
    least (384 - 64) / 256 = 1.25 s; and no one-second window may carry more
    than the cap plus one bucket.
    """
    rate = 256 * 1024
    bw = Bandwidth(rate)
    stamps: list[tuple[float, int]] = []
    start = time.monotonic()

    async def transfer() -> None:
        for _ in range(6):
            await bw.take(16 * 1024)
            stamps.append((time.monotonic() - start, 16 * 1024))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(transfer)
    elapsed = time.monotonic() - start
    total = sum(n for _, n in stamps)
    assert total == 384 * 1024 == bw.taken
    assert elapsed >= (total - 64 * 1024) / rate - 0.05
    for t0, _ in stamps:
        in_window = sum(n for t, n in stamps if t0 <= t < t0 + 1.0)
        assert in_window <= rate + 64 * 1024


@pytest.mark.anyio
async def test_a_chunk_bigger_than_the_bucket_is_taken_in_pieces() -> None:
    """aiolimiter refuses amounts above its capacity; take() splits them."""
    bw = Bandwidth(64 * 1024)  # bucket: 16 KiB (the minimum)
    start = time.monotonic()
    await bw.take(80 * 1024)
    # 80 KiB with a 16 KiB head start at 64 KiB/s: at least 1 s.
    assert time.monotonic() - start >= 1.0 - 0.05
    assert bw.seconds_for(64 * 1024) == pytest.approx(1.0)
    assert "64.0 KiB/s" in repr(bw)


def test_zero_or_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError):
        Bandwidth(0)
