"""The one loop: it learns, epoch 0 does not train, frozen means frozen, runs repeat."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.helpers import loop_setup
from tl.data import build_transforms, make_loaders
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets
from tl.engine.weights import build_model
from tl.loop import History, Hooks, NonFiniteLoss, predictions, seed_everything, train_model
from tl.models import get_backbone, set_trainable
from tl.recipe import Recipe


def _setup(data, backbone="tiny", batch=8, augment=True, seed=0):
    seed_everything(seed)
    spec = get_backbone(backbone)
    sets = image_datasets(data, build_transforms(spec.mean, spec.std, size=32, resize=36, augment=augment))
    model = build_model(backbone, len(sets["train"].classes), "none")
    return spec, model, make_loaders(sets, batch, seed=seed)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loop_lowers_loss_and_beats_chance(tiny_data, tiny_backbone):
    spec, model, loaders = _setup(tiny_data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = train_model(model, loaders, nn.CrossEntropyLoss(), opt, num_epochs=6,
                       hooks=Hooks(progress=False, log=lambda s: None))
    val = hist.val()
    assert val[0]["epoch"] == 0 and len(val) == 6
    assert val[-1]["loss"] < val[0]["loss"]
    assert hist.best_acc >= 0.9  # chance is 0.5
    train = [r for r in hist.rows if r["phase"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert set(hist.rows[0]) == {"epoch", "phase", "loss", "acc", "seconds", "images_per_s"}


def test_epoch_zero_only_validates_and_changes_nothing(tiny_data, tiny_backbone):
    spec, model, loaders = _setup(tiny_data)
    before = _state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    hist = train_model(model, loaders, nn.CrossEntropyLoss(), opt, num_epochs=1,
                       hooks=Hooks(progress=False, log=lambda s: None))
    assert [(r["epoch"], r["phase"]) for r in hist.rows] == [(0, "val")]
    after = model.state_dict()
    for name, tensor in before.items():  # weights *and* BatchNorm buffers: eval mode moved nothing
        assert torch.equal(tensor, after[name]), name
    assert hist.best_epoch == 0


def test_loss_and_accuracy_are_weighted_over_the_whole_dataset(tiny_data, tiny_backbone):
    # 12 val images in batches of 5 (5, 5, 2): the epoch figures must equal a one-batch computation
    spec, model, loaders = _setup(tiny_data, batch=5)
    hist = train_model(model, loaders, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), num_epochs=1,
                       hooks=Hooks(progress=False, log=lambda s: None))
    model.eval()
    xs, ys = zip(*[loaders["val"].dataset[i] for i in range(len(loaders["val"].dataset))])
    with torch.no_grad():
        out = model(torch.stack(xs))
    y = torch.tensor(ys)
    assert hist.rows[0]["loss"] == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    assert hist.rows[0]["acc"] == pytest.approx((out.argmax(1) == y).float().mean().item())


@pytest.mark.parametrize("frozen_bn_eval", [True, False])
def test_frozen_parameters_stay_bit_identical(tiny_data, tiny_backbone, frozen_bn_eval):
    spec, model, loaders = _setup(tiny_data)
    set_trainable(model, spec, ["head"])
    before = _state(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_model(model, loaders, nn.CrossEntropyLoss(), opt, num_epochs=3,
                hooks=Hooks(frozen_bn_eval=frozen_bn_eval, progress=False, log=lambda s: None))
    after = model.state_dict()
    for name, _ in model.named_parameters():
        if name.startswith("fc."):
            assert not torch.equal(before[name], after[name]), f"{name} should have trained"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"
    stats = [n for n in before if "running_" in n]
    moved = [n for n in stats if not torch.equal(before[n], after[n])]
    if frozen_bn_eval:
        assert moved == []  # the frozen-BN policy keeps ImageNet statistics
    else:
        assert moved == stats  # what 001/003 do: requires_grad=False does not stop running stats


def test_same_seed_same_history(tiny_data, tiny_backbone, tmp_path):
    recipe = Recipe(name="t", source="test", strategy="all", backbone="tiny", weights="none",
                    lrs={"all": 1e-2}, train_epochs=2, batch_size=4)

    def build(model, spec, r):
        return model, torch.optim.Adam(model.parameters(), lr=r.lrs["all"])

    def once(i):
        opts = RunOptions(data=tiny_data, seed=3, workers=0, out=tmp_path / f"runs{i}", image_size=32,
                          progress=False)
        return run(recipe, build, opts, log=lambda s: None).history.rows

    a, b = once(0), once(1)
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in b]


def test_batch_order_does_not_depend_on_the_number_of_workers(tiny_data, tiny_backbone):
    """Without augmentation the data are deterministic, so 0 and 2 DataLoader workers must
    train the same weights: the shuffle comes from the loader's own generator, drawn once per
    epoch. (A progress bar that called iter() on the loader a second time broke this.)"""
    results = []
    for workers in (0, 2):
        seed_everything(0)
        spec = get_backbone("tiny")
        sets = image_datasets(tiny_data, build_transforms(spec.mean, spec.std, size=32, resize=36, augment=False))
        model = build_model("tiny", 2, "none")
        loaders = make_loaders(sets, 4, seed=0, workers=workers)
        history = train_model(model, loaders, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.05), 3,
                              hooks=Hooks(progress=True, log=lambda s: None))
        results.append(([(r["loss"], r["acc"]) for r in history.rows], _state(model)))
    (rows0, state0), (rows2, state2) = results
    assert rows0 == rows2
    assert all(torch.equal(state0[k], state2[k]) for k in state0)


def test_three_classes_end_to_end(three_class_data, tiny_backbone, tmp_path):
    from experiments.recipes import resnet_scratch

    opts = RunOptions(data=three_class_data, backbone="tiny", epochs=5, workers=0, out=tmp_path, image_size=32,
                      lr_scale=100, progress=False)
    result = run(resnet_scratch.RECIPE, resnet_scratch.build, opts, log=lambda s: None)
    assert result.classes == ["class_0", "class_1", "class_2"]
    assert result.model.fc.out_features == 3
    assert result.history.best_acc > 0.8  # chance is 1/3
    assert (result.run_dir / "config.json").exists() and (result.run_dir / "history.csv").exists()


def test_non_finite_loss_stops_before_the_update(tiny_data, tiny_backbone):
    spec, model, loaders = _setup(tiny_data)
    with torch.no_grad():
        model.fc.weight.fill_(math.nan)
    before = _state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLoss, match="loss became nan"):
        train_model(model, loaders, nn.CrossEntropyLoss(), opt, num_epochs=2,
                    hooks=Hooks(progress=False, log=lambda s: None))
    for name, tensor in before.items():
        assert torch.equal(tensor, model.state_dict()[name]) or torch.isnan(tensor).all()


def test_single_logit_predictions():
    outputs = torch.tensor([[-2.0], [0.5], [3.0]])
    assert predictions(outputs).tolist() == [0, 1, 1]
    assert predictions(torch.tensor([[0.1, 0.9], [2.0, -1.0]])).tolist() == [1, 0]


def test_history_round_trips_through_a_dict():
    h = History(rows=[{"epoch": 0, "phase": "val", "loss": 1.0, "acc": 0.5, "seconds": 1, "images_per_s": 2}],
                best_epoch=0, best_acc=0.5, best_loss=1.0)
    assert History.from_dict(h.to_dict()).to_dict() == h.to_dict()


# ----------------------------------------------------------------------------- a loss that turns non-finite mid-run
class _TurnsAt:
    """A criterion whose loss turns `into` (inf or nan) from the `at`-th training step on (0-based);
    validation batches (no gradient) are never touched and not counted."""

    def __init__(self, at: int, into: float):
        self.at, self.into, self.steps = at, into, 0

    def __call__(self, outputs, labels):
        loss = nn.functional.cross_entropy(outputs, labels)
        if not torch.is_grad_enabled():
            return loss
        self.steps += 1
        return loss * self.into if self.steps > self.at else loss


class _PoisonedBatches:
    """The train loader, with the `at`-th batch it yields (0-based, counted over epochs) made of inf pixels."""

    def __init__(self, loader, at: int):
        self.loader, self.sampler, self.at, self.drawn = loader, loader.sampler, at, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for inputs, labels in self.loader:
            self.drawn += 1
            yield (torch.full_like(inputs, math.inf) if self.drawn - 1 == self.at else inputs), labels


@pytest.mark.parametrize("case", ["inf loss, SGD with momentum", "nan loss, Adam", "inf pixels, SGD with momentum",
                                  "inf loss, first step of an epoch"])
def test_a_loss_that_turns_non_finite_after_real_updates_applies_no_update(tiny_data, tiny_backbone, case):
    """24 train images in batches of 8: 3 steps an epoch. The loss turns non-finite at a step after
    real updates; the run stops there, and the weights and the optimizer's state are bit for bit
    those after the last finite step: the non-finite gradient was never applied."""
    spec, model, loaders = _setup(tiny_data, augment=False)
    at = 3 if "first step" in case else 4  # epoch 2's first or second step, after epoch 1's 3 updates
    criterion = _TurnsAt(at, math.nan if "nan" in case else math.inf) if "loss" in case else nn.CrossEntropyLoss()
    if "pixels" in case:
        loaders = {**loaders, "train": _PoisonedBatches(loaders["train"], at)}
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if "Adam" in case
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    after_steps = []

    def keep(epoch):  # the parameters and the optimizer's state after each update
        after_steps.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                            {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                             for i, s in opt.state_dict()["state"].items()}))

    history = History()
    with pytest.raises(NonFiniteLoss, match="loss became (inf|nan) in epoch 2: training stopped before the update"):
        train_model(model, loaders, criterion, opt, num_epochs=4, history=history,
                    hooks=Hooks(after_step=keep, progress=False, log=lambda s: None))
    assert len(after_steps) == at  # the updates before the bad step were real ...
    assert not torch.equal(after_steps[0][0]["fc.weight"], after_steps[-1][0]["fc.weight"])
    params, state = after_steps[-1]
    for name, p in model.named_parameters():  # ... and the bad step applied nothing
        assert torch.equal(p, params[name]), name
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for i, tensors in state.items():
        assert all(torch.equal(now[i][k], v) for k, v in tensors.items()), i
    assert [(r["epoch"], r["phase"]) for r in history.rows] == [(0, "val"), (1, "train"), (1, "val")]


# ----------------------------------------------------------------------------- the documents' own loop as an oracle
def _document_002_train_model(net, dataloaders_dict, criterion, optimizer, num_epochs):
    """Document 002 §1.3's `train_model`, as written there (prints left out), with ERRATA 8
    applied (the epoch statistics inside the phase loop) and the lines marked `# +` added to
    collect (epoch, phase, loss, acc)."""
    from tqdm import tqdm

    rows = []  # +
    for epoch in range(num_epochs):
        for phase in ['train', 'val']:
            if phase == 'train':
                net.train()
            else:
                net.eval()
            epoch_loss = 0.0
            epoch_corrects = 0

            if (epoch == 0) and (phase == 'train'):
                continue

            for inputs, labels in tqdm(dataloaders_dict[phase], disable=True):
                optimizer.zero_grad()

                with torch.set_grad_enabled(phase == 'train'):
                    outputs = net(inputs)
                    loss = criterion(outputs, labels)
                    _, preds = torch.max(outputs, 1)

                    if phase == 'train':
                        loss.backward()
                        optimizer.step()

                    epoch_loss += loss.item() * inputs.size(0)
                    epoch_corrects += torch.sum(preds == labels.data)

            epoch_loss = epoch_loss / len(dataloaders_dict[phase].dataset)  # ERRATA 8: per phase
            epoch_acc = epoch_corrects.double() / len(dataloaders_dict[phase].dataset)
            rows.append((epoch, phase, epoch_loss, epoch_acc.item()))  # +
    return rows  # +


def test_train_model_is_document_002s_loop(tiny_data, tiny_backbone):
    """With default Hooks, train_model trains exactly as the document's own loop: the same rows
    (epoch, phase, loss, acc) and the same final weights, bit for bit (each with its own loaders
    from the same seed, from the same initial weights)."""
    _, start, _ = _setup(tiny_data)
    runs = []
    for loop in ("document", "train_model"):
        spec, _, loaders = _setup(tiny_data)  # the same seed: the same shuffle and augmentation draws
        net = build_model("tiny", 2, "none")
        net.load_state_dict(start.state_dict())
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        if loop == "document":
            rows = _document_002_train_model(net, loaders, nn.CrossEntropyLoss(), optimizer, num_epochs=4)
        else:
            history = train_model(net, loaders, nn.CrossEntropyLoss(), optimizer, num_epochs=4,
                                  hooks=Hooks(progress=False, log=lambda line: None))
            rows = [(r["epoch"], r["phase"], r["loss"], r["acc"]) for r in history.rows]
        runs.append((rows, _state(net)))
    (document_rows, document_state), (our_rows, our_state) = runs
    assert len(our_rows) == 7 and our_rows == document_rows  # epoch 0: val only; then train and val
    assert all(torch.equal(document_state[k], our_state[k]) for k in document_state)


def _linear_loaders() -> dict:
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    ds = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    return {phase: torch.utils.data.DataLoader(ds, batch_size=4) for phase in ("train", "val")}


def _train_linear(epochs: int, **hooks) -> tuple:
    net, logs = nn.Linear(4, 2), []
    history = train_model(net, _linear_loaders(), nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1),
                          epochs, hooks=Hooks(progress=False, log=logs.append, **hooks))
    return history, logs


def test_a_stop_asked_for_at_the_epoch_end_is_announced():
    """A stop asked for at the epoch end (--patience's) is announced with the command line's stdout line."""
    history, logs = _train_linear(5, end_of_epoch=lambda epoch, hist: epoch == 2)
    assert history.stopped_early == 2
    assert logs[-1] == "stopping after epoch 2 (requested by the epoch-end callback)"


def test_after_step_returning_true_stops_training():
    """Hooks.after_step: "True stops". The train phase's request survives the val phase of the
    same epoch (val's run_phase does not overwrite it), so training stops after that epoch."""
    history, logs = _train_linear(4, after_step=lambda epoch: True)
    assert history.stopped_early == 1
    assert [(r["epoch"], r["phase"]) for r in history.rows] == [(0, "val"), (1, "train"), (1, "val")]
    assert logs[-1] == "stopping after epoch 1 (requested by after_step)"


@pytest.mark.parametrize("hooks, message", [({"best_by": "accuracy"}, "best_by"),
                                            ({"scheduler_interval": "batch"}, "scheduler_interval")])
def test_the_loop_refuses_a_best_by_or_interval_it_does_not_know(hooks, message):
    """train_model refuses a best_by or scheduler_interval it does not know (a monitor edited into
    a checkpoint by hand, say), rather than silently choosing the best epoch by loss for
    "accuracy" or never stepping the schedule for "batch"."""
    with pytest.raises(ValueError, match=message):
        _train_linear(2, **hooks)


class _Scripted(nn.Module):
    """Right or wrong on every image, as `plan[(epoch, phase)]` says: the input is the one-hot
    label, and the logits are it (right) or its negation (wrong). One parameter, so the
    optimizer has something to step."""

    def __init__(self, plan: dict):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.plan, self.epoch = plan, 0

    def forward(self, x):
        right = self.plan[(self.epoch, "train" if self.training else "val")]
        return (x if right else -x) * (1 + 0 * self.w)


def test_the_best_epoch_is_chosen_on_val_rows_not_train_rows():
    # val is right only in epoch 1; train is right in epochs 2 and 3
    plan = {(0, "val"): False, (1, "train"): False, (1, "val"): True, (2, "train"): True, (2, "val"): False,
            (3, "train"): True, (3, "val"): False}
    net = _Scripted(plan)
    labels = torch.tensor([0, 1, 1, 0])
    data = torch.utils.data.TensorDataset(nn.functional.one_hot(labels, 2).float(), labels)
    loaders = {phase: torch.utils.data.DataLoader(data, batch_size=4) for phase in ("train", "val")}

    def next_epoch(epoch, history):
        net.epoch = epoch + 1

    history = train_model(net, loaders, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), 4,
                          hooks=Hooks(end_of_epoch=next_epoch, progress=False, log=lambda s: None))
    accs = {(r["epoch"], r["phase"]): r["acc"] for r in history.rows}
    assert accs[(1, "val")] == 1.0 and accs[(2, "train")] == 1.0 and accs[(2, "val")] == 0.0
    assert history.best_epoch == 1 and history.best_acc == 1.0


def test_sums_kept_on_the_device_give_the_same_history_as_the_per_step_item(tiny_data, tiny_backbone):
    """`Hooks(device_sums=True)` is what a CUDA run uses; forced here on the CPU, it must give the
    very numbers of the tutorial's per-step `.item()` (both sum float32 losses in float64)."""
    from tl.loop import Hooks, train_model

    histories, states = [], []
    for device_sums in (False, True):
        model, loaders = loop_setup(tiny_data)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        h = train_model(model, loaders, torch.nn.CrossEntropyLoss(), opt, num_epochs=3,
                        hooks=Hooks(progress=False, log=lambda s: None, device_sums=device_sums))
        histories.append([{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h.rows])
        states.append(model.state_dict())
    assert histories[0] == histories[1]
    assert all(type(r["loss"]) is float and type(r["acc"]) is float for r in histories[1])
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_with_device_sums_a_non_finite_loss_stops_at_the_phase_end(tiny_data, tiny_backbone):
    import math

    import pytest

    from tl.loop import Hooks, NonFiniteLoss, train_model

    model, loaders = loop_setup(tiny_data)
    with torch.no_grad():
        model.fc.weight.fill_(math.nan)
    batches = []
    hooks = Hooks(progress=False, log=lambda s: None, device_sums=True,
                  end_of_phase=lambda *a: batches.append(a))
    with pytest.raises(NonFiniteLoss, match="loss became nan in epoch 0: training stopped at the end of the phase"):
        train_model(model, loaders, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                    num_epochs=2, hooks=hooks)
    assert batches == []  # no row, no checkpoint: the phase never ended


