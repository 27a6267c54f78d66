"""Schedules and stages in the one loop (tl/stages.py): a stage trains exactly what it should,
a schedule's learning rates follow its formula step by step, a run resumed in the middle of
a schedule or a stage (or at the boundary between two) equals an uninterrupted one, and
BatchNorm in eval mode leaves its running statistics bit for bit as they were."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import main
import tl.engine.run
from tests.conftest import TinyNet
from tests.helpers import assert_same_run
from tl.engine import checkpoint
from tl.loop import Hooks, train_model
from tl.models import BATCHNORM
from tl.stages import Stage, one_cycle, place, warmup_cosine

pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own (conftest)


def _run(data, out, recipe, epochs, *extra, weights=None):
    argv = ["-e", recipe, "-b", "tiny", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "5", "--no-progress", *extra]
    if weights is not None:
        argv += ["--weights", str(weights)]
    assert main.main(argv) == 0
    (run_dir,) = out.iterdir()
    return run_dir


def _model(run_dir):
    return checkpoint.load_checkpoint(run_dir / "last.ckpt")["model"]


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k, t in before.items() if not torch.equal(t, after[k])}


# ----------------------------------------------------------------------------- what each stage trains
def test_the_head_first_stage_leaves_the_body_bit_identical_and_the_next_moves_everything(
        tiny_data, pretrained, tmp_path):  # noqa: F811
    start = torch.load(pretrained, weights_only=True)
    run_dir = _run(tiny_data, tmp_path / "a", "modern_finetune", 1, "--no-augment", weights=pretrained)
    after_stage_1 = _model(run_dir)
    # stage 1: only the new head moved; every body tensor, BatchNorm statistics included, is as loaded
    assert _changed({k: v for k, v in start.items() if not k.startswith("fc.")}, after_stage_1) == set()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["stages"][0]["feature_cache"].startswith("train + val")  # the frozen stage is cached: exact
    assert main.main(["--resume", str(run_dir / "last.ckpt"), "--epochs", "2", "--no-progress"]) == 0
    after_stage_2 = _model(run_dir)
    params = {n for n, _ in TinyNet().named_parameters()}
    assert params <= _changed(after_stage_1, after_stage_2)  # stage 2: every parameter trains
    config = json.loads((run_dir / "config.json").read_text())
    assert [s["name"] for s in config["stages"]] == ["head on the frozen body", "everything"]
    assert config["stages"][1]["feature_cache"].startswith("off")  # the body trains: nothing to cache


def test_fastais_frozen_stage_trains_batchnorm_and_the_head_but_no_filter(tiny_data, pretrained, tmp_path):  # noqa: F811
    start = torch.load(pretrained, weights_only=True)
    after = _model(_run(tiny_data, tmp_path / "a", "two_stage", 1, "--no-augment", weights=pretrained))
    moved = _changed(start, after)
    bn = {f"{m}.{p}" for m in ("stem.1", "block.1") for p in ("weight", "bias", "running_mean", "running_var",
                                                               "num_batches_tracked")}
    assert moved == bn | {"fc.weight", "fc.bias"}  # train_bn=True: scale, shift and statistics; no conv weight


def test_stages_are_laid_on_the_loops_epochs():
    a, b = Stage("a", setup=None, epochs=1), Stage("b", setup=None)
    assert [(s.index, s.start, s.end, s.epochs) for s in place([a, b], 4)] == [(0, 0, 2, 1), (1, 2, 5, 3)]
    assert [(s.index, s.start, s.end) for s in place([a, b], 1)] == [(0, 0, 2)]  # a 1-epoch run: stage 1 only


# ----------------------------------------------------------------------------- schedules, step by step
def _lrs_seen(net, optimizer, scheduler, interval, epochs, batches=3):
    """The learning rate of every optimizer step the loop takes (first group)."""
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    data = TensorDataset(torch.randn(4 * batches, 3), torch.randint(0, 2, (4 * batches,)))
    loaders = {"train": DataLoader(data, batch_size=4), "val": DataLoader(data, batch_size=4)}
    train_model(net, loaders, torch.nn.CrossEntropyLoss(), optimizer, epochs + 1,
                hooks=Hooks(scheduler=scheduler, scheduler_interval=interval, progress=False, log=lambda _: None))
    return seen


def _net_and_optimizer(kind, **kw):
    net = torch.nn.Linear(3, 2)
    return net, kind([{"params": list(net.parameters()), "lr": 0.1}], **kw)


def test_warmup_cosine_rates_match_the_formula():
    net, opt = _net_and_optimizer(torch.optim.AdamW)
    total, warmup = 4 * 3, 3
    seen = _lrs_seen(net, opt, warmup_cosine(opt, total, warmup), "step", 4)
    expected = [0.1 * (s + 1) / warmup if s < warmup
                else 0.1 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2 for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_one_cycle_rates_match_the_formula_and_fastais_end_points():
    net, opt = _net_and_optimizer(torch.optim.AdamW, betas=(0.9, 0.99))
    total, pct, div, div_final = 5 * 3, 0.3, 5.0, 1e5
    seen = _lrs_seen(net, opt, one_cycle(opt, total, pct_start=pct, div=div, div_final=div_final), "step", 5)

    def cos(a, b, t):  # half cosine from a to b as t goes 0 -> 1 (torch's _annealing_cos, fastai's SchedCos)
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2

    peak_step = pct * total - 1  # torch's phase boundary (fastai's may sit one step apart)
    expected = [cos(0.1 / div, 0.1, s / peak_step) if s <= peak_step
                else cos(0.1, 0.1 / div_final, (s - peak_step) / (total - 1 - peak_step)) for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert seen[0] == pytest.approx(0.1 / div) and max(seen) == pytest.approx(0.1, rel=1e-2)
    assert seen[-1] == pytest.approx(0.1 / div_final)  # fastai's end: peak / div_final


def test_the_tutorials_step_schedule_cuts_the_rate_every_7_training_epochs(tiny_backbone):
    from experiments.recipes import tutorial_finetune
    from tl.engine.weights import build_model
    from tl.models import get_backbone

    model = build_model("tiny", 2, "none")
    _, opt, sched = tutorial_finetune.build(model, get_backbone("tiny"), tutorial_finetune.RECIPE)
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    data = TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))
    loaders = {"train": DataLoader(data, batch_size=4), "val": DataLoader(data, batch_size=4)}
    train_model(model, loaders, torch.nn.CrossEntropyLoss(), opt, 16,
                hooks=Hooks(scheduler=sched, progress=False, log=lambda _: None))
    per_epoch = seen[::2]  # 2 batches per epoch; training epochs 1..15
    assert per_epoch == pytest.approx([1e-3] * 7 + [1e-4] * 7 + [1e-5], rel=1e-12)


# ----------------------------------------------------------------------------- resume inside a schedule or a stage
def _interrupt_after(monkeypatch, epoch):
    write = tl.engine.run_folder.write_history_csv

    def interrupted(history, path):
        write(history, path)
        if history.rows[-1]["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(tl.engine.run_folder, "write_history_csv", interrupted)


@pytest.mark.parametrize("recipe, cut, extra", [
    ("two_stage", 2, []),  # mid stage 2, mid one-cycle
    ("two_stage", 1, []),  # at the boundary: stage 2 starts fresh after the resume
    ("modern_finetune", 1, ["--no-augment"]),  # boundary after a cached stage
    ("modern_finetune", 3, []),  # mid warmup + cosine, augmented
    ("tutorial_finetune", 2, []),  # mid StepLR (an epoch schedule)
], ids=["two_stage-mid", "two_stage-boundary", "modern-boundary-cached", "modern-mid", "tutorial-mid"])
def test_resume_mid_schedule_and_mid_stage_equals_an_uninterrupted_run(tiny_data, pretrained, tmp_path,  # noqa: F811
                                                                       monkeypatch, recipe, cut, extra):
    full = _run(tiny_data, tmp_path / "full", recipe, 4, *extra, weights=pretrained)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, cut)
        argv = ["-e", recipe, "-b", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "half"), "--epochs",
                "4", "--batch-size", "5", "--no-progress", "--weights", str(pretrained), *extra]
        assert main.main(argv) == 130  # Ctrl-C
    (half,) = (tmp_path / "half").iterdir()
    assert checkpoint.load_checkpoint(half / "last.ckpt")["epoch"] == cut
    assert main.main(["--resume", str(half / "last.ckpt"), "--no-progress"]) == 0
    assert_same_run(full, half)


def test_a_new_epoch_total_that_would_bend_a_running_schedule_is_refused(tiny_data, pretrained, tmp_path,  # noqa: F811
                                                                         monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        argv = ["-e", "two_stage", "-b", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--epochs",
                "4", "--batch-size", "5", "--no-progress", "--weights", str(pretrained)]
        assert main.main(argv) == 130  # Ctrl-C
    (run_dir,) = (tmp_path / "r").iterdir()
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir / "last.ckpt"), "--epochs", "6", "--no-progress"]) == 2
    assert "schedule was laid out for 4 epochs: leave out --epochs" in capsys.readouterr().err  # the total it began


# ----------------------------------------------------------------------------- BatchNorm: eval vs train mode
@pytest.mark.parametrize("bn_eval", [True, False])
def test_batchnorm_in_eval_mode_keeps_its_statistics_bit_identical(bn_eval):
    torch.manual_seed(0)
    net = TinyNet()
    for bn in (net.stem[1], net.block[1]):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = TensorDataset(torch.randn(12, 3, 16, 16) * 2 + 1, torch.randint(0, 2, (12,)))
    loaders = {"train": DataLoader(data, batch_size=4), "val": DataLoader(data, batch_size=4)}
    train_model(net, loaders, torch.nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), 3,
                hooks=Hooks(bn_eval=bn_eval, progress=False, log=lambda _: None))
    after = net.state_dict()
    stats = {k for k in before if k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")}
    bn_affine = {f"{n}.{p}" for n, m in net.named_modules() if isinstance(m, BATCHNORM) for p in ("weight", "bias")}
    if bn_eval:
        assert _changed(before, after) & stats == set()  # the running statistics did not move by one bit
        assert bn_affine <= _changed(before, after)  # while the scale and shift trained
    else:
        assert stats <= _changed(before, after)
