"""The two averages of tl/engine/ema.py and tl/engine/tta.py: of the weights (--ema, Recipe.ema_decay) and of a
photo's and its mirror's probabilities (--tta, Recipe.tta). Each is checked against numbers
computed here by hand, and --ema's run is checked to resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import main
from experiments import get_experiment
from tests.conftest import TinyNet
from tl.engine import checkpoint, export, tta
from tl.engine.ema import update_after_step, weight_average
from tl.engine.evaluate import class_probabilities
from tl.engine.options import RunOptions
from tl.engine.run import combine, resume_run, run
from tl.loop import Hooks, train_model

pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own


def _tiny_loaders(n=8, size=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 2
    x[y == 1] += 1.0  # learnable: class 1 is brighter
    ds = TensorDataset(x, y)
    return {"train": DataLoader(ds, batch_size=4, shuffle=True, generator=g), "val": DataLoader(ds, batch_size=8)}


def _net():
    torch.manual_seed(0)
    net = TinyNet()
    net.fc = nn.Linear(16, 2)
    return net


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


# ----------------------------------------------------------------------------- the average of the weights
def test_the_average_is_the_hand_computed_exponential_average_with_batchnorm_buffers():
    net, decay = _net(), 0.8
    ema = weight_average(net, decay)
    seen = [{k: v.detach().clone() for k, v in net.state_dict().items()}]  # the weights before training
    record = lambda epoch: seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})  # noqa: E731
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    hooks = Hooks(after_step=combine(update_after_step(ema, net), record), progress=False,
                  log=lambda s: None)
    train_model(net, _tiny_loaders(), nn.CrossEntropyLoss(), optimizer, 3, hooks=hooks)
    assert len(seen) == 1 + 2 * 2  # two training epochs of 2 steps, each seen by both step callbacks
    expected = dict(seen[0])
    for state in seen[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] if state[k].is_floating_point() else state[k]
                    for k in state}
    averaged = ema.module.state_dict()
    assert int(ema.n_averaged) == len(seen)
    for k, v in expected.items():
        if v.is_floating_point():  # weights, and BatchNorm's running mean and variance
            assert torch.allclose(averaged[k], v, atol=1e-6, rtol=1e-5), k
    bn = "stem.1.running_mean"
    assert not torch.allclose(averaged[bn], seen[-1][bn]) and not torch.allclose(averaged[bn], seen[0][bn])


def test_val_scores_the_average_and_the_best_epoch_keeps_its_weights():
    """With a decay close to 1 the average hardly leaves the starting weights: every val row is
    the baseline's, though the training weights moved (without it the rows change)."""
    rows = {}
    for decay in (0.0, 1 - 1e-7):
        net = _net()
        ema = weight_average(net, decay)
        steps = [update_after_step(ema, net)] if ema is not None else []
        scored = net if ema is None else ema.module
        at_epoch_end = []  # the scored model's weights after each epoch

        def keep(epoch, history, scored=scored, at_epoch_end=at_epoch_end):
            at_epoch_end.append({k: v.clone() for k, v in scored.state_dict().items()})

        hooks = Hooks(after_step=combine(*steps), validate_with=None if ema is None else ema.module,
                      end_of_epoch=keep, progress=False, log=lambda s: None)
        history = train_model(net, _tiny_loaders(), nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.5),
                              3, hooks=hooks)
        rows[decay] = [r["loss"] for r in history.val()]
        best = at_epoch_end[history.best_epoch]
        assert all(torch.equal(v, best[k]) for k, v in history.best_state.items())
        if ema is not None:
            assert not torch.equal(net.fc.weight, ema.module.fc.weight)
    assert rows[1 - 1e-7] == pytest.approx([rows[1 - 1e-7][0]] * 3, abs=1e-5)
    assert max(abs(a - rows[0.0][0]) for a in rows[0.0][1:]) > 1e-3


def test_step_callbacks_all_run_and_any_of_them_stops():
    calls = []
    after = combine(lambda e: calls.append("a"), lambda e: calls.append("b") or True, lambda e: calls.append("c"))
    assert after(1) is True and calls == ["a", "b", "c"]
    assert combine() is None


