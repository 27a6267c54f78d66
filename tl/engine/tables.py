"""Tables people open in a spreadsheet: the one way this project writes a CSV file and reads it back.

Every CSV file of a run folder, of a study (experiments/) and of a benchmark is written by
`write_table` (or its text made by `table_text`) and read by `read_table`. The file is
plain CSV (RFC 4180) that pandas, Python's csv module and any spreadsheet read, and:

* one record is one row. A cell holding a comma, a double quote, a line feed or a carriage
  return is quoted (a bare carriage return would split the row in two for many readers);
  lines end with "\\n".
* a text cell that a spreadsheet would run as a formula, one starting with = + - @, a tab,
  a carriage return, a line feed or NUL (OWASP's list for CSV injection), is written with a
  single quote ' in front: `=HYPERLINK(...)` is the cell `'=HYPERLINK(...)`, which a
  spreadsheet shows as text. So is a text cell a reader would take for something else: one
  that reads as a number (`1e3`, `-1`, `nan`) or as true/false (`True`, `False`), and one
  that starts with ' itself. Numbers are written as numbers (-0.5 stays -0.5).
* an empty cell is a missing value (None, NaN); an empty text is an empty cell too.

`read_table` undoes exactly that: a cell starting with ' is text, the quote removed. A
column whose every filled cell is an unmarked number comes back as numbers (int64 when
all are whole and none is missing, float64 otherwise, missing ones NaN); one of True/False
as booleans; every other column as text, with nothing read as missing: a class named `NA`,
`null` or `None` stays that name (pandas' own defaults would make it NaN). An empty cell in
a text column is the empty text. `text=` names columns that are always text, for a file
another program wrote without the marks (its class `1e3` would otherwise be a number).

A Markdown page (a run's classification_report.md, a study's README) shows such names through
`page_text` (and commands and paths through `page_code`): a carriage return or line feed in a name
is shown as \\r or \\n, never a broken line, and markup in a name is shown, not obeyed.

With pandas alone, `pd.read_csv(path, dtype=str, keep_default_na=False)` gives every cell
as written; a text cell that starts with ' is the text after that quote.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tl import TLError
from tl.engine.class_names import CONTROL, one_line, shown_char

MARK = "'"  # the quote in front of a text cell a spreadsheet or a reader would take for something else
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")  # OWASP's CSV injection list (and NUL, ASVS 1.2.10)
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
WHOLE = re.compile(r"[+-]?\d+")
TRUTH = {"True": True, "False": False}


def text_cell(text: str) -> str:
    """A text as its cell: with MARK in front where it would otherwise run, or read back
    as something else (module docstring)."""
    risky = text[:1] in FORMULA_START or text.startswith(MARK) or NUMBER.fullmatch(text) or text in TRUTH
    return MARK + text if risky else text


# control characters (C0 with CR and LF, DEL, C1), the line and paragraph separators, and the marks that
# reverse the text after them
MARKDOWN = re.compile(r"[\\`*\[\]<>|#&~$]|(?<![^\W_])_|_(?![^\W_])")  # what Markdown (or HTML in it)
# would read as markup; an underscore inside a word (golden_retriever) is no emphasis and stays as it is
LIST_START = re.compile(r"^([-+]|\d+(?=[.)]))")  # what would start a list where a name starts a line or an item


def page_text(value) -> str:
    """A name from the user's files (a class, a file, a data folder, a title) as text of a Markdown
    page, shown as it is: each character Markdown or HTML would read as markup (| ` * [ ] < > # &
    ~ $, an underscore at a word's edge, a leading - + or "1.") escaped with a backslash, each
    control character shown as its escape (\\r, \\n, \\x07), so the name stays on its line and
    in its table cell, and leading or trailing spaces kept. Every page of a run, a study and a
    benchmark shows names through it (and through `page_code` inside code)."""
    text = LIST_START.sub(lambda m: m.group() + "\\" if m.group()[0].isdigit() else "\\" + m.group(),
                          MARKDOWN.sub(lambda m: "\\" + m.group(), str(value)))
    text = CONTROL.sub(shown_char, text)
    core = text.strip(" ")
    if not core:
        return "&#32;" * len(text)
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    return "&#32;" * lead + core + "&#32;" * trail


def page_code(value) -> str:
    """A command or a path as a Markdown code span, shown as it is: inside code nothing is markup,
    so only control characters are shown as their escapes (\\n), and the span is fenced by more
    backticks than the text holds in a row. (In a table cell, a | would still end the cell: code
    spans go outside tables.)"""
    text = one_line(value)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(value) -> str:
    """One value as its cell: missing -> empty, a number as itself, anything else as text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        # the shortest text that reads back as the same number: repr of a float (numpy's float64 is one,
        # whose own repr is np.float64(...)); a float32 prints its own (0.1, where float() gives 0.10000000149011612)
        return "" if math.isnan(value) else (repr(float(value)) if isinstance(value, float) else str(value))
    return text_cell(value if isinstance(value, str) else str(value))


def _field(text: str) -> str:
    """RFC 4180 quoting, done here: Python's csv writer leaves a lone carriage return unquoted."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


def _records(table, columns: Sequence[str] | None) -> tuple[list, Iterable[Sequence]]:
    """(the columns, the rows as value sequences in their order) of a DataFrame, of dicts
    (keys not in `columns` left out, missing ones empty) or of sequences (`columns` needed)."""
    if isinstance(table, pd.DataFrame):
        columns = list(table.columns if columns is None else columns)
        frame = table.reindex(columns=columns)
        # column by column as stored: a float32 keeps its own shortest form (itertuples makes it a float), a
        # nullable integer stays whole (its to_numpy() is floats)
        values = [frame.iloc[:, j] for j in range(len(columns))]
        return columns, zip(*(v.to_numpy() if isinstance(v.dtype, np.dtype) else list(v.array) for v in values))
    rows = list(table)
    if rows and isinstance(rows[0], Mapping):
        columns = list(columns if columns is not None else dict.fromkeys(k for r in rows for k in r))
        return columns, ([r.get(c) for c in columns] for r in rows)
    if columns is None:
        raise TypeError("a table of plain rows needs its columns")
    return list(columns), rows


def table_text(table, columns: Sequence[str] | None = None) -> str:
    """The CSV text of `table` (a DataFrame, a list of dicts or a list of rows): a header of
    `columns` (default: all of them, in order), then one line per record (module docstring)."""
    columns, rows = _records(table, columns)
    lines = [",".join(_field(cell(c)) for c in columns)]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} values for {len(columns)} columns")
        # one column's empty cell as "": an empty line would be no record at all
        lines.append(",".join(_field(cell(v)) for v in row) or '""')
    return "\n".join(lines) + "\n"


def write_table(path: str | os.PathLike, table, columns: Sequence[str] | None = None) -> Path:
    """Write `table` to the CSV file `path` (see `table_text`), atomically: a reader sees the
    old file or the whole new one, never half of one (tl/engine/files.py)."""
    from tl.engine.files import atomic_write_text  # (torch comes with it: reading a table needs none)

    return atomic_write_text(path, table_text(table, columns))


def _column(cells: list[str], text: bool) -> list | np.ndarray:
    """One column's cells as its values: numbers, booleans or text (module docstring)."""
    filled = [c for c in cells if c != ""]
    if not text and filled and not any(c.startswith(MARK) for c in filled):
        if all(NUMBER.fullmatch(c) for c in filled):
            if len(filled) == len(cells) and all(WHOLE.fullmatch(c) for c in cells):
                try:
                    return np.array([int(c) for c in cells], dtype=np.int64)
                except OverflowError:
                    pass  # beyond int64: as floats
            return np.array([float(c) if c else math.nan for c in cells], dtype=np.float64)
        if all(c in TRUTH for c in filled):
            values = [TRUTH.get(c) for c in cells]
            return np.array(values, dtype=bool) if len(filled) == len(cells) else [
                math.nan if v is None else v for v in values]
    if not text and not filled and cells:
        return np.full(len(cells), math.nan)  # an empty column: all missing
    return [c[len(MARK):] if c.startswith(MARK) else c for c in cells]


def read_table(path: str | os.PathLike, text: Iterable[str] = ()) -> pd.DataFrame:
    """The table in the CSV file `path`, every text as it was written (module docstring).
    A file whose rows do not fit its header, or that is not UTF-8, is a TLError naming it."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.reader(f, strict=True))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TLError(f"{path} is not a readable CSV table ({type(exc).__name__}: {exc})") from None
    if not records:
        return pd.DataFrame()
    header = [c[len(MARK):] if c.startswith(MARK) else c for c in records[0]]
    # a blank line is no record (as for pandas); a one-column table writes its empty cell as ""
    body = [r for r in records[1:] if r]
    if bad := next((i for i, r in enumerate(body, 1) if len(r) != len(header)), None):
        raise TLError(f"{path}: record {bad} has {len(body[bad - 1])} cells, the header {len(header)}: "
                      f"the table was cut or edited by hand")
    text = set(text)
    frame = pd.DataFrame({j: _column([r[j] for r in body], name in text) for j, name in enumerate(header)},
                         index=range(len(body)))
    frame.columns = header
    return frame
