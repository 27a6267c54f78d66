"""tl/engine/tables.py: every CSV table is one row per record, runs nothing in a spreadsheet, and
reads back as written: hostile file and class names in the raw cells (Python's csv module) and
through `read_table`, numbers as numbers, a class named NA or 1e3 as that name."""

from __future__ import annotations

import csv
import random
import re

import numpy as np
import pandas as pd
import pytest

from tl import TLError
from tl.engine import tables
from tl.engine.tables import FORMULA_START, MARK, read_table, table_text, write_table

HOSTILE = ["a\rb.jpg", "a\nb.jpg", "a\r\nb.jpg", "\rstart.jpg", "\nstart.jpg", "=1+1", "=HYPERLINK(\"http://x\",\"y\")",
           "+41 cmd", "-2+3", "@SUM(A1)", "\tTAB.jpg", "'quoted", "''twice", "comma,name.jpg", 'say "cheese".jpg',
           "ünïcødé/猫.jpg", "NA", "null", "None", "nan", "NaN", "inf", "-inf", "1e3", "-1", "0", "007", ".5", "+5",
           "True", "False", "true", " 3", "3 ", "=NA", "\0nul", "plain.jpg", "a,\r\n\"b\"", "'", "-", "="]


def _raw(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _check_raw_text(cell: str, original: str) -> None:
    """The raw cell of a text: itself, or MARK + itself where it would run or read as another thing."""
    assert cell in (original, MARK + original)
    assert not cell.startswith(FORMULA_START), f"{cell!r} would run in a spreadsheet"
    if cell == original:
        assert not original.startswith(MARK) and not original.startswith(FORMULA_START)


def test_hostile_names_are_one_row_each_neutralised_and_read_back(tmp_path):
    rows = [{"path": name, "label": label, "prediction": "=NA", "p": -0.5, "n": i}
            for i, (name, label) in enumerate(zip(HOSTILE, reversed(HOSTILE)))]
    path = write_table(tmp_path / "t.csv", rows)
    raw = _raw(path)
    assert raw[0] == ["path", "label", "prediction", "p", "n"]
    assert len(raw) == len(rows) + 1  # one record per row: no CR or LF split one
    for cells, row in zip(raw[1:], rows):
        _check_raw_text(cells[0], row["path"])
        _check_raw_text(cells[1], row["label"])
        assert cells[2] == "'=NA"
        assert cells[3:] == ["-0.5", str(row["n"])]  # numbers stay numbers: -0.5 is not a formula
    table = read_table(path)
    assert table.path.tolist() == HOSTILE
    assert table.label.tolist() == HOSTILE[::-1]
    assert (table.prediction == "=NA").all()
    assert table.p.dtype == np.float64 and (table.p == -0.5).all()
    assert table.n.dtype == np.int64 and table.n.tolist() == list(range(len(HOSTILE)))


@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_name_alone_is_its_own_column_of_text(tmp_path, name):
    """A name alone in its column (a data set of one photo, one class): no other cell tells the
    reader the column is text, so the mark must."""
    path = write_table(tmp_path / "t.csv", [{"class": name, "support": 3}])
    raw = _raw(path)
    assert len(raw) == 2
    _check_raw_text(raw[1][0], name)
    table = read_table(path)
    assert table["class"].tolist() == [name] and table.support.tolist() == [3]


def test_classes_that_pandas_would_turn_into_missing_or_numbers_stay_names(tmp_path):
    names = ["NA", "null", "None", "1e3", "-1", "N/A", "#N/A", "NULL", "nan", "n/a", ""]
    path = write_table(tmp_path / "t.csv", [[n, n] for n in names], ["label", "prediction"])
    table = read_table(path)
    assert table.label.tolist() == names and table.prediction.tolist() == names
    assert (table.label == table.prediction).all()  # every answer right, as written


def test_random_text_from_hostile_characters_reads_back_exactly(tmp_path):
    """Text drawn from the characters that matter (separators, quotes, line ends, formula starts,
    digits, letters of N/A), beside numbers: whatever comes out, each row is one record, no text
    cell starts a formula, and the reader returns every text and number as it was."""
    rng = random.Random(36)
    alphabet = list("=+-@\t\r\n\0',\" .eE0123456789NAnaultrfsTF/#猫é")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(400)]
    numbers = [rng.choice([-1, 1]) * rng.random() * 10 ** rng.randint(-8, 8) for _ in texts]
    path = write_table(tmp_path / "t.csv", pd.DataFrame({"text": texts, "x": numbers}))
    raw = _raw(path)
    assert len(raw) == len(texts) + 1
    for cells, text in zip(raw[1:], texts):
        _check_raw_text(cells[0], text)
    table = read_table(path)
    assert table.text.tolist() == texts
    assert table.x.tolist() == numbers  # bit for bit: repr round-trips a float


