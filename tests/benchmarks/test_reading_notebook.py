"""The reading notebook (benchmarks/reading_notebook.py): its source, docs/reading.py, runs from the
first cell to the last in a real kernel on tiny images, so the code a learner reads cannot go stale;
the committed docs/reading.ipynb holds exactly the source's cells, every code cell run without an
error, so the notebook cannot drift from its source; a failing cell is one error naming it."""

from __future__ import annotations

import json
import sys

import nbformat
import pytest

from benchmarks.reading_notebook import NOTEBOOK, ROOT, execute, main, read_source
from tl import TLError

# The kernel is another process: it sees none of pytest's fixtures. This first cell blocks the network
# there as conftest.py does here, and registers the tiny backbone as tests/tune_main.py does, at the
# 32-pixel crops its 40-pixel images allow.
TINY_KERNEL = f"""import socket, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import TinyNet, _refuse_internet
socket.socket.connect = _refuse_internet
from tl.models import BACKBONES, Backbone
BACKBONES["tiny"] = Backbone("tiny", TinyNet, head="fc", neck=("block",), image_size=32)
print("kernel:", sys.executable)"""


def _text(cell) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))


def test_the_source_runs_on_tiny_images(tiny_data, pretrained, tmp_path, monkeypatch):
    foreign = tmp_path / "jupyter" / "kernels" / "python3"  # a "python3" of another Python, found first
    foreign.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-c", "raise SystemExit(3)"], "display_name": "another", "language": "python"}
    (foreign / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = read_source()
    nb.cells.insert(0, nbformat.v4.new_code_cell(TINY_KERNEL))
    env = {"TL_READING_DATA": str(tiny_data), "TL_READING_BACKBONE": "tiny", "TL_READING_WEIGHTS": str(pretrained)}
    execute(nb, env, timeout=120)
    text = "\n".join(_text(c) for c in nb.cells)
    assert f"kernel: {sys.executable}\n" in text  # the kernel is this Python, with this environment's packages
    assert f"photos:   {tiny_data}" in text and "backbone: tiny" in text  # the first cell read the variables
    assert "epoch  0/2 val" in text and "(baseline: no training yet)" in text  # the loop's epoch-0 row
    assert "frozen BatchNorm in eval mode (the recipe): None" in text  # the prefix check passes
    assert "the tail on stored features gives the model's logits: True" in text
    assert "stage 2 'everything'" in text
    pictures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # the batch and the schedule


def test_the_committed_notebook_is_the_source_with_outputs():
    source = read_source()
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in source.cells], \
        "docs/reading.ipynb is not docs/reading.py: run python -m benchmarks.reading_notebook"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell of docs/reading.ipynb was not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert NOTEBOOK.stat().st_size < 1_000_000


def test_a_failing_cell_is_one_error_naming_it():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# a"), nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("y = x\nraise ValueError('no photos')")])
    with pytest.raises(TLError) as caught:
        execute(nb, timeout=60)
    assert str(caught.value) == "the reading notebook stopped in cell 2 ('y = x'): ValueError: no photos"


def test_a_kernel_that_dies_is_one_error():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nos._exit(1)")])
    with pytest.raises(TLError, match=r"^the reading notebook's kernel \(.* -m ipykernel\) stopped: "):
        execute(nb, timeout=60)


def test_a_data_folder_without_train_is_refused_before_any_kernel_starts(tmp_path):
    with pytest.raises(TLError, match="no train/ folder"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "reading.ipynb")])
    assert not (tmp_path / "reading.ipynb").exists()
