"""Output paths never leave --out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import OutputPathError
from batcher.outputs import (
    copy_to_file,
    default_output_rel,
    extension_for,
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