def test_numbers_booleans_and_missing_values_keep_their_kind(tmp_path):
    frame = pd.DataFrame({"whole": [1, -2, 3], "real": [-0.5, np.nan, 1e-300], "flag": [True, False, True],
                          "count": pd.array([1, None, 3], dtype="Int64"), "f32": np.array([0.1, 2, -3], np.float32),
                          "empty": [None, None, None], "text": ["x", "", "NA"]})
    path = write_table(tmp_path / "t.csv", frame)
    assert _raw(path)[1] == ["1", "-0.5", "True", "1", "0.1", "", "x"]
    table = read_table(path)
    assert table.whole.dtype == np.int64 and table.whole.tolist() == [1, -2, 3]
    assert table.real.dtype == np.float64 and table.real[0] == -0.5 and np.isnan(table.real[1])
    assert table.real[2] == 1e-300
    assert table.flag.dtype == bool and table.flag.tolist() == [True, False, True]
    assert table["count"][0] == 1 and np.isnan(table["count"][1])
    assert table.f32.tolist() == [0.1, 2.0, -3.0]
    assert table["empty"].isna().all()
    assert table.text.tolist() == ["x", "", "NA"]  # an empty cell among texts is the empty text


def test_columns_choose_and_order_the_cells_and_missing_ones_are_empty(tmp_path):
    text = table_text([{"b": 1, "a": "x", "extra": 9}, {"a": "y"}], ["a", "b", "gone"])
    assert text == "a,b,gone\nx,1,\ny,,\n"
    one_column = table_text([[None], ["v"]], ["only"])
    assert one_column == 'only\n""\nv\n'  # an empty line would be no record at all
    path = tmp_path / "one.csv"
    path.write_text(one_column)
    assert read_table(path).only.tolist() == ["", "v"]


def test_text_columns_of_a_file_written_elsewhere(tmp_path):
    """A table that pandas wrote, without the marks: NA stays NA (not NaN), and the columns named
    text= stay the names they were even when every one looks like a number."""
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["1", "1e3"], "prediction": ["NA", "null"],
                  "acc": [0.5, 1.0]}).to_csv(tmp_path / "legacy.csv", index=False)
    table = read_table(tmp_path / "legacy.csv", text=["label"])
    assert table.label.tolist() == ["1", "1e3"] and table.prediction.tolist() == ["NA", "null"]
    assert table.acc.tolist() == [0.5, 1.0]
    assert read_table(tmp_path / "legacy.csv").label.tolist() == [1.0, 1000.0]  # without text=: numbers


def test_pandas_with_the_documented_options_sees_the_raw_cells(tmp_path):
    """The docs tell a user who reads a table with pandas alone what they get: every cell as
    written, a text that would run starting with the quote."""
    path = write_table(tmp_path / "t.csv", [["=cmd", "NA", "a\rb", -1.5]], ["x", "y", "z", "n"])
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert table.iloc[0].tolist() == ["'=cmd", "NA", "a\rb", "-1.5"]


@pytest.mark.parametrize("text, what", [("a,b\n1,2,3\n", "record 1 has 3 cells, the header 2"),
                                        ("a,b\n1\n", "record 1 has 1 cells"),
                                        ('a,b\n"1,2\n', "not a readable CSV table"),
                                        (b"a\n\xff\xfe\n", "not a readable CSV table")])
def test_a_table_that_is_cut_or_not_text_is_an_error_naming_it(tmp_path, text, what):
    path = tmp_path / "bad.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TLError, match=what) as caught:
        read_table(path)
    assert str(path) in str(caught.value)


def test_an_empty_file_and_a_header_alone(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert read_table(tmp_path / "empty.csv").empty
    path = write_table(tmp_path / "header.csv", [], ["path", "label"])
    table = read_table(path)
    assert list(table.columns) == ["path", "label"] and len(table) == 0


@pytest.mark.parametrize("name, shown", [
    ("a\rb", "a\\rb"), ("line\nfeed", "line\\nfeed"), ("tab\there", "tab\\there"), ("bell\x07", "bell\\x07"),
    ("del\x7f", "del\\x7f"), ("a|b", "a\\|b"), ("`rm -rf`", "\\`rm -rf\\`"), ("été_2024 (1)", "été_2024 (1)"),
    ("<img src=x onerror=alert(1)>", "\\<img src=x onerror=alert(1)\\>"), ("*x* [y](z)", "\\*x\\* \\[y\\](z)"),
    ("<!--", "\\<!--"), ("_x_", "\\_x\\_"), ("- item", "\\- item"), ("12. x", "12\\. x"), ("   ", "&#32;" * 3),
    (" lead", "&#32;lead"), ("abc\u202edef", "abc\\u202edef"), ("n\x85el", "n\\x85el"), ("x\u2028y", "x\\u2028y"),
    ("a\u061cb", "a\\u061cb"), ("$x^2$", "\\$x^2\\$"),
    ("back\\slash", "back\\\\slash"), ("&lt;", "\\&lt;"), ("# x", "\\# x"),
])
def test_a_name_on_a_page_stays_on_its_line_and_in_its_cell(name, shown):
    """The name's text is shown, not obeyed: no markup, no HTML, its line and its cell kept."""
    assert tables.page_text(name) == shown
    row = f"| {tables.page_text(name)} | 1 |"
    assert "\n" not in row and "\r" not in row and len(re.findall(r"(?<!\\)\|", row)) == 3


@pytest.mark.parametrize("text, shown", [
    ("python main.py --data d", "`python main.py --data d`"), ("a`b", "``a`b``"), ("`x`", "`` `x` ``"),
    ("line\nfeed | pipe", "`line\\nfeed | pipe`"), ("``two``", "``` ``two`` ```"),
])
def test_a_command_on_a_page_is_one_code_span_shown_as_it_is(text, shown):
    assert tables.page_code(text) == shown
