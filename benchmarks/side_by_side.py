"""Two benchmark runs side by side: did a change make any loop slower?

    python -m benchmarks.side_by_side BEFORE/benchmark.csv AFTER/benchmark.csv --out results/X.md

Both files come from `python -m benchmarks.bench` (run at two commits, on the same machine, one
after the other: timings from different machines or from a busy machine say nothing). The page
pairs their loop rows by recipe / backbone and data path (JPEG decoding in workers, or
`--image-cache --workers 0`) and gives after / before with both runs' spread (min-max), so a
difference inside the spread reads as none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from benchmarks import command
from tl import TLError
from tl.engine.tables import page_code, page_text, read_table


def data_path(case: str) -> str:
    """The data path of a loop row's case ("image cache", "device images" or "JPEG in workers"),
    with the case's further qualifiers ("device images, channels_last on"): rows that differ in
    any of them are different measurements, and each must pair with its own."""
    _, *rest = case.split(", ")
    where = rest[0] if rest else ""
    path = ("device images" if "--device-images" in where else "image cache" if "--image-cache" in where
            else "JPEG in workers")
    return ", ".join([path, *rest[1:]])


def loop_rows(csv: Path) -> pd.DataFrame:
    """The loop rows of one benchmark.csv, keyed by (case, path); --compile rows are left out."""
    table = read_table(csv, text=["kind", "case", "unit"])
    missing = {"kind", "case", "median", "min", "max", "n"} - set(table.columns)
    numbers = table[["median", "min", "max", "n"]].apply(pd.to_numeric, errors="coerce") if not missing else None
    if missing or numbers.isna().any().any():
        raise TLError(f"{csv} is not a table benchmarks.bench wrote (" + (f"no column {', '.join(sorted(missing))}"
                      if missing else "a median, min, max or n that is not a number") + "): give its benchmark.csv")
    table[["median", "min", "max", "n"]] = numbers
    table = table[(table["kind"] == "loop") & ~table["case"].str.contains("--compile")].copy()
    table["path"] = [data_path(c) for c in table["case"]]
    table["case"] = table["case"].str.split(",").str[0]
    return table.set_index(["case", "path"])[["median", "min", "max", "n"]]


def page(before: Path, after: Path, title: str) -> str:
    both = loop_rows(before).add_suffix("_before").join(loop_rows(after).add_suffix("_after"), how="inner")
    lines = [f"# {page_text(title)}", "", f"- before: {page_code(before)}", f"- after: {page_code(after)}", "",
             "| case | data path | before img/s (min-max) | after img/s (min-max) | after / before |",
             "|---|---|---|---|---|"]
    for (case, path), r in both.iterrows():
        lines.append(f"| {page_text(case)} | {page_text(path)} "
                     f"| {r.median_before:.2f} ({r.min_before:.2f}-{r.max_before:.2f}) | "
                     f"{r.median_after:.2f} ({r.min_after:.2f}-{r.max_after:.2f}) | "
                     f"{r.median_after / r.median_before:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side", description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="The loop before and after, same machine")
    args = p.parse_args(argv)
    from tl.engine.files import atomic_write_text

    atomic_write_text(args.out, page(args.before, args.after, args.title))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
