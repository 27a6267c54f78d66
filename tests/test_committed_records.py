"""Committed records (experiments/tuned/, results/) name no machine's absolute paths and hold no
credentials: a tuned file names its study relative to the cache folder ($TL_CACHE_DIR/...),
and no file holds a home folder (/root/..., /home/...) or a URL with a password in it. The
results/ files listed in HELD_BEFORE held such a path before this check existed; they are
outputs of earlier measurements and are left as they are (each must still hold one: a file
that is cleaned leaves the list)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = re.compile(r"(?<![\w.])/(?:root|home/[^/\s\"'`]+)/")  # /root/..., /home/<user>/...
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@\"'`]+:[^/\s@\"'`]+@", re.IGNORECASE)
HELD_BEFORE = {  # the benchmark commands' --out /root/out (GPU sessions), recorded in their pages
    "results/benchmark_cuda.json", "results/benchmark_cuda.md",
    "results/benchmark_cuda_runs/h100_2026-11-22_a5886d7.json",
    "results/benchmark_cuda_runs/h100_2026-11-22_a5886d7.md",
    "results/benchmark_cuda_runs/h200_2026-11-26_5796da4_sync_fix.json",
    "results/benchmark_cuda_runs/h200_2026-11-26_5796da4_sync_fix.md",
    "results/benchmark_cuda_runs/h200_2026-11-26_fc77a12_compile.json",
    "results/benchmark_cuda_runs/h200_2026-11-26_fc77a12_compile.md",
    "results/benchmark_cuda_runs/h200_2026-11-26_fc77a12_session.log",
}


def leaks(text: str) -> list[str]:
    return [m.group(0) for pattern in (HOME, URL_PASSWORD) for m in pattern.finditer(text)]


def _records() -> dict[str, str]:
    files = [p for folder in ("experiments/tuned", "results") for p in sorted((ROOT / folder).rglob("*"))
             if p.is_file() and p.suffix not in (".png", ".db")]
    return {p.relative_to(ROOT).as_posix(): p.read_text(errors="replace") for p in files}


def test_committed_records_hold_no_home_paths_and_no_passwords():
    records = _records()
    found = {name: leaks(text)[:3] for name, text in records.items() if leaks(text) and name not in HELD_BEFORE}
    assert not found, f"absolute home paths or URL passwords in committed records: {found}"
    cleaned = sorted(name for name in HELD_BEFORE if not leaks(records.get(name, "")))
    assert not cleaned, f"no longer hold one (remove them from HELD_BEFORE): {cleaned}"


def test_the_scan_finds_each_kind():
    assert leaks('"storage": "/root/.cache/tl-reference/features/tuning/x.db"') == ["/root/"]
    assert leaks("--data /home/ana/photos") == ["/home/ana/"]
    assert leaks("postgresql://optuna:s3cret@db.example/study") == ["postgresql://optuna:s3cret@"]
    assert leaks('"storage": "$TL_CACHE_DIR/tuning/x.db" --data data/dogs-vs-cats ../shared/data') == []
    assert leaks("sqlite:///study.db https://example.org/a:b") == []


def test_each_row_of_the_results_is_made_by_a_recorded_command_and_each_command_s_rows_are_there():
    """results/README says which compare_all command made each row (meta.json); a row renamed or
    replaced by hand must be renamed in the command's record too, or the page names the wrong command."""
    import json

    import pandas as pd

    from experiments import report

    meta = json.loads((ROOT / "results" / "meta.json").read_text())
    summary = pd.read_csv(ROOT / "results" / "summary.csv")
    rows = set(zip(summary.dataset, summary.experiment, summary.backbone))
    listed = {(dataset, *pair) for dataset, info in meta["datasets"].items() for c in info["commands"]
              for pair in report._pairs(c)}  # the rows results/README says each command made
    assert not rows - listed, f"rows no recorded command made: {sorted(rows - listed)}"
    assert not listed - rows, f"recorded commands' rows missing from summary.csv: {sorted(listed - rows)}"
