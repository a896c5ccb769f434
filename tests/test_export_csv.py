"""CSV export cells: no spreadsheet formulas, and every record reads back whole."""

from __future__ import annotations

import csv
import io

from hypothesis import given
from hypothesis import strategies as st

from batcher.ops.export import FORMULA_STARTS, csv_cell, csv_line


@given(st.lists(st.text(max_size=20), min_size=2, max_size=6))
def test_cells_never_start_a_formula_and_read_back_as_written(values: list[str]) -> None:
    cells = [csv_cell(v) for v in values]
    assert not [c for c in cells if c.startswith(FORMULA_STARTS)]
    # Unescaping is dropping the one added quote.
    assert [c[1:] if v.startswith(FORMULA_STARTS) else c
            for v, c in zip(values, cells, strict=True)] == values
    # A CR or LF inside a cell never splits the record.
    assert list(csv.reader(io.StringIO(csv_line(cells), newline=""))) == [cells]


def test_objects_are_json_and_absent_values_empty() -> None:
    assert csv_cell({"code": "x"}) == '{"code":"x"}'
    assert csv_cell(None) == "" and csv_cell(3) == "3"
    assert csv_cell("-2+3") == "'-2+3" and csv_cell("\t=1") == "'\t=1"
