"""The simulator's pure parts: config, audio, windows, generation ageing, CLI settings."""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import wave
from pathlib import Path

import pytest

from batcher.errors import ConfigError
from batcher.simulator import (
    KeySpec,
    SimConfig,
    derived_generation_id,
    logical_request_key,
    restored_audio,
    restored_source_digest,
    wav_duration_seconds,
)
from batcher.simulator.billing import SpendBook
from batcher.simulator.cli import add_arguments, build_config
from batcher.simulator.config import download_ttl_for
from batcher.simulator.model import Generation
from batcher.simulator.window import RateLimiter, SlidingWindow

# -- config ----------------------------------------------------------------


def test_defaults_make_a_friendly_demo() -> None:
    cfg = SimConfig()
    assert cfg.api == "current"
    assert cfg.api_keys == {"sim-key": KeySpec()}
    assert cfg.duration == (1.0, 3.0)
    assert (cfg.error_rate, cfg.lost_rate, cfg.failure_rate) == (0.0, 0.0, 0.0)
    assert cfg.rate_limit is None and cfg.api_keys["sim-key"].spend_limit_usd is None


def test_from_mapping_accepts_file_shapes() -> None:
    cfg = SimConfig.from_mapping({
        "latency": "0.01,0.05", "error-rate": 0.1, "duration": [2, 4], "rate_limit": 15,
        "seed": "9", "api_keys": {"a": {"spend_limit_usd": 10}, "b": {"write": False}},
    })
    assert cfg.latency == (0.01, 0.05) and cfg.duration == (2.0, 4.0)
    assert (cfg.error_rate, cfg.rate_limit, cfg.seed) == (0.1, 15.0, 9)
    # Keys named in a file replace the demo key.
    assert cfg.api_keys == {"a": KeySpec(spend_limit_usd=10.0), "b": KeySpec(write=False)}
    assert SimConfig.from_mapping({"api_keys": ["x", "y"]}).api_keys == {
        "x": KeySpec(), "y": KeySpec()}
    assert SimConfig.from_mapping({"duration": 0}).duration == (0.0, 0.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"error_rate": 1.5},
        {"lost_rate": -0.1},
        {"latency": "3,1"},
        {"duration": "a,b"},
        {"unknown_knob": 1},
        {"api_keys": {"k": {"admin": True}}},
        {"api_keys": {"k": {"active": "yes"}}},
        {"seed": 1.5},
        {"auto_create_projects": "true"},
        {"api": "v2"},
        {"api": 1},
        {"part_size": 0},
        {"part_size": "12X"},
        {"part_size": 1.5},
        {"max_upload_bytes": True},
        {"part_error_rate": 2},
        {"part_lost_rate": -1},
        {"part_latency": "2,1"},
        {"upload_session_ttl": -1},
        {"download_ttl": "soon"},
    ],
)
def test_bad_settings_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SimConfig.from_mapping(bad)


def test_patched_merges_keys_and_none_removes_one() -> None:
    cfg = SimConfig().patched({"api_keys": {"sim-key": {"spend_limit_usd": 5}, "k2": {}}})
    assert cfg.api_keys == {"sim-key": KeySpec(spend_limit_usd=5.0), "k2": KeySpec()}
    cfg = cfg.patched({"api_keys": {"sim-key": {"active": False}, "k2": None}})
    assert cfg.api_keys == {"sim-key": KeySpec(active=False, spend_limit_usd=5.0)}
    assert cfg.to_dict()["api_keys"]["sim-key"]["spend_limit_usd"] == 5.0


