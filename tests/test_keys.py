"""Derived idempotency keys and row ids: a function of the row's request, nothing else."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from batcher.keys import (
    FileSource,
    HashSet64,
    ProjectSource,
    RowIdAssigner,
    Source,
    canonical_json,
    derive_key,
    derive_row_id,
    normalize_model,
    sha256_file,
)
from batcher.models import DEFAULT_MODEL, SUPPORTED_MODELS, is_retired

KEY_RE = re.compile(r"bk1-[0-9a-f]{64}\Z")
ROW_ID_RE = re.compile(r"r-[0-9a-f]{20}\Z")

# --- strategies -------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
sources: st.SearchStrategy[Source] = st.builds(ProjectSource, st.text(max_size=12)) | st.builds(
    FileSource, st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
)
models = st.sampled_from(["diffio-3.5", "diffio-3.4", "diffio-2.0", "x"]) | st.text(max_size=10)


def _request(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "diffio-3.5",
        "source": ProjectSource("proj-1"),
        "sampling": {"seed": 7},
        "params": {"prompt": "hiss"},
        "namespace": "",
        "retry": 0,
    }
    base.update(changes)
    return base


def _floats_for_ints(value: Any) -> Any:
    """The same value with every int spelt as a float where that is exact."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) <= 2**53:
        return float(value)
    if isinstance(value, dict):
        return {k: _floats_for_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_for_ints(v) for v in value]
    return value