def _train(data, out, recipe, epochs, weights, **options):
    """A --quick run of `recipe` on the tiny backbone through the API (no pictures: seconds)."""
    module = get_experiment(recipe)
    opts = RunOptions(data=data, backbone="tiny", weights=str(weights), epochs=epochs, out=out, batch_size=5,
                      lr_scale=20, progress=False, plots=False, augment=False, ema=0.7, run_name="r", **options)
    opts.make_quick()
    return run(module.RECIPE, module.build, opts, log=lambda s: None).run_dir


def test_resume_with_an_average_equals_the_uninterrupted_run(tiny_data, pretrained, tmp_path):
    """modern_finetune without augmentation: its first stage trains the head on cached features
    (the loop's net is `FeaturesOrImages`), the second the whole network on images; one average
    runs through both, and the cut falls on their boundary."""
    full = _train(tiny_data, tmp_path / "full", "modern_finetune", 3, pretrained)
    half = _train(tiny_data, tmp_path / "half", "modern_finetune", 1, pretrained)
    resume_run(half / "last.ckpt", {"epochs": 3}, get_experiment, log=lambda s: None)
    stages = json.loads((full / "config.json").read_text())["stages"]
    assert stages[0]["feature_cache"].startswith("train + val") and stages[1]["feature_cache"].startswith("off")
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert _strip(a["history"]["rows"]) == _strip(b["history"]["rows"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(t, b[part][k]) for k, t in a[part].items()), part
    assert int(a["ema"]["n_averaged"]) > 1
    best_a, best_b = (checkpoint.load_state_file(d / "best.pth") for d in (full, half))
    assert all(torch.equal(t, best_b[k]) for k, t in best_a.items())
    # what is saved and scored is the average: best.pth holds the average's weights, not the training weights
    results = json.loads((full / "config.json").read_text())["results"]
    if results["best_epoch"] == a["epoch"]:
        assert all(torch.equal(t, checkpoint.scored_weights(a)[k]) for k, t in best_a.items())
    assert not torch.equal(best_a["fc.weight"], a["model"]["fc.weight"])
    assert best_a.keys() == a["model"].keys()  # the whole network's weights, also when the loop saw the head alone
    # the headline (no test split: val, final epoch) scores the average the last val row scored
    assert results["headline_acc"] == results["final_val_acc"]


def test_under_the_feature_cache_the_average_is_that_of_the_whole_network(tiny_data, pretrained, tmp_path):
    """Cached (the loop trains the head on stored features) and uncached (the whole network on
    images) average the same weights: the same val rows and best.pth, up to the last float bits
    of the cache's folded BatchNorm."""
    runs = [_train(tiny_data, tmp_path / name, "resnet_frozen", 2, pretrained, feature_cache=cache)
            for name, cache in (("cached", True), ("uncached", False))]
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert configs[0]["feature_cache"].startswith("train + val") and configs[1]["feature_cache"] == "off"
    rows = [checkpoint.load_checkpoint(r / "last.ckpt")["history"]["rows"] for r in runs]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], abs=1e-5)
    best = [checkpoint.load_state_file(r / "best.pth") for r in runs]
    assert all(torch.allclose(t, best[1][k], atol=1e-5) for k, t in best[0].items())


