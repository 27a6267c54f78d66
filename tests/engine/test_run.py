"""tl/engine/run.py: a refused resume prints nothing before its error, --compile trains the same
network and saves the plain names, and combine runs every step callback (any one stops)."""

from __future__ import annotations

import shutil

import pytest

from experiments import get_experiment
from tests.conftest import write_image_folder
from tests.fixtures.make_tiny_run import RUN
from tests.helpers import finetune_one_epoch
from tl import TLError
from tl.engine.run import combine, resume_run


def test_a_refused_resume_says_nothing_before_its_error(tmp_path, tiny_backbone, own_cache_dir):
    """--resume on other data: the refusal is the only thing printed (the checks come before the
    model is built and its recipe line logged)."""
    shutil.copytree(RUN, tmp_path / "run")
    three = write_image_folder(tmp_path / "three", classes=3, train=2, val=2, size=16)
    logs = []
    with pytest.raises(TLError, match="was trained on classes"):
        resume_run(tmp_path / "run" / "last.ckpt", {"data": three, "epochs": 2}, get_experiment, log=logs.append)
    assert logs == []


def test_compile_trains_the_same_network_and_saves_the_plain_names(tiny_data, tiny_backbone, tmp_path):
    """`--compile` on the CPU (inductor needs a C++ compiler; about 50 s
    here, most of it compiling). Checkpoints keep the
    plain module's names, config.json records the option, and a resume that changes it is refused."""
    import time

    from tl import TLError
    from tl.engine import checkpoint
    from tl.engine.resume import resume_options

    started = time.perf_counter()
    # with --ema in both: the average is of the compiled network's weights, under their plain names too
    plain = finetune_one_epoch(tiny_data, tmp_path / "a", ema=0.7)
    compiled = finetune_one_epoch(tiny_data, tmp_path / "b", compile=True, ema=0.7)
    print(f"compiled run: {time.perf_counter() - started:.1f} s")
    assert compiled.config["options"]["compile"] is True and plain.config["options"]["compile"] is False
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    a, b = (checkpoint.load_state_file(r.run_dir / "best.pth") for r in (plain, compiled))
    assert list(a) == list(b)  # no "_orig_mod." prefix
    ckpt = checkpoint.load_checkpoint(compiled.run_dir / "last.ckpt")
    assert list(ckpt["model"]) == list(a)
    plain_ckpt = checkpoint.load_checkpoint(plain.run_dir / "last.ckpt")
    assert list(ckpt["ema"]) == list(plain_ckpt["ema"]) and int(ckpt["ema"]["n_averaged"]) > 1
    rows = [[r["loss"] for r in x.history.rows] for x in (plain, compiled)]
    assert all(abs(p - c) < 1e-3 for p, c in zip(*rows)), rows  # the same network, another kernel fusion
    import pytest

    with pytest.raises(TLError, match="compile False"):
        resume_options(ckpt, {"compile": False}, compiled.run_dir / "last.ckpt")


@pytest.mark.usefixtures("own_cache_dir")
def test_combine_calls_every_callback_and_stops_if_any_asks():
    seen = []
    both = combine(lambda e: seen.append(("a", e)) or True, None, lambda e: seen.append(("b", e)))
    assert both(3) is True and seen == [("a", 3), ("b", 3)]  # the second is called after the first asked to stop
    assert combine(lambda e: None, lambda e: None)(0) is False
    assert combine(None, None) is None


@pytest.mark.usefixtures("own_cache_dir")
def test_step_callbacks_all_run_and_any_of_them_stops():
    calls = []
    after = combine(lambda e: calls.append("a"), lambda e: calls.append("b") or True, lambda e: calls.append("c"))
    assert after(1) is True and calls == ["a", "b", "c"]
    assert combine() is None