def test_upload_knobs_take_byte_sizes_and_defaults_follow_the_api() -> None:
    cfg = SimConfig.from_mapping({
        "api": "SEED", "part-size": "4K", "max_upload_bytes": "1G", "edge_part_size": "2MiB",
        "part_latency": 0.5, "part_error_rate": 0.25, "upload_session_ttl": 60,
    })
    assert (cfg.api, cfg.part_size, cfg.max_upload_bytes) == ("seed", 4096, 1024 ** 3)
    assert (cfg.edge_part_size, cfg.part_latency) == (2 * 1024 ** 2, (0.5, 0.5))
    assert (cfg.part_error_rate, cfg.upload_session_ttl) == (0.25, 60.0)
    assert cfg.patched({"edge_part_size": 0}).edge_part_size is None
    assert SimConfig().part_size == 32 * 1024 ** 2
    assert download_ttl_for(SimConfig(api="seed")) == 7200.0
    assert download_ttl_for(SimConfig()) == 6 * 3600.0
    assert download_ttl_for(SimConfig(download_ttl=5.0)) == 5.0
    assert SimConfig.from_mapping(SimConfig(api="seed").to_dict()) == SimConfig(api="seed")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_layers_defaults_file_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "sim.toml"
    toml.write_text('error_rate = 0.2\nduration = [0.5, 1]\n[api_keys.filekey]\nread = false\n')
    cfg = build_config(_args("--config", str(toml), "--api-key", "k1", "--duration", "2,4",
                             "--spend-limit", "10", "--lost-rate", "0.3", "--rate-limit", "15"))
    assert cfg.error_rate == 0.2 and cfg.duration == (2.0, 4.0)
    assert (cfg.lost_rate, cfg.rate_limit) == (0.3, 15.0)
    assert cfg.api_keys == {
        "filekey": KeySpec(read=False, spend_limit_usd=10.0),
        "k1": KeySpec(spend_limit_usd=10.0),
    }
    assert build_config(_args()).api_keys == {"sim-key": KeySpec()}
    assert set(build_config(_args("--api-key", "a", "--api-key", "b")).api_keys) == {"a", "b"}


def test_cli_api_and_upload_host_flags(tmp_path: Path) -> None:
    assert build_config(_args()).api == "current"
    toml = tmp_path / "sim.toml"
    toml.write_text('api = "seed"\npart_size = "8K"\n')
    from_file = build_config(_args("--config", str(toml)))
    assert (from_file.api, from_file.part_size) == ("seed", 8192)
    cfg = build_config(_args("--config", str(toml), "--api", "current", "--part-size", "1M",
                             "--edge-part-size", "512K", "--max-upload-bytes", "3G",
                             "--upload-session-ttl", "30", "--part-error-rate", "0.1",
                             "--part-lost-rate", "0.2", "--part-latency", "0.01,0.02"))
    assert (cfg.api, cfg.part_size, cfg.edge_part_size) == ("current", 1 << 20, 512 << 10)
    assert (cfg.max_upload_bytes, cfg.upload_session_ttl) == (3 << 30, 30.0)
    assert (cfg.part_error_rate, cfg.part_lost_rate, cfg.part_latency) == (0.1, 0.2, (0.01, 0.02))
    for bad in (("--api", "v3"), ("--part-size", "0"), ("--part-lost-rate", "1.5")):
        with pytest.raises(SystemExit):
            _args(*bad)


def test_cli_rejects_bad_flags_and_files(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _args("--error-rate", "2")
    with pytest.raises(SystemExit):
        _args("--latency", "x")
    broken = tmp_path / "bad.json"
    broken.write_text("{nope")
    with pytest.raises(ConfigError):
        build_config(_args("--config", str(broken)))
    with pytest.raises(ConfigError):
        build_config(_args("--config", str(tmp_path / "missing.json")))


# -- audio -----------------------------------------------------------------


def _wav(seconds: float, rate: int = 200, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(int(seconds * rate) * width))
    return out.getvalue()


def test_wav_duration() -> None:
    assert wav_duration_seconds(_wav(2.5)) == pytest.approx(2.5)
    assert wav_duration_seconds(b"ID3 not a wav") is None
    assert wav_duration_seconds(b"") is None
    assert wav_duration_seconds(_wav(1.0)[:30]) is None


def test_wav_duration_of_a_float_wav_the_wave_module_refuses() -> None:
    rate, seconds = 100, 3
    data = bytes(4 * rate * seconds)
    fmt = struct.pack("<HHIIHH", 3, 1, rate, 4 * rate, 4, 32)  # IEEE float
    riff = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)
    assert wav_duration_seconds(b"RIFF" + struct.pack("<I", len(riff)) + riff) == 3.0