def test_an_ema_decay_outside_0_1_is_one_error_line(capsys, tmp_path):
    for bad in ("1", "0", "-0.5", "1.5", "nan"):
        assert main.main(["-e", "resnet_scratch", "-b", "efficientnet_lite0", "--ema", bad, "--data",
                          str(tmp_path / "nowhere")]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith(f"error: --ema {float(bad)}: ") and "between 0 and 1" in err


# ----------------------------------------------------------------------------- the mirror at test time
class LeftRight(nn.Module):
    """Logits from the mean brightness of the left and right halves: a mirror swaps them."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        left, right = x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x[..., x.shape[-1] // 2:].mean((1, 2, 3))
        z = torch.stack([3 * left + right, left - 2 * right], 1)
        return z if self.outputs == 2 else z[:, :1] - z[:, 1:]


def test_the_mirror_averages_the_softmax_probabilities_of_both_views():
    x = torch.zeros(2, 3, 4, 4)
    x[0, :, :, :2], x[1, :, :, 2:] = 1.0, 0.5  # bright on the left; dimmer on the right
    left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
    plain = torch.stack([3 * left + right, left - 2 * right], 1)
    mirrored = torch.stack([3 * right + left, right - 2 * left], 1)  # the halves swap places
    expected = (plain.softmax(1) + mirrored.softmax(1)) / 2
    got = class_probabilities(tta.Mirrored(LeftRight(2))(x))
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain.softmax(1), atol=1e-2)  # the mirror changed something


def test_a_single_logit_averages_the_sigmoid_probabilities_and_stays_finite():
    x = torch.zeros(3, 3, 4, 4)
    x[0, :, :, :2], x[1, :, :, 2:] = 1.0, -0.5
    x[2, :, :, :2], x[2, :, :, 2:] = 80.0, -80.0  # each view certain, of the other class
    left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
    z, z_mirror = 2 * left + 3 * right, 2 * right + 3 * left  # (3l + r) - (l - 2r), and mirrored
    expected = (torch.sigmoid(z) + torch.sigmoid(z_mirror)) / 2
    out = tta.Mirrored(LeftRight(1))(x)
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    assert torch.allclose(class_probabilities(out)[:, 1], expected, atol=1e-6)
    assert expected[2] == 0.5
    loss = nn.functional.binary_cross_entropy_with_logits(out, torch.tensor([[1.0], [0.0], [1.0]]))
    assert torch.isfinite(loss)


def test_stored_features_have_no_mirror():
    with pytest.raises(Exception, match="needs images"):
        tta.Mirrored(nn.Linear(4, 2))(torch.zeros(2, 4))


def test_evaluate_and_predict_use_the_recorded_mirror_unless_told(tiny_data, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--out", str(out), "--quick",
                      "--tta", "--no-progress"]) == 0
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["tta"] is True and config["results"]["headline"] == "val, final epoch, mirror averaged"
    capsys.readouterr()
    printed = {}
    for flag in ([], ["--no-tta"]):  # the run's recorded value, then turned off
        assert main.main(["--evaluate", str(run_dir / "best.pth"), *flag]) == 0
        printed[bool(flag)] = capsys.readouterr().out
    assert "test-time augmentation" in printed[False] and "test-time augmentation" not in printed[True]
    loss = {k: next(line for line in v.splitlines() if line.startswith("loss")) for k, v in printed.items()}
    assert loss[False] != loss[True]
    assert (run_dir / "evaluate-best-val-tta").is_dir() and (run_dir / "evaluate-best-val").is_dir()
    tables = {}
    for flag in ([], ["--no-tta"]):
        table = tmp_path / f"table{len(flag)}.csv"
        assert main.main(["--predict", str(tiny_data / "val"), "--checkpoint", str(run_dir / "best.pth"),
                          "--csv", str(table), "--workers", "0", "--no-progress", *flag]) == 0
        tables[bool(flag)] = table.read_text()
    assert tables[False] != tables[True]


def test_an_exported_file_is_mirrored_by_running_it_on_flipped_images(tmp_path):
    net = _net().eval()
    meta = {"format": export.FORMAT, "classes": ["a", "b"], "backbone": "tiny", "image_size": 16, "resize": 18,
            "mean": [0.5] * 3, "std": [0.25] * 3, "single_logit": False, "exported_from": "runs/r/best.pth"}
    export._export_onnx(net, torch.zeros(2, 3, 16, 16), meta, tmp_path / "m.onnx")
    exported, _ = export.load_exported(tmp_path / "m.onnx")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tta.Mirrored(exported)(x), tta.Mirrored(net)(x), atol=1e-5)
        assert not torch.allclose(tta.Mirrored(net)(x), net(x).log_softmax(1), atol=1e-4)
