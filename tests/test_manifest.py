"""The manifest reader: open-time errors, per-row validation, line numbers, fuzzing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.errors import ManifestError, RowError
from batcher.manifest import KNOWN_COLUMNS, ManifestRow, open_manifest
from batcher.model import Kind


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def read(path: Path) -> list[ManifestRow | RowError]:
    with open_manifest(path) as manifest:
        return list(manifest)


def one(folder: Path, name: str, content: str | bytes) -> ManifestRow | RowError:
    rows = read(write(folder, name, content))
    assert len(rows) == 1, rows
    return rows[0]


def good(folder: Path, name: str, content: str | bytes) -> ManifestRow:
    row = one(folder, name, content)
    assert isinstance(row, ManifestRow), row
    return row


def bad(folder: Path, name: str, content: str | bytes) -> RowError:
    row = one(folder, name, content)
    assert isinstance(row, RowError), row
    return row


def csv1(header: str, row: str) -> str:
    return f"{header}\n{row}\n"


def jsonl1(obj: dict[str, Any]) -> str:
    return json.dumps(obj) + "\n"


# --- open-time errors ---------------------------------------------------------------


def _open_error(path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        open_manifest(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_missing_manifest(tmp_path: Path) -> None:
    assert "cannot read" in _open_error(tmp_path / "nope.csv")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    assert "cannot read" in _open_error(tmp_path / "dir.csv")


@pytest.mark.parametrize("name", ["m.txt", "m.toml", "m", "m.json", "m.csv.bak"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "apiProjectId\np1\n")
    assert "unknown manifest type" in _open_error(path)


@pytest.mark.parametrize("name", ["m.CSV", "m.JSONL", "m.ndjson"])
def test_known_extensions_any_case(tmp_path: Path, name: str) -> None:
    content = "apiProjectId\np1\n" if name.endswith("CSV") else '{"apiProjectId": "p1"}\n'
    rows = read(write(tmp_path, name, content))
    assert [r.api_project_id for r in rows if isinstance(r, ManifestRow)] == ["p1"]


@pytest.mark.parametrize("content", ["", "\n\n  \r\n", "\ufeff", ",,\n"])
def test_csv_without_header(tmp_path: Path, content: str) -> None:
    assert "no header row" in _open_error(write(tmp_path, "m.csv", content))


def test_csv_header_naming_no_known_column(tmp_path: Path) -> None:
    message = _open_error(write(tmp_path, "m.csv", "proj-1,7\nproj-2,8\n"))
    assert "names no known column" in message
    assert "'proj-1'" in message


def test_csv_header_with_only_a_misspelt_column_suggests(tmp_path: Path) -> None:
    message = _open_error(write(tmp_path, "m.csv", "apiProjectID\nproj-1\n"))
    assert "'apiProjectID' -> 'apiProjectId'" in message


def test_csv_header_with_a_column_twice(tmp_path: Path) -> None:
    assert "'file' twice" in _open_error(write(tmp_path, "m.csv", "file,seed,file\n"))


def test_csv_header_not_utf8(tmp_path: Path) -> None:
    message = _open_error(write(tmp_path, "m.csv", b"apiProjectId,s\xffeed\np1,1\n"))
    assert "UTF-8" in message


def test_csv_header_only_is_an_empty_manifest(tmp_path: Path) -> None:
    assert read(write(tmp_path, "m.csv", "apiProjectId,seed\r\n")) == []


def test_empty_jsonl_is_an_empty_manifest(tmp_path: Path) -> None:
    assert read(write(tmp_path, "m.jsonl", "")) == []


# --- line numbers ---------------------------------------------------------------------


def test_csv_line_numbers_skip_blank_lines_and_count_multiline_records(tmp_path: Path) -> None:
    content = (
        "\n"  # file line 1: blank before the header
        "apiProjectId,prompt\n"  # 2
        "p1,a\n"  # 3: row 1
        "\n"  # 4
        ",\n"  # 5: all cells blank, not a row
        'p2,"two\nlines"\n'  # 6-7: row 2
        "p3,c\n"  # 8: row 3
        "   \n"  # 9
        "p4\n"  # 10: row 4
    )
    rows = read(write(tmp_path, "m.csv", content))
    assert [(r.line, r.physical_line) for r in rows if isinstance(r, ManifestRow)] == [
        (1, 3),
        (2, 6),
        (3, 8),
        (4, 10),
    ]
    assert isinstance(rows[1], ManifestRow) and rows[1].params == {"prompt": "two\nlines"}


def test_jsonl_line_numbers_skip_blank_lines(tmp_path: Path) -> None:
    content = '\n{"apiProjectId": "p1"}\n   \n\n{"apiProjectId": "p2"}\n'
    rows = read(write(tmp_path, "m.jsonl", content))
    assert [(r.line, r.physical_line) for r in rows if isinstance(r, ManifestRow)] == [
        (1, 2),
        (2, 5),
    ]


def test_row_errors_carry_row_number_and_file_line(tmp_path: Path) -> None:
    content = "apiProjectId,seed\n\np1,1\np2,x\n"
    rows = read(write(tmp_path, "m.csv", content))
    error = rows[1]
    assert isinstance(error, RowError)
    assert (error.line, error.field, error.path) == (2, "seed", str(tmp_path / "m.csv"))
    assert "(file line 4)" in error.message
    assert str(error).startswith(f"{tmp_path / 'm.csv'}: row 2, field 'seed': ")


def test_bad_rows_count_as_rows(tmp_path: Path) -> None:
    content = '{"apiProjectId": "p1"}\nnot json\n[1]\n{"apiProjectId": "p4"}\n'
    rows = read(write(tmp_path, "m.jsonl", content))
    kinds = [type(r).__name__ for r in rows]
    assert kinds == ["ManifestRow", "RowError", "RowError", "ManifestRow"]
    assert [r.line for r in rows] == [1, 2, 3, 4]


# --- encoding and layout --------------------------------------------------------------


def test_bom_crlf_and_trailing_whitespace(tmp_path: Path) -> None:
    content = "\ufeffapiProjectId ,seed\r\np1  ,7  \r\n\r\n  p2,8\t\r\n"
    rows = read(write(tmp_path, "m.csv", content))
    assert [(r.api_project_id, r.sampling) for r in rows if isinstance(r, ManifestRow)] == [
        ("p1", {"seed": 7}),
        ("p2", {"seed": 8}),
    ]


def test_jsonl_bom_and_crlf(tmp_path: Path) -> None:
    content = '\ufeff{"apiProjectId": "p1"}\r\n\r\n{"apiProjectId": "p2"}  \r\n'
    rows = read(write(tmp_path, "m.jsonl", content))
    assert [r.api_project_id for r in rows if isinstance(r, ManifestRow)] == ["p1", "p2"]


def test_old_mac_line_endings(tmp_path: Path) -> None:
    rows = read(write(tmp_path, "m.csv", "apiProjectId\rp1\rp2\r"))
    assert [(r.line, r.physical_line) for r in rows] == [(1, 2), (2, 3)]


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_bad_utf8_fails_only_its_row(tmp_path: Path, name: str) -> None:
    if name == "m.csv":
        content = b"apiProjectId,prompt\np1,ok\np2,caf\xe9\np3,ok\n"
    else:
        content = b'{"apiProjectId":"p1"}\n{"apiProjectId":"p2","prompt":"caf\xe9"}\n'
        content += b'{"apiProjectId":"p3"}\n'
    rows = read(write(tmp_path, name, content))
    assert [type(r).__name__ for r in rows] == ["ManifestRow", "RowError", "ManifestRow"]
    assert "not valid UTF-8" in str(rows[1])
    assert rows[1].line == 2


def test_bad_utf8_inside_a_multiline_record_names_its_line(tmp_path: Path) -> None:
    rows = read(write(tmp_path, "m.csv", b'apiProjectId,prompt\np1,"a\nb\xff"\n'))
    assert len(rows) == 1 and isinstance(rows[0], RowError)
    assert "its file line 3 is not valid UTF-8 (file line 2)" in rows[0].message


def test_overlong_line_fails_its_row_only(tmp_path: Path) -> None:
    content = "apiProjectId,prompt\np1,ok\np2," + "x" * (1 << 20) + "\np3,ok\n"
    rows = read(write(tmp_path, "m.csv", content))
    assert [type(r).__name__ for r in rows] == ["ManifestRow", "RowError", "ManifestRow"]
    assert "longer than" in str(rows[1])


def test_overlong_jsonl_line_fails_its_row_only(tmp_path: Path) -> None:
    long_line = '{"prompt": "' + "x" * (3 << 20) + '"}'
    content = '{"apiProjectId": "p1"}\n' + long_line + '\n{"apiProjectId": "p3"}\n'
    rows = read(write(tmp_path, "m.jsonl", content))
    assert [type(r).__name__ for r in rows] == ["ManifestRow", "RowError", "ManifestRow"]
    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[2].physical_line == 3


def test_unclosed_quote_is_a_row_error_not_a_crash(tmp_path: Path) -> None:
    rows = read(write(tmp_path, "m.csv", 'apiProjectId,prompt\np1,ok\np2,"never closed\n'))
    assert isinstance(rows[0], ManifestRow)
    assert isinstance(rows[1], RowError) and "not valid CSV" in rows[1].message


def test_text_after_a_closing_quote_is_a_row_error(tmp_path: Path) -> None:
    rows = read(write(tmp_path, "m.csv", 'apiProjectId,prompt\np1,"a"b\np2,ok\n'))
    assert isinstance(rows[0], RowError) and "not valid CSV" in rows[0].message
    assert isinstance(rows[1], ManifestRow) and rows[1].line == 2


def test_too_many_cells(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", "apiProjectId,prompt\np1,hello, world\n")
    assert "3 values but the header names 2 columns" in error.message


def test_fewer_cells_than_columns_are_absent(tmp_path: Path) -> None:
    row = good(tmp_path, "m.csv", "apiProjectId,seed,prompt\np1\n")
    assert (row.sampling, row.params) == ({}, {})


# --- sources ----------------------------------------------------------------------------


def test_project_row(tmp_path: Path) -> None:
    row = good(tmp_path, "m.csv", csv1("apiProjectId", "proj-1"))
    assert row.kind is Kind.API_PROJECT and row.kind == "project"
    assert (row.api_project_id, row.file, row.file_rel) == ("proj-1", None, None)
    assert row.source_identity == "proj-1"
    assert (row.id, row.idempotency_key, row.model, row.output) == (None, None, None, None)


def test_file_row_resolves_against_the_manifest_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "jobs/audio/a.wav", b"RIFF")
    manifest = write(tmp_path, "jobs/m.csv", csv1("file", "./audio//a.wav"))
    monkeypatch.chdir(tmp_path)  # a relative manifest path, and cwd is not its folder
    rows = read(Path("jobs/m.csv"))
    row = rows[0]
    assert isinstance(row, ManifestRow)
    assert row.kind is Kind.FILE
    assert row.file == tmp_path / "jobs" / "audio" / "a.wav"
    assert row.file.is_absolute()
    assert row.file_rel == "audio/a.wav" == row.source_identity
    assert manifest.exists()


def test_file_row_absolute_path(tmp_path: Path) -> None:
    audio = write(tmp_path, "elsewhere/a.wav", b"RIFF")
    row = good(tmp_path, "jobs/m.jsonl", jsonl1({"file": str(audio)}))
    assert row.file == audio and row.file_rel == audio.as_posix()


def test_missing_audio_file(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", csv1("file", "nope.wav"))
    assert error.field == "file"
    assert "file not found" in error.message and str(tmp_path / "nope.wav") in error.message


def test_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    error = bad(tmp_path, "m.csv", csv1("file", "sub"))
    assert error.field == "file" and "not a regular file" in error.message


def test_file_name_with_nul_is_a_row_error(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.jsonl", jsonl1({"file": "a\u0000b.wav"}))
    assert error.field == "file"


def test_both_sources(tmp_path: Path) -> None:
    write(tmp_path, "a.wav", b"x")
    error = bad(tmp_path, "m.csv", csv1("apiProjectId,file", "p1,a.wav"))
    assert "both apiProjectId and file" in error.message


def test_neither_source_lists_the_columns_it_saw(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", csv1("apiProjectId,file,seed,prompt", ",,7,hi"))
    assert "neither apiProjectId nor file" in error.message
    assert "values in: seed, prompt" in error.message


def test_neither_source_because_of_a_misspelt_column(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", csv1("fiel,seed", "a.wav,7"))
    assert "neither apiProjectId nor file" in error.message
    assert "values in: fiel, seed" in error.message
    assert "did you mean 'file'" in error.message


def test_neither_source_with_an_unrelated_column_says_it_is_ignored(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", csv1("path,seed", "a.wav,7"))
    assert "values in: path, seed" in error.message
    assert "unknown columns are ignored: path" in error.message


def test_misspelt_column_fails_an_otherwise_valid_row(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", csv1("apiProjectID,apiProjectId,seeds", "x,p1,7"))
    assert error.field == "apiProjectID"
    assert "did you mean 'apiProjectId'" in error.message


def test_misspelt_column_left_empty_is_harmless(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", csv1("apiProjectId,seeds,Model", "p1,,"))
    with open_manifest(path) as manifest:
        assert manifest.misspelt_columns == {"seeds": "seed", "Model": "model"}
        assert manifest.ignored_columns == ()
        rows = list(manifest)
    assert isinstance(rows[0], ManifestRow) and rows[0].sampling == {}


def test_unrelated_columns_are_ignored_and_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "apiProjectId,notes,,title\np1,remember,x,Song\n")
    with open_manifest(path) as manifest:
        assert manifest.ignored_columns == ("notes", "title")
        assert manifest.misspelt_columns == {}
        rows = list(manifest)
    assert isinstance(rows[0], ManifestRow) and rows[0].api_project_id == "p1"


def test_jsonl_unknown_keys(tmp_path: Path) -> None:
    content = '{"apiProjectId": "p1", "notes": 1}\n{"apiProjectId": "p2", "promt": "x"}\n'
    path = write(tmp_path, "m.jsonl", content)
    with open_manifest(path) as manifest:
        rows = list(manifest)
        assert manifest.ignored_columns == ("notes",)
    assert isinstance(rows[0], ManifestRow)
    assert isinstance(rows[1], RowError) and rows[1].field == "promt"
    assert "did you mean 'prompt'" in rows[1].message


# --- seed, sampling, params ---------------------------------------------------------------


@pytest.mark.parametrize("cell", ["7", "7.0", " 7 ", "7e0", "70e-1"])
def test_seed_by_value(tmp_path: Path, cell: str) -> None:
    row = good(tmp_path, "m.csv", csv1("apiProjectId,seed", f"p1,{cell}"))
    assert row.sampling == {"seed": 7}
    assert type(row.sampling["seed"]) is int


def test_seed_keeps_fractions(tmp_path: Path) -> None:
    assert good(tmp_path, "m.csv", csv1("apiProjectId,seed", "p1,2.5")).sampling == {"seed": 2.5}


@pytest.mark.parametrize("cell", ["abc", "true", '"7"', "[7]", "NaN", "1e999", "07", "0x10"])
def test_seed_must_be_a_number_csv(tmp_path: Path, cell: str) -> None:
    quoted = '"' + cell.replace('"', '""') + '"'
    error = bad(tmp_path, "m.csv", csv1("apiProjectId,seed", f"p1,{quoted}"))
    assert error.field == "seed" and "seed must be" in error.message


@pytest.mark.parametrize("seed", [True, [7], {"a": 1}, "abc"])
def test_seed_must_be_a_number_jsonl(tmp_path: Path, seed: Any) -> None:
    error = bad(tmp_path, "m.jsonl", jsonl1({"apiProjectId": "p1", "seed": seed}))
    assert error.field == "seed"


def test_seed_deeply_nested_is_a_row_error(tmp_path: Path) -> None:
    deep = "[" * 600 + "]" * 600
    error = bad(tmp_path, "m.jsonl", '{"apiProjectId": "p1", "seed": ' + deep + "}\n")
    assert error.field == "seed" and "got an array" in error.message


@pytest.mark.parametrize("seed", [7, 7.0, "7", "7.0"])
def test_seed_jsonl_number_or_numeric_string(tmp_path: Path, seed: Any) -> None:
    row = good(tmp_path, "m.jsonl", jsonl1({"apiProjectId": "p1", "seed": seed}))
    assert row.sampling == {"seed": 7}


def test_seed_merged_over_sampling_and_prompt_over_params(tmp_path: Path) -> None:
    row = good(
        tmp_path,
        "m.csv",
        csv1(
            "apiProjectId,seed,sampling,prompt,params",
            'p1,2,"{""seed"": 1, ""steps"": 4}",new,"{""prompt"": ""old"", ""mix"": 0.5}"',
        ),
    )
    assert row.sampling == {"seed": 2, "steps": 4}
    assert row.params == {"prompt": "new", "mix": 0.5}


def test_sampling_and_params_alone(tmp_path: Path) -> None:
    row = good(
        tmp_path, "m.csv", csv1("apiProjectId,sampling,params", 'p1,"{""seed"": 3}","{}"')
    )
    assert (row.sampling, row.params) == ({"seed": 3}, {})


@pytest.mark.parametrize("field", ["sampling", "params"])
def test_bad_json_names_the_field_and_the_error(tmp_path: Path, field: str) -> None:
    error = bad(tmp_path, "m.csv", csv1(f"apiProjectId,{field}", 'p1,"{""a"": }"'))
    assert error.field == field
    assert f"{field} is not valid JSON" in error.message
    assert "line 1 column" in error.message


@pytest.mark.parametrize("field", ["sampling", "params"])
@pytest.mark.parametrize("cell", ["[1]", "3", '"text"', "true"])
def test_json_must_be_an_object(tmp_path: Path, field: str, cell: str) -> None:
    quoted = '"' + cell.replace('"', '""') + '"'
    error = bad(tmp_path, "m.csv", csv1(f"apiProjectId,{field}", f"p1,{quoted}"))
    assert error.field == field and "must be a JSON object" in error.message


def test_json_null_means_empty_object(tmp_path: Path) -> None:
    row = good(tmp_path, "m.csv", csv1("apiProjectId,sampling,params", "p1,null,null"))
    assert (row.sampling, row.params) == ({}, {})


def test_too_deeply_nested_params(tmp_path: Path) -> None:
    deep = "[" * 300 + "]" * 300
    error = bad(tmp_path, "m.jsonl", '{"apiProjectId": "p1", "params": {"a": ' + deep + "}}\n")
    assert error.field == "params" and "nested" in error.message


def test_jsonl_sampling_object_or_string(tmp_path: Path) -> None:
    content = (
        jsonl1({"apiProjectId": "p1", "sampling": {"seed": 1}, "params": '{"prompt": "x"}'})
        + jsonl1({"apiProjectId": "p2", "sampling": 5})
    )
    rows = read(write(tmp_path, "m.jsonl", content))
    assert isinstance(rows[0], ManifestRow)
    assert (rows[0].sampling, rows[0].params) == ({"seed": 1}, {"prompt": "x"})
    assert isinstance(rows[1], RowError) and rows[1].field == "sampling"


def test_prompt_must_be_a_string_in_jsonl(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.jsonl", jsonl1({"apiProjectId": "p1", "prompt": 5}))
    assert error.field == "prompt"


# --- id, key, model, output ------------------------------------------------------------------


def test_explicit_id(tmp_path: Path) -> None:
    assert good(tmp_path, "m.csv", csv1("apiProjectId,id", "p1, take-1 ")).id == "take-1"
    assert good(tmp_path, "n.jsonl", jsonl1({"apiProjectId": "p1", "id": 7})).id == "7"
    error = bad(tmp_path, "o.jsonl", jsonl1({"apiProjectId": "p1", "id": True}))
    assert error.field == "id"


def test_explicit_key_trimmed(tmp_path: Path) -> None:
    row = good(tmp_path, "m.csv", csv1("apiProjectId,idempotencyKey", "p1,  my-key  "))
    assert row.idempotency_key == "my-key"


def test_blank_key_is_absent(tmp_path: Path) -> None:
    row = good(tmp_path, "m.csv", csv1("apiProjectId,idempotencyKey", 'p1,"   "'))
    assert row.idempotency_key is None


def test_key_of_255_chars_ok_and_256_not(tmp_path: Path) -> None:
    ok = good(tmp_path, "a.csv", csv1("apiProjectId,idempotencyKey", "p1," + "k" * 255))
    assert ok.idempotency_key == "k" * 255
    error = bad(tmp_path, "b.csv", csv1("apiProjectId,idempotencyKey", "p1," + "k" * 256))
    assert error.field == "idempotencyKey" and "256 characters" in error.message


def test_key_length_counts_utf16_units(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.jsonl", jsonl1({"apiProjectId": "p1", "idempotencyKey": "🎵" * 128}))
    assert error.field == "idempotencyKey"


def test_key_must_be_a_string_in_jsonl(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.jsonl", jsonl1({"apiProjectId": "p1", "idempotencyKey": 12}))
    assert error.field == "idempotencyKey" and "must be a string" in error.message


def test_model(tmp_path: Path) -> None:
    assert good(tmp_path, "a.csv", csv1("apiProjectId,model", "p1, diffio-3.4 ")).model == (
        "diffio-3.4"
    )
    assert good(tmp_path, "b.csv", csv1("apiProjectId,model", "p1,")).model is None
    error = bad(tmp_path, "c.csv", csv1("apiProjectId,model", "p1,../admin"))
    assert error.field == "model"
    error = bad(tmp_path, "d.jsonl", jsonl1({"apiProjectId": "p1", "model": 3.5}))
    assert error.field == "model" and "must be a string" in error.message


def test_output_on_file_row_kept(tmp_path: Path) -> None:
    write(tmp_path, "a.wav", b"x")
    row = good(tmp_path, "m.csv", csv1("file,output", "a.wav,../up/out.mp3"))
    assert row.output == "../up/out.mp3"  # the runner, not the reader, checks it


def test_output_on_project_row_is_an_error(tmp_path: Path) -> None:
    error = bad(tmp_path, "m.csv", csv1("apiProjectId,output", "p1,x.mp3"))
    assert error.field == "output"


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"apiProjectId": 5}, "apiProjectId"),
        ({"apiProjectId": ["p"]}, "apiProjectId"),
        ({"file": 1}, "file"),
        ({"apiProjectId": "p", "output": 1}, "output"),
    ],
)
def test_jsonl_wrong_types(tmp_path: Path, obj: dict[str, Any], field: str) -> None:
    error = bad(tmp_path, "m.jsonl", jsonl1(obj))
    assert error.field == field and "must be a string" in error.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("not json", "not valid JSON"),
        ('{"apiProjectId": "p1"', "not valid JSON"),
        ("[1, 2]", "got an array"),
        ('"p1"', "got a string"),
        ("7", "got a number"),
        ("null", "got null"),
    ],
)
def test_jsonl_line_not_an_object(tmp_path: Path, line: str, expected: str) -> None:
    error = bad(tmp_path, "m.jsonl", line + "\n")
    assert expected in error.message and error.field is None


def test_jsonl_null_values_are_absent(tmp_path: Path) -> None:
    row = good(
        tmp_path,
        "m.jsonl",
        jsonl1({"apiProjectId": "p1", "file": None, "seed": None, "model": None, "id": ""}),
    )
    assert (row.kind, row.sampling, row.model, row.id) == (Kind.API_PROJECT, {}, None, None)


def test_same_row_in_csv_and_jsonl_reads_the_same(tmp_path: Path) -> None:
    write(tmp_path, "a.wav", b"x")
    from_csv = good(
        tmp_path,
        "m.csv",
        csv1(
            "file,seed,prompt,sampling,params,idempotencyKey,model,output,id",
            'a.wav,7.0,hi,"{""t"": 1}","{""g"": [1]}",k,diffio-3.5,o.mp3,r1',
        ),
    )
    from_jsonl = good(
        tmp_path,
        "m.jsonl",
        jsonl1(
            {
                "file": "a.wav",
                "seed": 7,
                "prompt": "hi",
                "sampling": {"t": 1},
                "params": {"g": [1]},
                "idempotencyKey": "k",
                "model": "diffio-3.5",
                "output": "o.mp3",
                "id": "r1",
            }
        ),
    )
    assert from_csv.physical_line == 2 and from_jsonl.physical_line == 1
    assert dataclasses.replace(from_csv, physical_line=1) == from_jsonl


# --- iteration ---------------------------------------------------------------------------------


def test_read_once_and_closed_after(tmp_path: Path) -> None:
    manifest = open_manifest(write(tmp_path, "m.csv", "apiProjectId\np1\np2\n"))
    assert len(list(manifest)) == 2
    assert list(manifest) == []


def test_close_mid_way(tmp_path: Path) -> None:
    manifest = open_manifest(write(tmp_path, "m.csv", "apiProjectId\np1\np2\n"))
    first = next(manifest)
    assert isinstance(first, ManifestRow)
    manifest.close()
    assert list(manifest) == []


# --- fuzzing: the reader never raises on content ------------------------------------------------


def _fuzz(suffix: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"m{suffix}"
        path.write_bytes(content)
        (Path(folder) / "a.wav").write_bytes(b"x")
        try:
            manifest = open_manifest(path)
        except ManifestError:
            return
        with manifest:
            lines = []
            for row in manifest:
                assert isinstance(row, ManifestRow | RowError)
                lines.append(row.line)
                if isinstance(row, ManifestRow):
                    assert (row.api_project_id is None) != (row.file is None)
        assert lines == list(range(1, len(lines) + 1))


_tokens = st.sampled_from(
    [
        *KNOWN_COLUMNS,
        *("apiProjectID", "fiel", "notes", "a.wav", "p1", "7", "7.0", "x", "{}", "null"),
        *('{"seed": 1}', "[1]", '"', '""', ",", "\n", "\r\n", "\r", " ", "\ufeff", "\x00", "é"),
    ]
)
_fuzz_settings = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])


@_fuzz_settings
@given(st.binary(max_size=400))
def test_fuzz_csv_bytes(content: bytes) -> None:
    _fuzz(".csv", content)


@_fuzz_settings
@given(st.binary(max_size=400))
def test_fuzz_jsonl_bytes(content: bytes) -> None:
    _fuzz(".jsonl", content)


@_fuzz_settings
@given(st.lists(st.lists(_tokens, max_size=6).map(",".join), min_size=1, max_size=8))
def test_fuzz_csv_like_text(lines: list[str]) -> None:
    _fuzz(".csv", "\n".join(lines).encode("utf-8", "surrogatepass"))


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | _tokens
_json_obj = st.dictionaries(
    _tokens, st.recursive(_json_leaf, lambda i: st.lists(i, max_size=2), max_leaves=4), max_size=5
)


@_fuzz_settings
@given(st.lists(_json_obj.map(json.dumps) | st.text(max_size=20) | _tokens, max_size=8))
def test_fuzz_jsonl_like_text(lines: list[str]) -> None:
    _fuzz(".jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))


@_fuzz_settings
@given(st.text(max_size=300))
def test_fuzz_text(content: str) -> None:
    data = content.encode("utf-8", "surrogatepass")
    _fuzz(".csv", data)
    _fuzz(".jsonl", data)


_cells = _tokens | st.sampled_from(["p1", "a.wav", "7", '"{""seed"": 2}"', "diffio-3.4", "k"])
_header = st.lists(
    st.sampled_from([*KNOWN_COLUMNS, "notes", "seeds"]), min_size=1, max_size=6, unique=True
)


@_fuzz_settings
@given(_header, st.lists(st.lists(_cells, max_size=6), max_size=8), st.binary(max_size=40))
def test_fuzz_csv_with_a_header(header: list[str], rows: list[list[str]], tail: bytes) -> None:
    text = ",".join(header) + "\n" + "\n".join(",".join(row) for row in rows) + "\n"
    _fuzz(".csv", text.encode("utf-8", "surrogatepass") + tail)


_values = (
    _json_leaf
    | st.sampled_from(["p1", "a.wav", "missing.wav", "diffio-3.5", '{"seed": 1}', "7"])
    | st.dictionaries(st.text(max_size=3), _json_leaf, max_size=2)
)


@_fuzz_settings
@given(
    st.lists(
        st.dictionaries(st.sampled_from([*KNOWN_COLUMNS, "notes", "fiel"]), _values, max_size=6),
        max_size=8,
    ),
    st.binary(max_size=40),
)
def test_fuzz_jsonl_with_known_keys(objects: list[dict[str, Any]], tail: bytes) -> None:
    text = "\n".join(json.dumps(obj) for obj in objects) + "\n"
    _fuzz(".jsonl", text.encode("utf-8", "surrogatepass") + tail)


# --- memory ------------------------------------------------------------------------------------

_MEMORY_CHILD = """
import resource, sys
from pathlib import Path
from batcher.manifest import ManifestRow, open_manifest

manifest = open_manifest(Path(sys.argv[1]))
for _, row in zip(range(1000), manifest):  # warm up caches and the allocator
    pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = 1000 + sum(1 for row in manifest if isinstance(row, ManifestRow))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(count, (after - before) * 1024)
"""


@pytest.mark.slow
def test_reading_200000_rows_keeps_memory_flat(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("apiProjectId,seed,prompt,sampling\n")
        for i in range(200_000):
            f.write(f'proj-{i},{i},"restore, please",{{}}\n')
    size = path.stat().st_size
    child = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    count, grown = map(int, child.stdout.split())
    assert count == 200_000
    # Holding the rows (or the file) would grow by far more than the file's size.
    assert grown < size // 4, (grown, size)
