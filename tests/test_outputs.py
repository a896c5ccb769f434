"""Output paths never leave --out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import OutputPathError
from batcher.intake import OutputClaims
from batcher.outputs import (
    copy_to_file,
    default_output_rel,
    default_output_stem,
    extension_for,
    request_tag,
    resolve_output,
    row_tag,
    write_bytes_atomically,
)


def test_relative_path_lands_under_out(tmp_path: Path) -> None:
    assert resolve_output(tmp_path, "a/b.mp3") == tmp_path.resolve() / "a" / "b.mp3"


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.mp3", "a/../../x.mp3", "", " ",
                                 "C:\\x.mp3", ".", "a/..", "x\x00.mp3"])
def test_escapes_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(OutputPathError):
        resolve_output(tmp_path / "out", bad)


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, out / "link")
    with pytest.raises(OutputPathError, match="symlink"):
        resolve_output(out, "link/x.mp3")


def test_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    assert resolve_output(tmp_path, "a/../b.mp3") == tmp_path.resolve() / "b.mp3"


@given(st.text(min_size=1, max_size=40))
def test_whatever_the_input_the_result_stays_inside(rel: str) -> None:
    out = Path("/tmp/batcher-paths-prop/out")
    try:
        result = resolve_output(out, rel)
    except OutputPathError:
        return
    assert out.resolve() in result.parents


def test_default_names() -> None:
    assert default_output_rel("sub/take.wav", "audio/mpeg") == "sub/take.wav.restored.mp3"
    assert default_output_rel("noext", None) == "noext.restored.bin"
    outside = default_output_rel("../up/take.wav", "audio/mpeg")
    assert outside.startswith("_outside/up-") and outside.endswith("/take.wav.restored.mp3")


def test_default_names_of_two_sources_never_collide() -> None:
    # the same stem in one folder, the same name in two folders outside
    pairs = [("audio/take.wav", "audio/take.flac"), ("../rec/day1/t.wav", "../rec/day2/t.wav"),
             ("/rec/day1/t.wav", "/rec/day2/t.wav"), ("t.wav", "../t.wav")]
    for a, b in pairs:
        assert default_output_rel(a, "audio/mpeg") != default_output_rel(b, "audio/mpeg"), (a, b)
        # a pure function of the path: the same answer every time
        assert default_output_rel(a, "audio/mpeg") == default_output_rel(a, "audio/mpeg")
    assert extension_for("audio/mpeg; charset=x") == ".mp3"


def test_rows_naming_one_file_are_told_apart_by_their_ids() -> None:
    derived = "r-0123456789abcdef0123"
    assert row_tag(derived) == "" and row_tag(derived + "~2") == "~2"
    assert row_tag("job-1") == ".job-1" and row_tag("job-1~3") == ".job-1~3"
    # ids unsafe in a file name stay apart after they are made safe
    assert row_tag("a/b") != row_tag("a:b") and "/" not in row_tag("a/b")
    names = {default_output_rel("take.wav", "audio/mpeg", row_tag(i))
             for i in (derived, derived + "~2", "job-1", "a/b", "a:b")}
    assert len(names) == 5 and "take.wav.job-1.restored.mp3" in names


def _tag(model: str = "diffio-4.6-flash", run: str = "diffio-4.6-flash", *,
         sampling: dict[str, object] | None = None, params: dict[str, object] | None = None,
         key: str | None = None) -> str:
    return request_tag(model=model, plain_model=run, sampling=sampling or {},
                       params=params or {}, explicit_key=key)


def test_a_request_tag_tells_requests_on_one_file_apart_and_leaves_the_plain_one_plain(
        ) -> None:
    assert _tag() == "" and _tag("diffio-4.5-flash") == ""  # an alias is its model
    tags = [_tag(params={"prompt": "clean"}), _tag(params={"prompt": "less hiss"}),
            _tag(sampling={"seed": 7}), _tag(sampling={"seed": 8}), _tag("diffio-4.6-pro"),
            _tag(key="mine"), _tag(key="yours"), _tag("diffio-4.6-pro", params={"prompt": "clean"})]
    assert len(set(tags)) == len(tags) and all(t.startswith("req-") for t in tags), tags
    # as keys compare requests: 7 is 7.0, key order does not matter
    assert _tag(sampling={"seed": 7}) == _tag(sampling={"seed": 7.0})
    assert _tag(params={"a": 1, "b": 2}) == _tag(params={"b": 2, "a": 1})
    # the run's model is not in it: a prompt keeps its name under another --model
    assert _tag("diffio-3.5", "diffio-3.5", params={"prompt": "clean"}) == tags[0]


def test_rows_asking_for_different_requests_on_one_file_get_different_defaults() -> None:
    derived, other, third = "r-0123456789abcdef0123", "r-" + "a" * 20, "r-" + "b" * 20
    clean, hiss = _tag(params={"prompt": "clean"}), _tag(params={"prompt": "less hiss"})
    rows = [(derived, ""), (other, clean), (other + "~2", clean), (third, hiss)]
    names = {default_output_rel("take.wav", "audio/mpeg", row_tag(i, t)) for i, t in rows}
    assert len(names) == 4, names
    assert default_output_rel("take.wav", "audio/mpeg", row_tag(derived, "")) == (
        "take.wav.restored.mp3")
    assert default_output_rel("take.wav", "audio/mpeg", row_tag(other + "~2", clean)) == (
        f"take.wav.{clean}~2.restored.mp3")
    # an explicit id is unique in a manifest: the request is not needed there
    assert row_tag("job-1", clean) == ".job-1"


def test_an_explicit_output_named_like_a_default_claims_it_in_either_order() -> None:
    claims = OutputClaims()
    assert claims.claim_default(default_output_stem("audio/take.wav"), 1) is None
    assert claims.claim("/out/audio/take.wav.restored.mp3", 2,
                        "audio/take.wav.restored.mp3") == 1
    # any extension: the default's is known only when its audio comes back
    assert claims.claim("/out/audio/take.wav.restored.flac", 3,
                        "audio/take.wav.restored.flac") == 1
    assert claims.claim("/out/audio/take.wav.mp3", 4, "audio/take.wav.mp3") is None
    # a row that failed holds nothing: the next one is told of the default's row
    assert claims.claim("/out/audio/take.wav.restored.mp3", 5,
                        "audio/take.wav.restored.mp3") == 1
    later = OutputClaims()
    assert later.claim("/out/b.wav.restored.wav", 1, "b.wav.restored.wav") is None
    assert later.claim("/out/b.wav.restored.mp3", 2, "b.wav.restored.mp3") is None
    assert later.claim_default(default_output_stem("b.wav"), 3) == 1
    # two defaults that end up as one name (a file named like another's tag)
    assert later.claim_default(default_output_stem("take.wav", ".job-1"), 4) is None
    assert later.claim_default(default_output_stem("take.wav.job-1"), 5) == 4


def test_default_claims_keep_their_lines_as_they_grow() -> None:
    claims = OutputClaims()
    stems = [default_output_stem(f"d{i % 7}/take{i}.wav") for i in range(5000)]
    assert all(claims.claim_default(s, n) is None for n, s in enumerate(stems, 1))
    assert [claims.claim_default(s, 9999) for s in stems[::500]] == list(range(1, 5001, 500))


# -- writing: nothing is written through a link, whenever it was planted ------------


def _outside(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "victim.mp3"
    victim.parent.mkdir()
    return victim


@pytest.mark.anyio
async def test_links_at_every_predictable_name_are_not_followed(tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "src.wav"
    src.write_bytes(b"restored")
    victim = _outside(tmp_path)
    (out / "sub").mkdir(parents=True)
    # Links at the final name and at names a temporary file might take.
    for name in ("x.mp3", ".x.mp3.part", ".x.mp3.tmp", ".x.mp3.r.part"):
        (out / "sub" / name).symlink_to(victim)
    await copy_to_file(src, out / "sub" / "x.mp3", root=out)
    final = out / "sub" / "x.mp3"
    assert not final.is_symlink() and final.read_bytes() == b"restored"
    assert not victim.exists()
    write_bytes_atomically(out / "sub" / ".x.mp3.tmp", b"report")
    assert not victim.exists()


@pytest.mark.anyio
async def test_a_folder_link_out_of_out_is_refused_at_write_time(tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "src.wav"
    src.write_bytes(b"restored")
    victim = _outside(tmp_path)
    out.mkdir()
    final = resolve_output(out, "sub/x.mp3")  # checked while sub/ did not exist yet
    (out / "sub").symlink_to(victim.parent)
    with pytest.raises(OutputPathError):
        await copy_to_file(src, final, root=out)
    assert list(victim.parent.iterdir()) == []


@pytest.mark.anyio
async def test_a_folder_link_that_stays_inside_out_is_written_through(tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "src.wav"
    src.write_bytes(b"restored")
    (out / "real").mkdir(parents=True)
    (out / "alias").symlink_to(out / "real")
    await copy_to_file(src, out / "alias" / "x.mp3", root=out)
    assert (out / "real" / "x.mp3").read_bytes() == b"restored"
    assert [p.name for p in (out / "real").iterdir()] == ["x.mp3"]  # no temporary left


@pytest.mark.anyio
async def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(
        tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "src.wav"
    src.write_bytes(b"restored")
    out.mkdir()
    victim = _outside(tmp_path)
    victim.write_bytes(b"keep")
    (out / ".x.mp3.0123456789abcdef.part").write_bytes(b"half")
    (out / ".x.mp3.fedcba9876543210.part").symlink_to(victim)
    (out / ".x.mp3.notours.part").write_bytes(b"someone else's")
    await copy_to_file(src, out / "x.mp3", root=out)
    assert sorted(p.name for p in out.iterdir()) == [".x.mp3.notours.part", "x.mp3"]
    assert victim.read_bytes() == b"keep"
