"""Settings precedence: flag > environment > job file > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.errors import ConfigError
from batcher.settings import resolve


def _job(tmp_path: Path, body: str) -> Path:
    (tmp_path / "m.csv").write_text("apiProjectId\np1\n")
    job = tmp_path / "nightly.toml"
    job.write_text(body)
    return job


def test_defaults_beside_the_manifest(tmp_path: Path) -> None:
    m = tmp_path / "cat.csv"
    m.write_text("apiProjectId\np\n")
    s = resolve(source=m, flags={}, env={"DIFFIO_API_KEY": "k"})
    assert s.ledger == str(tmp_path / "cat.ledger.sqlite")
    assert s.out == tmp_path / "cat.out"
    assert (s.rate, s.concurrency, s.poll_interval, s.model) == (10.0, 16, 5.0, "diffio-4.6-flash")


def test_precedence(tmp_path: Path) -> None:
    job = _job(tmp_path, '[job]\nmanifest = "m.csv"\nrate = 3\nconcurrency = 2\n'
                         'poll_interval = 7\nout = "restored"\n')
    env = {"DIFFIO_API_KEY": "k", "BATCHER_RATE": "4", "BATCHER_CONCURRENCY": "5"}
    s = resolve(source=job, flags={"rate": "6"}, env=env)
    assert s.rate == 6.0  # flag beats environment
    assert s.concurrency == 5  # environment beats job file
    assert s.poll_interval == 7.0  # job file beats default
    assert s.out == (tmp_path / "restored").resolve()  # relative to the job file
    assert s.manifest == (tmp_path / "m.csv").resolve()


def test_unknown_job_key_and_bad_types_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'rat'"):
        resolve(source=_job(tmp_path, '[job]\nmanifest="m.csv"\nrat = 3\n'), flags={},
                env={"DIFFIO_API_KEY": "k"})
    with pytest.raises(ConfigError, match="rate must be a float"):
        resolve(source=tmp_path / "m.csv", flags={"rate": "fast"}, env={"DIFFIO_API_KEY": "k"})
    with pytest.raises(ConfigError, match="DIFFIO_API_KEY"):
        resolve(source=tmp_path / "m.csv", flags={}, env={})


def test_key_never_in_repr(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("apiProjectId\np\n")
    s = resolve(source=tmp_path / "m.csv", flags={}, env={"DIFFIO_API_KEY": "sekrit-123"})
    assert "sekrit-123" not in repr(s)
    assert "sekrit-123" not in str(s.describe())


def test_max_bandwidth_takes_suffixes_from_flag_environment_or_job(tmp_path: Path) -> None:
    env = {"DIFFIO_API_KEY": "k"}
    m = tmp_path / "m.csv"
    m.write_text("apiProjectId\np\n")
    assert resolve(source=m, flags={}, env=env).max_bandwidth is None
    assert resolve(source=m, flags={"max_bandwidth": "10M"}, env=env).max_bandwidth == 10 * 2**20
    assert resolve(source=m, flags={}, env={**env, "BATCHER_MAX_BANDWIDTH": "512K"}
                   ).max_bandwidth == 512 * 1024
    job = _job(tmp_path, '[job]\nmanifest = "m.csv"\nmax_bandwidth = "1.5G"\n')
    assert resolve(source=job, flags={}, env=env).max_bandwidth == 1.5 * 2**30
    job = _job(tmp_path, '[job]\nmanifest = "m.csv"\nmax_bandwidth = 250000\n')
    assert resolve(source=job, flags={}, env=env).max_bandwidth == 250000.0
    for bad in ("fast", "0", "-1M"):
        with pytest.raises(ConfigError, match="--max-bandwidth"):
            resolve(source=m, flags={"max_bandwidth": bad}, env=env)
