"""Output paths never leave --out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import OutputPathError
from batcher.outputs import default_output_rel, extension_for, resolve_output, row_tag


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