def _reordered(value: Any) -> Any:
    """The same value with every dict built in reverse key order."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


# --- canonical_json -----------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level() -> None:
    assert canonical_json({"b": 1, "a": {"d": 2, "c": [{"f": 1, "e": 2}]}}) == (
        b'{"a":{"c":[{"e":2,"f":1}],"d":2},"b":1}'
    )


def test_canonical_json_writes_integral_floats_as_ints() -> None:
    assert canonical_json({"seed": 7.0}) == canonical_json({"seed": 7}) == b'{"seed":7}'
    assert canonical_json(-0.0) == b"0"
    assert canonical_json(2.5) == b"2.5"
    assert canonical_json([1e20]) == canonical_json([10**20]) == b"[100000000000000000000]"


def test_canonical_json_keeps_bools_apart_from_numbers() -> None:
    assert canonical_json(True) == b"true"
    assert canonical_json({"a": True}) != canonical_json({"a": 1})
    assert canonical_json({"a": False}) != canonical_json({"a": 0.0})


def test_canonical_json_writes_big_integers_exactly() -> None:
    assert canonical_json(2**64) == b"18446744073709551616"
    assert canonical_json(-(2**63) - 1) == b"-9223372036854775809"
    assert canonical_json(2**64) != canonical_json(2**64 + 1)
    assert canonical_json(float(2**70)) == canonical_json(2**70)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [math.nan]}])
def test_canonical_json_rejects_non_finite_numbers(bad: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)


def test_canonical_json_rejects_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError):
        canonical_json({1: "a"})
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})
    with pytest.raises(ValueError):
        canonical_json("\ud800")


def test_canonical_json_rejects_deep_nesting_as_a_value_error() -> None:
    deep: Any = 1
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        canonical_json(deep)


def test_canonical_json_treats_tuples_as_arrays() -> None:
    assert canonical_json((1, 2)) == canonical_json([1, 2]) == b"[1,2]"


@given(json_values)
def test_canonical_json_is_valid_json_of_an_equal_value(value: Any) -> None:
    out = canonical_json(value)
    assert json.loads(out) == value  # Python compares 7 == 7.0 by value too


@given(json_values)
def test_canonical_json_ignores_key_order_and_number_spelling(value: Any) -> None:
    assert canonical_json(_reordered(value)) == canonical_json(value)
    assert canonical_json(_floats_for_ints(value)) == canonical_json(value)


# --- models and keys ------------------------------------------------------------


def test_normalize_model_maps_the_alias_only() -> None:
    assert normalize_model("diffio-3.4") == "diffio-3.5"
    assert normalize_model("diffio-3.5") == "diffio-3.5"
    assert normalize_model("diffio-2.0") == "diffio-2.0"
    assert normalize_model("diffio-4.5-flash") == "diffio-4.6-flash"
    assert normalize_model("diffio-4.5-pro") == "diffio-4.6-pro"
    assert normalize_model("diffio-4.6-pro") == "diffio-4.6-pro"


def test_the_4_5_names_are_the_4_6_requests_and_flash_is_not_pro() -> None:
    flash = derive_key(**_request(model="diffio-4.6-flash"))
    assert derive_key(**_request(model="diffio-4.5-flash")) == flash
    assert derive_key(**_request(model="diffio-4.5-pro")) == derive_key(
        **_request(model="diffio-4.6-pro")) != flash
    assert _row_id(model="diffio-4.5-flash") == _row_id(model="diffio-4.6-flash")


def test_the_retired_models_are_every_model_but_the_served_ones() -> None:
    assert SUPPORTED_MODELS == ("diffio-4.6-flash", "diffio-4.6-pro")
    assert DEFAULT_MODEL == "diffio-4.6-flash"
    for served in ("diffio-4.6-flash", "diffio-4.6-pro", "diffio-4.5-flash", "diffio-4.5-pro"):
        assert not is_retired(served)
    for gone in ("diffio-3.5", "diffio-3.4", "diffio-2", "diffio-4.0-flash", "x"):
        assert is_retired(gone)


def test_derive_key_is_pinned() -> None:
    # Changing what is hashed changes every key, i.e. charges every row again:
    # this pin makes such a change deliberate (bump "v" and the prefix).
    payload = b'{"model":"diffio-3.5","ns":"","params":{"prompt":"hiss"},'
    payload += b'"sampling":{"seed":7},"source":{"apiProjectId":"proj-1"},"v":1}'
    expected = "bk1-" + hashlib.sha256(payload).hexdigest()
    assert derive_key(**_request()) == expected


def test_derive_key_format() -> None:
    assert KEY_RE.match(derive_key(**_request()))


@pytest.mark.parametrize(
    "change",
    [
        {"model": "diffio-2.0"},
        {"source": ProjectSource("proj-2")},
        {"source": FileSource("proj-1")},
        {"sampling": {"seed": 8}},
        {"sampling": {"seed": 7, "extra": None}},
        {"sampling": {"seed": True}},
        {"params": {"prompt": "hiss "}},
        {"params": {}},
        {"namespace": "rerun-2"},
        {"retry": 1},
    ],
    ids=lambda change: next(iter(change)) + "=" + repr(next(iter(change.values()))),
)
def test_derive_key_changes_with_every_request_field(change: dict[str, Any]) -> None:
    assert derive_key(**_request(**change)) != derive_key(**_request())


def test_derive_key_equal_for_equal_requests() -> None:
    key = derive_key(**_request())
    assert derive_key(**_request(sampling={"seed": 7.0})) == key
    assert derive_key(**_request(model="diffio-3.4")) == key
    assert derive_key(**_request(retry=0)) == key
    reordered = _request(sampling={"b": 1, "a": {"y": 2, "x": 1}})
    again = _request(sampling={"a": {"x": 1.0, "y": 2}, "b": 1})
    assert derive_key(**reordered) == derive_key(**again)


def test_derive_key_retries_get_distinct_keys() -> None:
    keys = {derive_key(**_request(retry=n)) for n in range(5)}
    assert len(keys) == 5
    with pytest.raises(ValueError):
        derive_key(**_request(retry=-1))


@settings(max_examples=200)
@given(models, sources, json_objects, json_objects, st.text(max_size=300), st.integers(0, 10**6))
def test_derive_key_always_fits_the_api(
    model: str, source: Source, sampling: Any, params: Any, ns: str, retry: int
) -> None:
    key = derive_key(
        model=model, source=source, sampling=sampling, params=params, namespace=ns, retry=retry
    )
    assert 1 <= len(key.strip()) <= 255
    assert KEY_RE.match(key)


@given(json_objects, json_objects)
def test_derive_key_ignores_spelling_of_equal_content(sampling: Any, params: Any) -> None:
    plain = derive_key(**_request(sampling=sampling, params=params))
    respelt = derive_key(
        **_request(
            model="diffio-3.4",
            sampling=_floats_for_ints(_reordered(sampling)),
            params=_reordered(_floats_for_ints(params)),
        )
    )
    assert plain == respelt


_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": models,
    "source": sources,
    "sampling": json_objects,
    "params": json_objects,
    "namespace": st.text(max_size=20),
    "retry": st.integers(0, 100),
}


@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(st.data())
def test_derive_key_differs_when_any_one_field_differs(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(sorted(_FIELDS)))
    a = data.draw(_FIELDS[field])
    b = data.draw(_FIELDS[field])
    if field == "model":
        assume(normalize_model(a) != normalize_model(b))
    elif field in ("sampling", "params"):
        assume(canonical_json(a) != canonical_json(b))
    else:
        assume(a != b)
    assert derive_key(**_request(**{field: a})) != derive_key(**_request(**{field: b}))


_CHILD = """
import json, sys
from batcher.keys import ProjectSource, FileSource, derive_key, derive_row_id
cases = json.load(sys.stdin)
out = []
for c in cases:
    source = ProjectSource(c["src"]) if c["kind"] == "p" else FileSource(c["src"])
    out.append([
        derive_key(model=c["model"], source=source, sampling=c["sampling"],
                   params=c["params"], namespace=c["ns"], retry=c["retry"]),
        derive_row_id(model=c["model"], source_identity=c["src"], sampling=c["sampling"],
                      params=c["params"], explicit_key=c["key"], namespace=c["ns"]),
    ])
