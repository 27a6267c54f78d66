"""Issue 27: one fast test per bug the rest of the suite would let through.

Each test calls the smallest function that holds the behaviour, on tiny synthetic data,
and asserts what that function must do (never how it is written):

1. resume refuses a best.pth that does not match the digest config.json recorded for it;
2. the export parity check compares the PyTorch model with the *exported* file;
3. with --cache-views K, training draws more than one stored view of an image;
4. the test split is transformed like val (deterministic), never with train's augmentation;
5. the best epoch is chosen on the val rows, not the train rows;
6. the feature-cache key changes with the frozen prefix's weights;
7. a resumed run gets its learning-rate schedule back (same rates as an uninterrupted run);
8. a file shared between splits through a symlink is found (identity of the target, not the link);
9. the skip report lists broken files of val and test, not only train's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tl.engine.run
from tests.conftest import TinyNet, write_image_folder
from tl import Interrupted, TLError, features
from tl.data import build_transforms, make_loaders
from tl.engine import checkpoint, export, feature_store, files
from tl.engine.device import make_grad_scaler
from tl.engine.selection import describe_skipped, image_datasets
from tl.loop import Hooks, train_model
from tl.models import get_backbone, param_groups, set_trainable

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _net(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


# ----------------------------------------------------------------------------- 1. resume and best.pth's digest
def test_resume_refuses_a_best_pth_that_does_not_match_its_recorded_digest(tmp_path):
    best_model, later_model = _net(1), _net(2)
    best_state = {k: v.clone() for k, v in best_model.state_dict().items()}
    history = {"rows": [{"epoch": e, "phase": "val", "loss": 1.0, "acc": 0.5} for e in range(3)],
               "best_epoch": 1, "best_acc": 0.5, "best_loss": 1.0, "stopped_early": None}
    config = {"data_fingerprint": "fp", "world_size": 1,
              "checksums": {"best.pth": files.state_digest(best_state)}}
    generator = torch.Generator().manual_seed(0)
    checkpoint.save_checkpoint(tmp_path / "last.ckpt", epoch=2, model=later_model,
                               optimizer=torch.optim.SGD(later_model.parameters(), lr=0.1), scheduler=None,
                               scaler=None, history=history, config=config, classes=["a", "b"],
                               loader_generator=generator, wall_seconds=1.0)

    def restore():
        ckpt = checkpoint.load_checkpoint(tmp_path / "last.ckpt")
        with torch.random.fork_rng(devices=[]):
            return tl.engine.resume.restore(ckpt, tmp_path / "last.ckpt", TinyNet(), make_grad_scaler("cpu", False),
                                      torch.Generator(), ["a", "b"], "fp", num_epochs=5)

    files.atomic_save(best_state, tmp_path / "best.pth")  # the genuine best epoch's weights
    restored, start_epoch, _ = restore()
    assert start_epoch == 3 and restored.best_epoch == 1
    assert all(torch.equal(t, best_state[k]) for k, t in restored.best_state.items())
    # other valid weights in the same format (a copy from another run, a damaged disk that still loads)
    files.atomic_save(_net(3).state_dict(), tmp_path / "best.pth")
    with pytest.raises(TLError, match="best.pth"):
        restore()


# ----------------------------------------------------------------------------- 2. export parity check
def test_parity_check_compares_the_model_with_the_exported_file(tmp_path):
    model = _net(1).eval()
    other = copy.deepcopy(model)
    with torch.no_grad():  # the same network with its logits negated: every top-1 class differs
        other.fc.weight.neg_(), other.fc.bias.neg_()
    example = torch.zeros(2, 3, 32, 32)
    meta = {"format": export.FORMAT, "classes": [f"c{i}" for i in range(1000)], "backbone": "tiny",  # TinyNet: 1000
            "image_size": 32, "resize": 37, "mean": [0.5] * 3, "std": [0.5] * 3, "single_logit": False}
    export._export_torchscript(other, example, meta, tmp_path / "other.pt")
    export._export_torchscript(model, example, meta, tmp_path / "same.pt")
    torch.manual_seed(0)
    loader = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(2)]

    exported_other, _ = export.load_exported(tmp_path / "other.pt")
    check = export.parity_check(model, exported_other, loader)
    assert check["images"] == 8
    assert not check["ok"]
    assert check["top1_agreement"] < 1 and check["max_abs_logit_diff"] > export.TOLERANCE

    exported_same, _ = export.load_exported(tmp_path / "same.pt")
    check = export.parity_check(model, exported_same, loader)
    assert check["ok"] and check["top1_agreement"] == 1.0


# ----------------------------------------------------------------------------- 3. --cache-views K
def test_training_on_cached_views_draws_more_than_one_view_per_image():
    views, n = 3, 6
    stored = torch.arange(views, dtype=torch.float32).view(views, 1, 1).expand(views, n, 2).contiguous()
    fs = features.FeatureSet(stored, torch.zeros(n, dtype=torch.long))  # stored[v, i] == v
    loaders = make_loaders({"train": fs}, batch_size=n, seed=0)
    drawn: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _epoch in range(6):
            for x, _ in loaders["train"]:
                drawn += x[:, 0].long().tolist()
    assert len(drawn) == 6 * n and set(drawn) <= set(range(views))
    assert len(set(drawn)) > 1, "every epoch trained on the same view of every image: K does nothing"


# ----------------------------------------------------------------------------- 4. the test split's transform
@pytest.mark.parametrize("policy", ["standard", "strong"])
def test_the_test_split_is_transformed_like_val(tmp_path, policy):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(48, 40, 3), dtype=np.uint8))
    transforms = build_transforms(MEAN, STD, size=32, augment=True, policy=policy)
    torch.manual_seed(0)
    val = transforms["val"](image)
    first, second = transforms["test"](image), transforms["test"](image)
    assert torch.equal(first, second) and torch.equal(first, val)

    # and the test data set of a data folder gets that transform
    root = write_image_folder(tmp_path / "data", train=2, val=1, size=40, phases=("train", "val", "test"))
    sets = image_datasets(root, transforms, phases=("train", "val", "test"))
    path, _ = sets["test"].samples[0]
    with Image.open(path) as img:
        expected = transforms["val"](img.convert("RGB"))
    first, second = sets["test"][0][0], sets["test"][0][0]  # two reads of one test image: no random crop
    assert torch.equal(first, expected) and torch.equal(second, expected)


# ----------------------------------------------------------------------------- 5. best epoch chosen on val
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


# ----------------------------------------------------------------------------- 6. the cache key and the weights
def test_the_cache_key_changes_with_the_prefix_weights(tiny_data, tiny_backbone):
    spec = get_backbone("tiny")

    class Files:
        samples = [(str(p), 0) for p in sorted((tiny_data / "val").rglob("*.png"))]
        transform = "T"

    def key(net):
        split = features.split_at_cut(net, spec)
        digest = feature_store.prefix_digest(net, split)
        return feature_store.cache_key(digest, Files, feature_store.FeaturePass(
            views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device="cpu", channels_last=False,
            folded=True))

    a = _net(1)
    b = copy.deepcopy(a)
    assert key(a) == key(b)
    with torch.no_grad():
        b.stem[0].weight.mul_(2)  # another backbone's weights before the cut; same head, same files
    assert key(a) != key(b)
    assert key(a) != key(_net(2))


# ----------------------------------------------------------------------------- 7. the schedule on resume
def _build_step_lr(model, spec, recipe):
    set_trainable(model, spec, ["head"])
    optimizer = torch.optim.SGD(param_groups(model, spec, recipe.lrs), momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)


STEP_LR = tl.engine.run.Recipe(name="planted_step_lr", source="tests", strategy="head only, StepLR(2, 0.1)",
                           backbone="tiny", weights="none", lrs={"head": 0.05}, train_epochs=4, batch_size=8,
                           frozen_bn_eval=True)


def test_a_resumed_run_continues_with_the_right_learning_rate(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    def opts(out):  # every phase on stored features: seconds, not minutes
        return tl.engine.options.RunOptions(data=tiny_data, epochs=4, workers=0, out=out, run_name="r", image_size=32,
                                    augment=False, progress=False, plots=False)

    full = tl.engine.run.run(STEP_LR, _build_step_lr, opts(tmp_path / "full"), log=lambda s: None)
    write = tl.engine.run_folder.write_history_csv

    def interrupt_after_epoch_1(history, path):
        write(history, path)
        if history.rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tl.engine.run_folder, "write_history_csv", interrupt_after_epoch_1)
        with pytest.raises(Interrupted):
            tl.engine.run.run(STEP_LR, _build_step_lr, opts(tmp_path / "half"), log=lambda s: None)
    saved = tmp_path / "half" / "r" / "last.ckpt"
    ckpt = checkpoint.load_checkpoint(saved)
    assert ckpt["epoch"] == 1
    resumed = tl.engine.run.run(STEP_LR, _build_step_lr, opts(tmp_path / "half"), ckpt=ckpt, resume=saved,
                            log=lambda s: None)

    a = checkpoint.load_checkpoint(tmp_path / "full" / "r" / "last.ckpt")
    b = checkpoint.load_checkpoint(saved)
    # StepLR(2, 0.1) after 4 epochs: two decays
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.1 ** 2)
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(a["optimizer"]["param_groups"][0]["lr"])
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"] == 4
    strip = [{k: r[k] for k in ("epoch", "phase", "loss", "acc")} for r in full.history.rows]
    assert [{k: r[k] for k in ("epoch", "phase", "loss", "acc")} for r in resumed.history.rows] == strip


# ----------------------------------------------------------------------------- 8. files shared through a link
def test_a_val_symlink_to_a_train_file_is_the_same_file(tmp_path):
    root = write_image_folder(tmp_path / "data", train=2, val=1, size=16)
    target = root / "train" / "class_0" / "000.png"
    (root / "val" / "class_0" / "linked.png").symlink_to(target)
    transforms = build_transforms(MEAN, STD, size=8, augment=False)
    with pytest.raises(TLError, match="two splits"):
        image_datasets(root, transforms)


# ----------------------------------------------------------------------------- 9. the skip report
def test_the_skip_report_names_broken_files_of_every_split(tmp_path):
    root = write_image_folder(tmp_path / "data", train=2, val=2, size=16, phases=("train", "val", "test"))
    broken = {phase: root / phase / f"class_{i % 2}" / "broken.png"
              for i, phase in enumerate(("train", "val", "test"))}
    for path in broken.values():
        path.write_bytes(b"not a picture")
    sets = image_datasets(root, build_transforms(MEAN, STD, size=8, augment=False), phases=("train", "val", "test"))
    report = describe_skipped(sets)
    assert report is not None
    for phase, path in broken.items():
        assert str(path) in report, phase