def test_restored_audio_is_deterministic_and_tells_its_input() -> None:
    a, b = restored_audio(b"input one"), restored_audio(b"input two")
    assert a == restored_audio(b"input one")
    assert a != b
    assert a.startswith(b"ID3")
    assert b"input one" not in a and b"eno tupni" not in a
    assert restored_source_digest(a) == hashlib.sha256(b"input one").hexdigest()
    assert restored_source_digest(b"plain bytes") is None
    assert len(restored_audio(bytes(1000))) > 1000


# -- windows and keys ------------------------------------------------------


def test_sliding_window_is_half_open() -> None:
    w = SlidingWindow()
    for t in (0.0, 0.5, 0.999):
        w.add(t)
    assert w.add(1.0) == 3  # 0.0 left: the window is (0.0, 1.0]
    assert w.peak == 3
    assert w.seconds_until_room(1.0, 3) == pytest.approx(0.5)


def test_rate_limiter_admits_at_most_the_limit_per_window() -> None:
    limiter = RateLimiter()
    times = (0.0, 0.25, 0.5, 0.75, 1.0, 1.125, 1.25)
    admitted = [limiter.admit("k", t, 3) is None for t in times]
    # A refused request does not fill the window: 1.0 gets in once 0.0 has left.
    assert admitted == [True, True, True, False, True, False, True]
    assert limiter.admit("k", 1.375, 3) == 1
    assert limiter.admit("other", 1.375, 3) is None


def test_derived_ids_and_logical_keys() -> None:
    assert derived_generation_id("k", "p", " x ") == derived_generation_id("k", "p", "x")
    assert derived_generation_id("k", "p", "x") != derived_generation_id("k2", "p", "x")
    assert derived_generation_id("k", "p", "x") != derived_generation_id("k", "p2", "x")
    seven = logical_request_key("diffio-3.5", "src", {"seed": 7}, {})
    assert seven == logical_request_key("diffio-3.5", "src", {"seed": 7.0}, {})
    assert seven != logical_request_key("diffio-3.5", "src", {"seed": 8}, {})
    assert seven != logical_request_key("diffio-2", "src", {"seed": 7}, {})


# -- generation ageing -----------------------------------------------------


def _gen(duration: float, failed_stage: str | None = None) -> Generation:
    return Generation("gen-abc", "p", "k", "diffio-3.5", None, {}, {}, 100.0, 0.0,
                      duration, failed_stage, 0.06, "lk", b"")


def test_generation_phases_follow_the_clock() -> None:
    gen = _gen(10.0)
    assert [gen.phase(100.0 + t).status for t in (0, 0.9, 1, 5, 9.99, 10, 50)] == [
        "queued", "queued", "processing", "processing", "processing", "complete", "complete"]
    assert gen.phase(102.0).stages["preProcessing"]["progress"] == 50
    assert gen.phase(106.5).stages["inference"]["progress"] == 50
    assert gen.phase(50.0).status == "queued"  # a clock before creation is not an error
    assert _gen(0.0).phase(100.0).status == "complete"


def test_failure_in_preprocessing_ends_early_and_leaves_inference_pending() -> None:
    gen = _gen(10.0, "preProcessing")
    assert gen.phase(102.9).status == "processing"
    phase = gen.phase(103.0)
    assert phase.status == "failed" and phase.ended_after == pytest.approx(3.0)
    assert phase.stages["preProcessing"]["status"] == "failed"
    assert phase.stages["inference"]["status"] == "pending"
    late = _gen(10.0, "inference").phase(110.0)
    assert late.stages["preProcessing"]["status"] == "complete"
    assert late.stages["inference"]["jobState"] == "FAILED"
    assert late.error and late.error_details


def test_spend_book_moves_charges_from_pending_to_used_as_generations_end() -> None:
    book = SpendBook()
    ok, early_fail = _gen(10.0), _gen(10.0, "preProcessing")
    book.record(ok, 0.0)
    book.record(early_fail, 0.0)
    assert book.totals("k", 100.0, 0.0) == (0.0, 0.12)
    assert book.totals("k", 103.0, 0.0) == (0.06, 0.06)  # the failure ended at 30 %
    assert book.totals("k", 110.0, 0.0) == (0.12, 0.0)
    assert book.totals("other", 110.0, 0.0) == (0.0, 0.0)
    assert book.totals("k", 110.0, 1.0) == (0.0, 0.0)  # a new period starts from zero
