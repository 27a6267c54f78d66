"""`python main.py --resume RUN/last.ckpt`: what a resume refuses (options that would change the
result, other data, a damaged or hand-edited checkpoint, an average that does not fit, a file
that is not a training checkpoint) with one error line and exit status 2, and what it restores
(the CPU thread count, a checkpoint that recorded cached phases without a cache mode).
That a resumed run equals the uninterrupted one is tests/test_exactness.py's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import main
from tests.conftest import write_image_folder
from tests.fixtures.make_tiny_run import DATA, RUN
from tests.helpers import cli, train_frozen
from tl.engine import checkpoint, files


def _edit_checkpoint(path, change) -> None:
    """A hand edit of last.ckpt that keeps it loadable: the digest is written anew."""
    ckpt = checkpoint.load_checkpoint(path)
    change(ckpt)
    ckpt["digest"] = files.state_digest(ckpt)
    torch.save(ckpt, path)


def test_resume_of_a_checkpoint_that_recorded_cached_phases_but_no_cache_mode(tmp_path, tiny_backbone, own_cache_dir):
    """A stage entry with `cached_phases` but no `feature_cache` words (nor the config's) resumes,
    caching only those phases (no plan was recorded to read)."""
    shutil.copytree(RUN, tmp_path / "run")

    def forget_the_words(ckpt):
        del ckpt["config"]["feature_cache"], ckpt["config"]["stages"][0]["feature_cache"]
        ckpt["config"]["stages"][0]["cached_phases"] = []  # val, which this plan caches, was not cached

    _edit_checkpoint(tmp_path / "run" / "last.ckpt", forget_the_words)
    assert main.main(["--resume", str(tmp_path / "run" / "last.ckpt"), "--epochs", "2", "--data", str(DATA),
                      "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["stages"][0]["cached_phases"] == [] and config["results"]["best_epoch"] >= 0


def _edit_last_ckpt(ckpt_path: Path, change) -> None:
    """Change a last.ckpt by hand, the digest recomputed: only the content checks can tell."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt.pop("digest")
    change(ckpt)
    ckpt["digest"] = files.state_digest(ckpt)
    torch.save(ckpt, ckpt_path)


def _run_with_ema(capsys, data, backbone, out) -> Path:
    code, _, err = cli(capsys, "-e", "resnet_scratch", "--data", data, "-b", backbone, "--weights", "none",
                       "--quick", "--image-size", 32, "--ema", 0.9, "--out", out, "--no-progress")
    assert code == 0, err
    (run,) = out.iterdir()
    return run


@pytest.mark.parametrize("change, says", [
    (lambda c: c.update(ema="garbage"), 'average of the weights ("ema") is not the state of an average'),
    (lambda c: c["ema"].pop("n_averaged"), "average of the weights does not fit its model"),
    (lambda c: c["ema"].update(n_averaged=torch.zeros(3)), "average of the weights does not fit its model"),
    (lambda c: c.update(ema=None), "holds no average of the weights"),
])
def test_a_hand_edited_average_in_last_ckpt_is_refused(tiny_data, tiny_backbone, tmp_path, capsys, change, says):
    run = _run_with_ema(capsys, tiny_data, tiny_backbone, tmp_path / "runs")
    _edit_last_ckpt(run / "last.ckpt", change)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = cli(capsys, "--resume", run / "last.ckpt", "--epochs", 2, "--no-progress")
    assert code == 2 and says in err and err.startswith("error:"), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written, nothing lost
    if "not the state" in says:  # --evaluate reads the average too
        code, _, err = cli(capsys, "--evaluate", run / "last.ckpt", "--data", tiny_data)
        assert code == 2 and says in err, err


def test_an_average_added_by_hand_to_a_run_without_one_is_refused(tiny_data, tiny_backbone, tmp_path, capsys):
    donor = _run_with_ema(capsys, tiny_data, tiny_backbone, tmp_path / "donor")
    code, _, err = cli(capsys, "-e", "resnet_scratch", "--data", tiny_data, "-b", tiny_backbone, "--weights", "none",
                       "--quick", "--image-size", 32, "--out", tmp_path / "runs", "--no-progress")
    (run,) = (tmp_path / "runs").iterdir()
    ema = torch.load(donor / "last.ckpt", weights_only=False)["ema"]
    _edit_last_ckpt(run / "last.ckpt", lambda c: c.update(ema=ema))
    code, _, err = cli(capsys, "--resume", run / "last.ckpt", "--epochs", 2, "--no-progress")
    assert code == 2 and "though its run asks for none" in err, err


def test_a_resume_on_another_thread_count_trains_on_the_recorded_one(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "d", train=16, val=8)
    base = ["-e", "resnet_finetune", "-b", "tiny", "--data", data, "--weights", "none", "--quick", "--no-progress"]
    torch.set_num_threads(2)
    assert cli(capsys, *base, "--epochs", "2", "--out", tmp_path / "full")[0] == 0
    assert cli(capsys, *base, "--epochs", "1", "--out", tmp_path / "half")[0] == 0
    ((full,), (half,)) = (tmp_path / "full").iterdir(), (tmp_path / "half").iterdir()
    assert json.loads((half / "config.json").read_text())["threads"] == 2
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 would
    code, out, _ = cli(capsys, "--resume", half / "last.ckpt", "--epochs", "2", "--no-progress")
    assert code == 0 and "CPU threads: 2, as the run was trained (this process had 1)" in out
    assert torch.get_num_threads() == 2
    figures = [pd.read_csv(run / "history.csv").drop(columns=["seconds", "images_per_s"]) for run in (full, half)]
    pd.testing.assert_frame_equal(*figures, check_exact=True)  # exactly the uninterrupted run


def test_resume_needs_a_training_checkpoint(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "best.pth")
    assert main.main(["--resume", str(tmp_path / "best.pth")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


@pytest.mark.usefixtures("own_cache_dir")
def test_options_that_change_the_result_are_refused_on_resume(tiny_data, pretrained, tmp_path, capsys):
    half = train_frozen(tiny_data, tmp_path / "half", 1, "--workers", "0", weights=pretrained)
    ckpt = str(half / "last.ckpt")
    for bad in (["--workers", "2"], ["--no-feature-cache"], ["--lr-scale", "3"], ["--no-augment"], ["--seed", "1"],
                ["--batch-size", "7"]):
        assert main.main(["--resume", ckpt, "--no-progress", *bad]) == 2, bad
        err = capsys.readouterr().err
        option = bad[0].removeprefix("--").removeprefix("no-")
        assert "would change its result" in err and option in err and "Traceback" not in err
    # the safe ones apply and are recorded; the run's numbers describe the whole run
    assert main.main(["--resume", ckpt, "--epochs", "2", "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    config = json.loads((half / "config.json").read_text())
    assert config["options"]["epochs"] == 2 and config["options"]["device"] == "cpu"
    assert config["results"]["wall_seconds"] > checkpoint.load_checkpoint(half / "last.ckpt")["wall_seconds"] / 2
    assert len(pd.read_csv(half / "history.csv")) == 5  # val 0, train+val 1, train+val 2


@pytest.mark.usefixtures("own_cache_dir")
def test_resume_checks_the_data_not_only_the_class_names(tiny_data, pretrained, tmp_path, capsys):
    half = train_frozen(tiny_data, tmp_path / "half", 1, weights=pretrained)
    other = write_image_folder(tmp_path / "other", seed=5)  # same class names, other images
    assert main.main(["--resume", str(half / "last.ckpt"), "--data", str(other), "--epochs", "2"]) == 2
    err = capsys.readouterr().err  # names the folder it was given, and the one the run started on
    assert f"other images than {other} holds now (it started on {tiny_data})" in err, err
    moved = shutil.copytree(tiny_data, tmp_path / "moved")  # the same images in another place
    assert main.main(["--resume", str(half / "last.ckpt"), "--data", str(moved), "--epochs", "2",
                      "--no-progress"]) == 0
    assert json.loads((half / "config.json").read_text())["options"]["data"] == str(moved)


@pytest.mark.usefixtures("own_cache_dir")
def test_a_damaged_checkpoint_is_refused(tiny_data, pretrained, tmp_path, capsys):
    run_dir = train_frozen(tiny_data, tmp_path / "runs", 1, weights=pretrained)
    ckpt_path = run_dir / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["fc.weight"].view(torch.int32)[0, 0] ^= 1  # one flipped mantissa bit, digest kept
    torch.save(ckpt, ckpt_path)
    for argv in (["--resume", str(ckpt_path)], ["--evaluate", str(ckpt_path), "--data", str(tiny_data)]):
        assert main.main(argv) == 2
        err = capsys.readouterr().err
        assert "is damaged" in err and "Traceback" not in err
    best = run_dir / "best.pth"
    state = torch.load(best, weights_only=True)
    state["stem.0.weight"].view(torch.int32)[0, 0, 0, 0] ^= 1
    torch.save(state, best)
    assert main.main(["--evaluate", str(best), "--data", str(tiny_data)]) == 2
    assert "damaged or was replaced" in capsys.readouterr().err


@pytest.mark.usefixtures("own_cache_dir")
def test_flipped_bytes_anywhere_in_a_checkpoint_never_load_silently(tiny_data, pretrained, tmp_path, capsys):
    run_dir = train_frozen(tiny_data, tmp_path / "runs", 1, weights=pretrained)
    data = bytearray((run_dir / "last.ckpt").read_bytes())
    generator = torch.Generator().manual_seed(0)
    for i in torch.randint(len(data), (50,), generator=generator).tolist():
        data[i] ^= 0xFF
    (run_dir / "last.ckpt").write_bytes(bytes(data))
    assert main.main(["--resume", str(run_dir / "last.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


