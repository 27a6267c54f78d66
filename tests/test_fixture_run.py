"""A run folder made by earlier code (tests/fixtures/tiny_run, see make_tiny_run.py) must
still resume, evaluate and export exactly as the code that made it did: the files a run
writes are a promise to its user, whatever the code's shape."""

from __future__ import annotations

import csv
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import main
from tests.fixtures.make_tiny_run import DATA, RUN, onnx_outputs

EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "tiny_run_expected.json").read_text())
TIMINGS = ("seconds", "images_per_s", "train_seconds", "train_images_per_s", "wall_seconds")


@pytest.fixture
def old_run(tmp_path, tiny_backbone, own_cache_dir) -> Path:
    shutil.copytree(RUN, tmp_path / "run")
    return tmp_path / "run"


def _figures(history_csv: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(io.StringIO(history_csv))]


def test_old_run_resumes_to_the_same_numbers(old_run):
    assert main.main(["--resume", str(old_run / "last.ckpt"), "--epochs", "2", "--data", str(DATA),
                      "--no-progress"]) == 0
    assert _figures((old_run / "history.csv").read_text()) == _figures(EXPECTED["resumed_history_csv"])
    results = json.loads((old_run / "config.json").read_text())["results"]
    assert {k: v for k, v in results.items() if k not in TIMINGS} == \
        {k: v for k, v in EXPECTED["resumed_results"].items() if k not in TIMINGS}


def test_old_run_evaluates_to_the_same_numbers(old_run):
    text = io.StringIO()
    with redirect_stdout(text):
        assert main.main(["--evaluate", str(old_run / "best.pth"), "--data", str(DATA)]) == 0
    # (the classification report's line came later: the numbers made then are the promise)
    assert [line for line in text.getvalue().splitlines()
            if "acc" in line and not line.startswith("classification report:")] == EXPECTED["evaluate_lines"]


def test_old_run_exports_the_same_model(old_run):
    assert main.main(["--export", str(old_run), "--data", str(DATA)]) == 0
    logits, meta = onnx_outputs(old_run / "model.onnx")
    assert sum(logits, []) == pytest.approx(sum(EXPECTED["export_logits"], []), abs=1e-6)
    drop = lambda m: {k: v for k, v in json.loads(m["tl_meta"]).items() if k != "exported_from"}  # noqa: E731
    assert drop(meta) == drop(EXPECTED["export_metadata"])