json.dump(out, sys.stdout)
"""


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.randrange(-(2**70), 2**70)
    if pick == 3:
        return rng.choice([7.0, -0.0, 2.5, 1e300, rng.uniform(-1e6, 1e6)])
    if pick in (4, 5):
        return "".join(rng.choice("aé漢 \"\\\n🎵") for _ in range(rng.randrange(6)))
    if pick == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{rng.randrange(9)}é": _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _cases() -> list[dict[str, Any]]:
    rng = random.Random(20240501)
    cases = []
    for i in range(60):
        sampling = {"seed": rng.choice([7, 7.0, 123456789, 2.5])}
        sampling.update({f"s{j}": _random_value(rng) for j in range(rng.randrange(3))})
        cases.append(
            {
                "kind": "p" if i % 2 else "f",
                "src": f"proj-{i}" if i % 2 else hashlib.sha256(bytes([i])).hexdigest(),
                "model": rng.choice(["diffio-3.5", "diffio-3.4", "diffio-2.0"]),
                "sampling": sampling,
                "params": {"prompt": _random_value(rng), "p": _random_value(rng)},
                "ns": rng.choice(["", "rerun-2", "ß"]),
                "retry": rng.randrange(3),
                "key": rng.choice([None, "k-1", "é"]),
            }
        )
    return cases


def _keys_of(cases: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for c in cases:
        source: Source = ProjectSource(c["src"]) if c["kind"] == "p" else FileSource(c["src"])
        key = derive_key(
            model=c["model"],
            source=source,
            sampling=c["sampling"],
            params=c["params"],
            namespace=c["ns"],
            retry=c["retry"],
        )
        row_id = derive_row_id(
            model=c["model"],
            source_identity=c["src"],
            sampling=c["sampling"],
            params=c["params"],
            explicit_key=c["key"],
            namespace=c["ns"],
        )
        out.append([key, row_id])
    return out


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_keys import _keys_of
json.dump(_keys_of(json.load(sys.stdin)), sys.stdout)
"""


@pytest.mark.slow
def test_keys_are_stable_across_processes() -> None:
    cases = _cases()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    theirs = json.loads(child.stdout)
    assert theirs == _keys_of(cases)
    assert len({key for key, _ in theirs}) == len(cases)


# --- row ids ----------------------------------------------------------------------


def _row_id(**changes: Any) -> str:
    base: dict[str, Any] = {
        "model": "diffio-3.5",
        "source_identity": "audio/a.wav",
        "sampling": {"seed": 7},
        "params": {},
        "explicit_key": None,
        "namespace": "",
    }
    base.update(changes)
    return derive_row_id(**base)


def test_derive_row_id_format_and_equalities() -> None:
    rid = _row_id()
    assert ROW_ID_RE.match(rid)
    assert _row_id(sampling={"seed": 7.0}) == rid
    assert _row_id(model="diffio-3.4") == rid


