"""benchmarks/peers.py: the page, its table and picture built from recorded runs (fastai's records
and compare_all's rows), the paired bootstrap's verdicts, a rerun that skips what is recorded, the
checks that fastai trains the project's network, and one error line where fastai is missing.
The fastai runs themselves are tested where fastai is importable (requirements-peers.txt)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from benchmarks import peers
from tl import TLError
from tl.engine.tables import read_table, write_table

IMAGES = [f"val/{c}/{i:03d}.jpg" for c in ("ants", "bees") for i in range(40)]
HAS_FASTAI = importlib.util.find_spec("fastai") is not None


def _predictions(path, wrong: set[int]) -> None:
    rows = []
    for i, image in enumerate(IMAGES):
        label = image.split("/")[1]
        rows.append({"path": image, "label": label,
                     "prediction": ({"ants": "bees", "bees": "ants"}[label] if i in wrong else label)})
    write_table(path, rows)


def _fastai_record(out, row: str, seed: int, wrong: set[int], seconds: float) -> None:
    path = peers.record_path(out, "hymenoptera_data", row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    _predictions(peers.predictions_path(path), wrong)
    path.write_text(json.dumps({
        "dataset": "hymenoptera_data", "row": row, "backbone": peers.BACKBONE, "seed": seed, "epochs": 12,
        "batch_size": 64, "base_lr": 2e-3, "scored": "val, final epoch",
        "lr_source": "lr_find's valley" if row == "fastai_lr_find" else "fine_tune's default",
        "lr_find_seconds": 90.0 if row == "fastai_lr_find" else 0.0,
        "accuracy": 1 - len(wrong) / len(IMAGES), "images": len(IMAGES), "seconds_per_epoch": seconds,
        "history": [], "checks": {"network": "efficientnet_lite0, 296 tensors identical", "normalisation": "mean"},
        "versions": {"fastai": "2.8.12", "fastcore": "1.8", "torch": "2.14.1", "torchvision": "0.29.1",
                     "timm": "1.0"}, "threads": 2, "workers": 2, "channels_last": True, "machine": "2 CPU cores",
        "commit": "abc1234", "date": "2026-12-01", "command": "python -m benchmarks.peers --data D"}))


def _project_runs(out, wrong: dict[str, list[set[int]]]) -> None:
    """compare_all's files for these recipes, one run per seed, each epoch 10 s of train and 2 s of val."""
    rows = []
    for experiment, per_seed in wrong.items():
        for seed, bad in enumerate(per_seed):
            run = f"{experiment}-{peers.BACKBONE}-seed{seed}"
            rows.append({"dataset": "hymenoptera_data", "experiment": experiment, "backbone": peers.BACKBONE,
                         "seed": seed, "status": "ok", "train_epochs": 12, "batch_size": 32,
                         "headline": "val, final epoch", "headline_acc": 1 - len(bad) / len(IMAGES), "run": run})
            for folder in ("predictions", "history"):
                (out / folder / "hymenoptera_data").mkdir(parents=True, exist_ok=True)
            _predictions(out / "predictions" / "hymenoptera_data" / f"{run}.csv", bad)
            write_table(out / "history" / "hymenoptera_data" / f"{run}.csv",
                        [{"epoch": 0, "phase": "val", "seconds": 99.0}]
                        + [{"epoch": e, "phase": p, "seconds": s} for e in (1, 2) for p, s in (("train", 10.0),
                                                                                          ("val", 2.0))])
    rows.append(dict(rows[0], backbone="resnet18", run="other"))  # another backbone: not a peer of Lite0
    write_table(out / "runs.csv", rows)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The page of these records, built once: fastai_default far below modern_finetune (20 of 80
    images wrong against 2), fastai_lr_find within noise of it (3 against 2), two_stage recorded
    for one seed only, and a --speed record."""
    out = tmp_path_factory.mktemp("peers") / "results"
    for seed in (0, 1, 2):
        _fastai_record(out, "fastai_default", seed, set(range(seed, 80, 4)), 60.0 + seed)
        _fastai_record(out, "fastai_lr_find", seed, {seed, 41, 60}, 70.0)
    _project_runs(out, {"modern_finetune": [{1, 50}, {2, 51}, {3, 52}], "two_stage": [{4, 5, 6, 7}]})
    (out / "peers" / "hymenoptera_data" / "speed.json").write_text(json.dumps({
        "dataset": "hymenoptera_data", "fastai_seconds": [30.0, 60.0], "project_seconds": [10.0, 40.0],
        "threads": 2, "workers": 2, "channels_last": True, "machine": "2 CPU cores",
        "command": "python -m benchmarks.peers --speed"}))
    written = peers.write_page(out)
    assert [p.name for p in written] == ["peers.csv", "peers.md", "peers.png"]
    return out


def test_the_table_holds_each_rows_seeds_their_mean_and_std_and_the_verdict(recorded):
    table = read_table(recorded / "peers.csv").set_index("row")
    assert list(table.index) == ["fastai_default", "fastai_lr_find", "modern_finetune", "two_stage"]
    assert table.loc["fastai_default", "accuracy_mean"] == pytest.approx(0.75)
    assert table.loc["fastai_default", "accuracy_std"] == pytest.approx(0.0)
    assert table.loc["modern_finetune", "accuracy_mean"] == pytest.approx(1 - 2 / 80)
    assert table.loc["fastai_default", "seconds_per_epoch"] == pytest.approx(61.0)
    assert table.loc["modern_finetune", "seconds_per_epoch"] == pytest.approx(12.0)  # train + val, epoch 0 left out
    assert table.loc["two_stage", "runs"] == 1 and np.isnan(table.loc["two_stage", "accuracy_std"])
    assert table.loc["fastai_default", "diff_vs_modern_finetune"] == pytest.approx(0.75 - 78 / 80)
    assert table.loc["fastai_default", "verdict_vs_modern_finetune"] == "modern_finetune beats fastai_default"
    assert table.loc["fastai_lr_find", "verdict_vs_modern_finetune"] == "within noise"
    assert table.loc["fastai_default", "scored"] == "val, final epoch"
    assert np.isnan(table.loc["modern_finetune", "diff_vs_modern_finetune"])


def test_the_page_says_what_fastai_was_given_and_every_comparison(recorded):
    md = (recorded / "peers.md").read_text()
    for given in ("Learner(dls, model, splitter=..., metrics=accuracy)", "`vision_learner` would replace the head",
                  "Normalize.from_stats", "val/ is fastai's validation set",
                  "Resize(460)", "aug_transforms(size=224, min_scale=0.75)", "final epoch", "set_seed(seed, "
                  "reproducible=True)", "fastai 2.8.12, fastcore 1.8, torch 2.14.1", "296 tensors identical",
                  "python -m benchmarks.peers --data D", "fastai_default seed 0: 0.002 (fine_tune's default)",
                  "fastai_lr_find seed 2: 0.002 (lr_find's valley, found in 90 s)"):
        assert given in md, given
    assert "| fastai_default | fastai 2.8.12 | 12 | 64 | val, final epoch | 0 1 2 | 75.0 ± 0.0 |" in md
    assert "| fastai_default | two_stage | 1 | 80 |" in md  # the seeds both ran: two_stage has seed 0 alone
    assert "| two_stage | modern_finetune | 1 | 80 |" in md
    assert (recorded / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_speed_section_gives_each_epoch_and_the_ratio(recorded):
    md = (recorded / "peers.md").read_text()
    assert "| hymenoptera_data | 1 | 30.0 | 10.0 | 3.00 | 2 | 2 | True | 2 CPU cores |" in md
    assert "| hymenoptera_data | 2 | 60.0 | 40.0 | 1.50 |" in md
    assert "python -m benchmarks.peers --speed" in md
    assert peers.speed_section([]) == []  # no --speed record: no section


def test_no_record_writes_no_page_and_a_damaged_record_is_one_error(tmp_path):
    assert peers.write_page(tmp_path) == [] and not (tmp_path / "peers.md").exists()
    bad = peers.record_path(tmp_path, "hymenoptera_data", "fastai_default", 0)
    bad.parent.mkdir(parents=True)
    bad.write_text('{"dataset": ')
    with pytest.raises(TLError, match="remove it and run that row again"):
        peers.write_page(tmp_path)


def test_a_rerun_trains_only_the_runs_not_yet_recorded(tmp_path, monkeypatch):
    trained = []

    def fake_run(row, data, seed, epochs, settings, log=print):
        trained.append((row, seed))
        if seed == 1:
            raise KeyboardInterrupt  # stopped during the second run: the first is kept
        return {"dataset": data.name, "row": row, "seed": seed, "accuracy": 0.5, "scored": "val, final epoch",
                "seconds_per_epoch": 1.0}, [{"path": "val/a/1.jpg", "label": "a", "prediction": "b"}]

    monkeypatch.setattr(peers, "fastai_run", fake_run)
    data = tmp_path / "hymenoptera_data"
    with pytest.raises(KeyboardInterrupt):
        peers.train_rows(data, ["fastai_default"], [0, 1], 12, {}, tmp_path, log=lambda line: None)
    first = peers.record_path(tmp_path, "hymenoptera_data", "fastai_default", 0)
    assert first.is_file() and read_table(peers.predictions_path(first)).prediction.tolist() == ["b"]
    assert not peers.record_path(tmp_path, "hymenoptera_data", "fastai_default", 1).exists()
    trained.clear()
    with pytest.raises(KeyboardInterrupt):
        peers.train_rows(data, ["fastai_default"], [0, 1], 12, {}, tmp_path, log=lambda line: None)
    assert trained == [("fastai_default", 1)]


def test_the_network_check_names_a_tensor_that_differs(tiny_backbone):
    from tests.conftest import TinyNet

    torch.manual_seed(0)
    reference = TinyNet()
    same = TinyNet()
    same.load_state_dict(reference.state_dict())
    assert "identical" in peers.check_network(same, reference)
    with torch.no_grad():
        same.stem[1].running_mean[0] += 1e-6  # a BatchNorm buffer, not a parameter
    with pytest.raises(TLError, match="1 tensors differ, e.g. stem.1.running_mean"):
        peers.check_network(same, reference)
    with pytest.raises(TLError, match="other tensors"):
        peers.check_network(torch.nn.Linear(2, 2), reference)


def test_without_fastai_the_command_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from tl.engine.command import command

    monkeypatch.setitem(__import__("sys").modules, "fastai.vision.all", None)  # import fails as if absent
    code = command(lambda: peers.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: fastai is not importable here") and "requirements-peers.txt" in err[0]


def test_epochs_below_two_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        peers.parse_args(["--data", "d", "--epochs", "1"])
    assert stop.value.code == 2 and "expected a whole number >= 2" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_FASTAI, reason="fastai is not installed here (requirements-peers.txt): the main "
                    "install has none, and the page and table code above runs without it")
def test_fastai_trains_the_project_network_on_the_project_images(tmp_path, monkeypatch, pretrained):
    """Two tiny runs with one seed are the same run (losses and predictions); the network check
    passed; test/ is scored where the data folder has one."""
    from tests.conftest import write_image_folder

    monkeypatch.setattr(peers, "BACKBONE", "tiny")
    monkeypatch.setattr(peers, "WEIGHTS", str(pretrained))
    monkeypatch.setattr(peers, "BATCH", 8)
    monkeypatch.setattr(peers, "PRESIZE", 48)
    monkeypatch.setattr(peers, "SIZE", 32)
    data = write_image_folder(tmp_path / "tiny", phases=("train", "val", "test"), val=4)
    settings = {"workers": 0, "channels_last": False, "threads": 1}
    first, predictions = peers.fastai_run("fastai_default", data, 3, 2, settings, log=lambda line: None)
    again, predictions_again = peers.fastai_run("fastai_default", data, 3, 2, settings, log=lambda line: None)
    def losses(record):
        return [(e["train_loss"], e["valid_loss"]) for e in record["history"]]

    assert predictions == predictions_again and losses(first) == losses(again)  # the same run, float for float
    assert first["scored"] == "test, final epoch" and first["images"] == 8 == len(predictions)
    assert {p["path"].split("/")[0] for p in predictions} == {"test"}
    assert "identical" in first["checks"]["network"] and len(first["history"]) == 2
    assert "mean (0.485" in first["checks"]["normalisation"]