@pytest.mark.parametrize(
    "change",
    [
        {"model": "diffio-2.0"},
        {"source_identity": "audio/b.wav"},
        {"sampling": {"seed": 8}},
        {"params": {"prompt": "x"}},
        {"explicit_key": "k1"},
        {"namespace": "n"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_derive_row_id_changes_with_every_field(change: dict[str, Any]) -> None:
    assert _row_id(**change) != _row_id()


def test_row_id_assigner_suffixes_in_order() -> None:
    ids = RowIdAssigner()
    got = [ids.assign(x) for x in ["a", "b", "a", "c", "a", "b"]]
    assert got == ["a", "b", "a~2", "c", "a~3", "b~2"]


def test_row_id_assigner_skips_ids_already_taken() -> None:
    ids = RowIdAssigner()
    got = [ids.assign(x) for x in ["a~2", "a", "a", "a", "a~2"]]
    assert got == ["a~2", "a", "a~3", "a~4", "a~2~2"]


@given(st.lists(st.sampled_from(["r-1", "r-2", "x", "x~2", "x~2~2", "é"]), max_size=40))
def test_row_id_assigner_gives_unique_ids_first_come_first_kept(bases: list[str]) -> None:
    ids = RowIdAssigner()
    got = [ids.assign(b) for b in bases]
    assert len(set(got)) == len(got)
    for i, base in enumerate(bases):
        if base not in got[:i]:
            assert got[i] == base
        assert got[i] == base or got[i].startswith(base + "~")


@given(st.lists(st.sampled_from(["r-a", "r-b", "r-c"]), max_size=30))
def test_row_id_assigner_numbers_repeats_2_3_4(bases: list[str]) -> None:
    ids = RowIdAssigner()
    got = [ids.assign(b) for b in bases]
    for i, base in enumerate(bases):
        n = bases[: i + 1].count(base)
        assert got[i] == (base if n == 1 else f"{base}~{n}")


def test_row_id_assigner_suffixes_many_repeats_among_many_rows() -> None:
    ids = RowIdAssigner()
    bases = [f"r-{i % 3000:020x}" for i in range(9000)]  # the table grows 3 times
    got = [ids.assign(b) for b in bases]
    assert len(set(got)) == 9000
    assert got[:3000] == bases[:3000]
    assert got[3000:6000] == [f"{b}~2" for b in bases[:3000]]
    assert got[6000:] == [f"{b}~3" for b in bases[:3000]]
    assert repr(ids) == "<RowIdAssigner ids=9000 repeated=3000>"


@pytest.mark.slow  # tracemalloc makes 200,000 ids take seconds
def test_row_id_assigner_memory_is_a_few_bytes_per_id() -> None:
    n = 200_000
    tracemalloc.start()
    try:
        ids = RowIdAssigner()
        for i in range(n):
            ids.assign(f"r-{i:020x}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids._seen) == n
    # The table is 2^19 slots (4 MiB) with the 2 MiB one it grew from; a
    # set[int] of the same hashes takes about 14 MB (70 bytes per id).
    assert peak < 10_000_000, f"{peak / n:.0f} bytes per id"


# --- HashSet64 ----------------------------------------------------------------------


def test_hash_set_colliding_hashes_probe_on_and_wrap_around() -> None:
    table = HashSet64(16)
    assert table.capacity == 16
    # All in the last slot's bucket (low 4 bits 1111): the chain wraps to slot 0.
    same = [(k << 32) | 0xF for k in range(1, 8)]
    assert all(table.add(h) for h in same)
    assert not any(table.add(h) for h in same)
    assert all(h in table for h in same)
    assert (8 << 32) | 0xF not in table and 0xF not in table
    assert len(table) == 7 and table.capacity == 16


def test_hash_set_grows_when_half_full_and_keeps_every_member() -> None:
    table = HashSet64(8)
    rng = random.Random(7)
    members = [rng.getrandbits(64) for _ in range(1000)] + [2**64 - 1, 5, 5 + (1 << 63)]
    seen: set[int] = set()
    for h in members:
        assert table.add(h) is (h not in seen)
        seen.add(h)
        assert 2 * len(table) <= table.capacity  # at most half full
    assert len(table) == len(seen) and table.capacity == 2048  # 1003 members
    assert all(h in table for h in members)
    assert not any(table.add(h) for h in members)
    assert sum(rng.getrandbits(64) in table for _ in range(1000)) == 0


def test_hash_set_stores_zero_as_one() -> None:
    table = HashSet64()
    assert table.add(0) and not table.add(1) and 1 in table and 0 in table
    assert "1" not in table and len(table) == 1
    assert repr(table) == "<HashSet64 members=1 capacity=1024>"


@given(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 40), max_size=300))
def test_hash_set_agrees_with_a_set(hashes: list[int]) -> None:
    table = HashSet64(8)
    model: set[int] = set()
    for h in hashes:
        key = h or 1
        assert table.add(h) is (key not in model)
        model.add(key)
    assert len(table) == len(model)
    assert all(h in table for h in model)


# --- sha256_file ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    assert sha256_file(path) == (hashlib.sha256(data).hexdigest(), size)


def test_sha256_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "big.wav"
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(24):
            f.write(chunk)
    tracemalloc.start()
    try:
        digest, size = sha256_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == 24 << 20
    assert digest == hashlib.sha256(chunk * 24).hexdigest()
    assert peak < 4 << 20


def test_sha256_file_missing_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        sha256_file(tmp_path / "nope.wav")

