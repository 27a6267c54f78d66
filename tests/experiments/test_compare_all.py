"""compare_all: every column, right statuses, summary figures recomputable from runs.csv, plots;
headline numbers per data set, subset reruns that leave nothing stale, two comparisons at once,
and a tuned recipe added where its data set has one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from experiments import NAMES, compare_all, report

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_COLUMNS = {
    "dataset", "headline", "headline_acc_mean", "headline_acc_std",
    "experiment", "source", "backbone", "weights", "strategy", "trainable_params", "total_params", "train_epochs",
    "batch_size", "optimizer", "learning_rates", "baseline_val_acc_mean", "best_val_acc_mean", "best_val_acc_std",
    "final_val_acc_mean", "final_val_acc_std", "best_epoch_mean", "seeds", "train_seconds_mean",
    "train_images_per_s_mean", "device", "torch", "date", "status", "reason",
}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from tests.conftest import block_network, write_image_folder

    tmp = tmp_path_factory.mktemp("compare")
    plain = write_image_folder(tmp / "plain", size=64)  # train/val: headline = final val epoch
    tested = write_image_folder(tmp / "tested", size=64, phases=("train", "val", "test"))  # headline on test
    out = tmp / "results"
    with pytest.MonkeyPatch.context() as mp:  # module-scoped, so conftest's autouse block is not active yet
        block_network(mp, tmp / "torch_home")
        code = compare_all.main(["--quick", "--data", str(plain), "--data", str(tested),
                                 "--backbone", "efficientnet_lite0", "own", "--seeds", "0", "1", "--out", str(out),
                                 "--runs-dir", str(tmp / "runs"), "--workers", "0"])
    return code, out, {"plain": plain, "tested": tested}


def test_quick_comparison_writes_every_column_and_row(comparison):
    code, out, _ = comparison
    assert code == 0  # rows that could not run do not fail the command
    summary = pd.read_csv(out / "summary.csv")
    assert SUMMARY_COLUMNS <= set(summary.columns)
    assert len(summary) == 2 * 2 * len(NAMES)  # 2 data sets x 2 backbones
    for dataset in ("plain", "tested"):
        lite = summary[(summary.backbone == "efficientnet_lite0") & (summary.dataset == dataset)]
        assert list(lite.experiment) == list(NAMES) and (lite.status == "ok").all() and (lite.seeds == 2).all()
        assert set(lite.weights) == {"packaged", "none"}  # resnet_scratch keeps its random init


def test_missing_weights_are_not_run_rows_with_the_reason(comparison):
    _, out, _ = comparison
    summary = pd.read_csv(out / "summary.csv").set_index(["dataset", "experiment", "backbone"])
    assert summary.loc[("plain", "resnet_scratch", "resnet18"), "status"] == "ok"  # random init needs no download
    for name, backbone in [("resnet_finetune", "resnet18"), ("resnet_frozen", "resnet18"),
                           ("resnet_bn_only", "resnet18"), ("vgg_transfer", "vgg16"), ("vgg_finetune", "vgg16")]:
        row = summary.loc[("plain", name, backbone)]
        assert row.status == "not run" and "ImageNet weights" in row.reason and row.seeds == 0


def test_summary_figures_are_recomputable_from_runs_csv(comparison):
    _, out, _ = comparison
    runs = pd.read_csv(out / "runs.csv")
    summary = pd.read_csv(out / "summary.csv").set_index(compare_all.KEY)
    ok = runs[runs.status == "ok"].groupby(compare_all.KEY)
    for key, acc in ok.best_val_acc.mean().items():
        assert summary.loc[key, "best_val_acc_mean"] == pytest.approx(acc)
    for key, acc in ok.headline_acc.mean().items():
        assert summary.loc[key, "headline_acc_mean"] == pytest.approx(acc)
    for key, std in ok.final_val_acc.std().items():
        assert summary.loc[key, "final_val_acc_std"] == pytest.approx(std, nan_ok=True)
    done = runs[runs.status == "ok"]
    for dataset, run, best, headline in zip(done.dataset, done.run, done.best_val_acc, done.headline_acc):
        history = pd.read_csv(out / "history" / dataset / f"{run}.csv")
        assert history[history.phase == "val"].acc.max() == pytest.approx(best)
        predictions = pd.read_csv(out / "predictions" / dataset / f"{run}.csv")  # the headline, image by image
        assert (predictions.label == predictions.prediction).mean() == pytest.approx(headline)


def test_headline_is_test_where_there_is_a_test_split(comparison):
    _, out, _ = comparison
    runs = pd.read_csv(out / "runs.csv")
    done = runs[runs.status == "ok"]
    tested, plain = done[done.dataset == "tested"], done[done.dataset == "plain"]
    assert (tested.headline == "test, epoch chosen on val").all()
    assert tested.headline_acc.tolist() == pytest.approx(tested.test_acc.tolist())
    assert (plain.headline == "val, final epoch").all() and plain.test_acc.isna().all()
    assert plain.headline_acc.tolist() == pytest.approx(plain.final_val_acc.tolist())


def test_plots_and_report_are_written(comparison):
    _, out, _ = comparison
    for dataset in ("plain", "tested"):
        for name in [f"curves_{dataset}.png", f"comparison_{dataset}.png",
                     f"curves_{dataset}_resnet_frozen_efficientnet_lite0.png",
                     f"curves_{dataset}_resnet_scratch_resnet18.png",
                     f"curves_{dataset}_resnet_scratch_efficientnet_lite0.png"]:
            with Image.open(out / name) as img:
                assert img.format == "PNG" and img.width >= 600 and img.height >= 300
    text = (out / "README.md").read_text()
    assert "python -m experiments.compare_all --quick" in text and "| resnet_frozen |" in text
    assert "not run" in text and "--quick smoke run, not a result" in text
    assert "Which differences are real (plain)" in text and "Which differences are real (tested)" in text
    pairs = pd.read_csv(out / "differences.csv")
    assert set(pairs.dataset) == {"plain", "tested"} and set(pairs.verdict) <= {"A beats B", "B beats A",
                                                                               "within noise"}


def test_a_subset_rerun_replaces_only_its_rows_and_leaves_nothing_stale(comparison, tmp_path):
    _, first, data = comparison
    out = tmp_path / "results"
    shutil.copytree(first, out)
    before = pd.read_csv(out / "runs.csv")
    (out / "benchmark.csv").write_text("not ours\n")  # results/ holds other files: they stay
    (out / "curves_resnet_frozen.png").write_bytes(b"")  # plots and rows of an older layout: removed
    (out / "history" / "plain" / "gone-seed7.csv").write_text("epoch\n")
    assert compare_all.main(["--quick", "--data", str(data["plain"]), "--experiments", "resnet_frozen",
                             "--backbone", "efficientnet_lite0", "--seeds", "5", "--out", str(out),
                             "--runs-dir", str(tmp_path / "runs"), "--workers", "0"]) == 0
    after = pd.read_csv(out / "runs.csv")
    key = (after.dataset == "plain") & (after.experiment == "resnet_frozen") & (after.backbone == "efficientnet_lite0")
    assert after[key].seed.tolist() == [5]  # the key's old seeds 0 and 1 are replaced, not mixed in
    old_key = (before.dataset == "plain") & (before.experiment == "resnet_frozen") & (
        before.backbone == "efficientnet_lite0")
    pd.testing.assert_frame_equal(after[~key].reset_index(drop=True), before[~old_key].reset_index(drop=True))
    assert len(pd.read_csv(out / "summary.csv")) == 2 * 2 * len(NAMES)
    for folder in ("history", "predictions"):
        names = {p.name for p in (out / folder / "plain").iterdir()}
        assert "resnet_frozen-efficientnet_lite0-seed5.csv" in names
        assert not {"resnet_frozen-efficientnet_lite0-seed0.csv", "resnet_frozen-efficientnet_lite0-seed1.csv",
                    "gone-seed7.csv"} & names
        assert len(list((out / folder / "tested").iterdir())) == len(list((first / folder / "tested").iterdir()))
    assert not (out / "curves_resnet_frozen.png").exists() and (out / "benchmark.csv").exists()
    assert {p.name for p in out.glob("*.png")} == {p.name for p in first.glob("*.png")}  # all redrawn, no extra
    commands = json.loads((out / "meta.json").read_text())["datasets"]
    assert len(commands["plain"]["commands"]) == 2 and len(commands["tested"]["commands"]) == 1
    assert commands["plain"]["commands"][-1]["rows"] == [["resnet_frozen", "efficientnet_lite0"]]  # the rows it made


def test_provenance_says_when_rows_are_not_one_full_comparison():
    full = {"data": "d", "command": "compare_all", "experiments": list(NAMES), "quick": False, "full": True}
    part = full | {"command": "compare_all --experiments resnet_frozen", "experiments": ["resnet_frozen"],
                   "full": False}
    meta = compare_all.update_meta({}, {"d": full}, "machine")
    assert "full comparison" in report.provenance(meta)[0] and "not" not in report.provenance(meta)[0]
    meta = compare_all.update_meta(meta, {"d": part}, "machine")
    assert "**not a full comparison**" in report.provenance(meta)[0] and len(meta["datasets"]["d"]["commands"]) == 2
    meta = compare_all.update_meta(meta, {"d": full}, "machine")  # a full rerun starts the list afresh
    assert len(meta["datasets"]["d"]["commands"]) == 1
    # a caveat added by hand to meta.json survives the next command that rewrites it
    meta = compare_all.update_meta(meta | {"note": "two commands"}, {"d": part}, "machine")
    assert meta["note"] == "two commands"


def test_report_and_compare_all_help_answer_without_a_traceback(tmp_path):
    for module in ("experiments.report", "experiments.compare_all"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and "usage:" in proc.stdout and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "experiments.report", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    # --help is fast because nothing heavy is imported before the arguments are parsed
    proc = subprocess.run([sys.executable, "-c", "import sys, experiments.compare_all, experiments.report; "
                           "print(sorted({'torch', 'tl.engine.run'} & set(sys.modules)))"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "[]"


def test_a_reused_runs_dir_ctrl_c_and_the_machines_failures_leave_the_results_alone(tmp_path, monkeypatch, capsys):
    from tests.conftest import write_image_folder
    from tl import Interrupted

    data = write_image_folder(tmp_path / "d", size=64)
    out, runs = tmp_path / "results", tmp_path / "runs"
    base = ["--quick", "--data", str(data), "--experiments", "resnet_frozen", "--backbone", "efficientnet_lite0",
            "--out", str(out), "--workers", "0", "--no-progress"]
    assert compare_all.main([*base, "--seeds", "0", "1", "--runs-dir", str(runs)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert compare_all.main([*base, "--seeds", "0", "1", "--runs-dir", str(runs)]) == 2  # same runs-dir again
    assert "already holds runs" in capsys.readouterr().err

    import tl.engine.run

    real_run, calls = tl.engine.run.run, []

    def ctrl_c_on_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted("interrupted: ...")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tl.engine.run, "run", ctrl_c_on_the_second_run)
    from tl.engine.command import command

    assert command(lambda: compare_all.main([*base, "--seeds", "0", "1", "--runs-dir", str(tmp_path / "runs2")])) \
        == 130  # Ctrl-C
    assert "interrupted" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # tables, histories and predictions untouched

    # the machine's problems in a run (a full or read-only disk, no permission, a lock taken away)
    # stop the comparison: no recipe is recorded as failed for them, and `out` keeps its rows
    from tl.engine.folder_lock import LockLost

    problems = [OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs3" / "last.ckpt")),
                OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs4")),
                PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs5" / "config.json")),
                OSError(errno.EIO, "Input/output error", None), LockLost("the lock file ... was removed")]
    for i, problem in enumerate(problems, 3):
        def fails_on_the_second_run(*args, _problem=problem, **kwargs):
            calls.append(1)
            if len(calls) % 2 == 0:
                raise _problem
            return real_run(*args, **kwargs)

        calls.clear()
        monkeypatch.setattr(tl.engine.run, "run", fails_on_the_second_run)
        assert compare_all.main([*base, "--seeds", "0", "1", "--runs-dir", str(tmp_path / f"runs{i}")]) == 2
        err = capsys.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("error:")] == err.strip().splitlines(), err
        assert len(err.strip().splitlines()) == 1 and f"{out} is unchanged" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, problem


def _compare_in_child(argv: list[str], barrier, log_path: str) -> None:
    """One `compare_all` in a process of its own (spawned, so no torch state is forked), made to
    meet the other one after training, so both come to write `--out` at the same moment."""
    import contextlib
    import os
    import socket
    import time

    from tests.conftest import _refuse_internet

    socket.socket.connect = _refuse_internet
    os.environ["TL_CACHE_DIR"] = str(Path(log_path).with_suffix(".cache"))
    real_run_one, real_read_runs, trained = compare_all.run_one, compare_all.read_runs, []

    def run_one_then_meet(*args, **kwargs):
        result = real_run_one(*args, **kwargs)
        barrier.wait(timeout=300)  # both have trained: now both write
        trained.append(1)
        return result

    def read_runs_slowly(out):
        old = real_read_runs(out)
        if trained:
            time.sleep(1.5)  # a window in which the other comparison writes, if nothing stops it
        return old

    compare_all.run_one, compare_all.read_runs = run_one_then_meet, read_runs_slowly
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = compare_all.main(argv)
    sys.exit(code)


def test_two_comparisons_at_once_take_turns_and_lose_nothing(tmp_path, capsys):
    import multiprocessing

    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "d", size=64, train=4, val=4)
    out = tmp_path / "results"
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    children, logs = [], []
    for name in ("resnet_frozen", "vgg_transfer"):
        argv = ["--quick", "--data", str(data), "--experiments", name, "--backbone", "efficientnet_lite0",
                "--out", str(out), "--runs-dir", str(tmp_path / f"runs-{name}"), "--workers", "0"]
        logs.append(tmp_path / f"{name}.log")
        children.append(spawn.Process(target=_compare_in_child, args=(argv, barrier, str(logs[-1]))))
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=600)
    texts = [log.read_text() for log in logs]
    assert [child.exitcode for child in children] == [0, 0], texts
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.experiment) == ["resnet_frozen", "vgg_transfer"] and (runs.status == "ok").all()
    assert sorted(pd.read_csv(out / "summary.csv").experiment) == ["resnet_frozen", "vgg_transfer"]
    for folder in ("history", "predictions"):
        assert sorted(p.name for p in (out / folder / "d").iterdir()) == [
            "resnet_frozen-efficientnet_lite0-seed0.csv", "vgg_transfer-efficientnet_lite0-seed0.csv"]
    # the second one to write said that it waits, and for which process
    waited = [i for i, text in enumerate(texts) if "waiting for it to finish" in text]
    assert len(waited) == 1, texts
    assert f"is being written by process {children[1 - waited[0]].pid} (" in texts[waited[0]], texts[waited[0]]
    # a folder that lost a run's files (as two comparisons writing at once did) stops the next
    # comparison at once, with the files named, instead of a traceback after its training
    (out / "history" / "d" / "vgg_transfer-efficientnet_lite0-seed0.csv").unlink()
    assert compare_all.main(["--quick", "--data", str(data), "--experiments", "resnet_frozen", "--backbone",
                             "efficientnet_lite0", "--out", str(out), "--runs-dir", str(tmp_path / "runs3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "vgg_transfer-efficientnet_lite0-seed0.csv" in err
    assert not (tmp_path / "runs3").exists()  # stopped before training


@pytest.mark.usefixtures("own_cache_dir")
def test_compare_all_adds_a_tuned_recipe_where_its_data_set_has_one(tmp_path, monkeypatch):
    from experiments import compare_all

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path))
    (tmp_path / "modern_finetune-hymenoptera_data-efficientnet_lite0.json").write_text(
        json.dumps({"dataset": "hymenoptera_data", "backbone": "efficientnet_lite0"}))
    args = compare_all.parse_args([])
    assert compare_all.experiments_for(Path("x/hymenoptera_data"), args)[-1] == "tuned_modern_finetune"
    assert "tuned_modern_finetune" not in compare_all.experiments_for(Path("x/dogs-vs-cats"), args)
    asked = compare_all.parse_args(["--experiments", "resnet_frozen", "tuned_modern_finetune"])
    assert compare_all.experiments_for(Path("x/hymenoptera_data"), asked) == ["resnet_frozen", "tuned_modern_finetune"]
    assert compare_all._order("tuned_modern_finetune") > compare_all._order("modern_finetune")


@pytest.mark.usefixtures("own_cache_dir")
def test_a_planned_row_is_named_by_the_backbone_asked_for_or_for_own_by_the_recipe_s_network(tmp_path, monkeypatch):
    """The rows a comparison will replace (checked for their files before training) carry the backbone
    column run_one writes: --backbone as given, `own` as the recipe's network or its tuned file's."""
    from experiments import compare_all

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path))
    name = "modern_finetune-hymenoptera_data-efficientnet_lite2.json"  # the one tuned file of that data set here
    shutil.copy(Path(__file__).resolve().parents[2] / "experiments" / "tuned" / name, tmp_path / name)
    data = Path("x/hymenoptera_data")
    assert compare_all.row_backbone("resnet_finetune", data, "efficientnet_lite0") == "efficientnet_lite0"
    assert compare_all.row_backbone("resnet_finetune", data, "own") == "resnet18"
    assert compare_all.row_backbone("vgg_stacked", data, "own") == "vgg19"
    assert compare_all.row_backbone("tuned_modern_finetune", data, "own") == "efficientnet_lite2"


def test_each_run_of_a_comparison_shows_its_progress_unless_told_not_to():
    """A comparison's runs show the bars of their long passes (a feature pass over 800 val photos
    is minutes), as main.py's do; --no-progress silences them."""
    assert compare_all.parse_args([]).progress is True
    assert compare_all.parse_args(["--no-progress"]).progress is False


@pytest.mark.parametrize("study", ["compare_all", "imbalance"])
def test_sigterm_stops_a_study_with_143_and_leaves_no_empty_run_folder(tiny_data, tiny_backbone, tmp_path,
                                                                      monkeypatch, capsys, study):
    """`kill` (SIGTERM) during a study's run: exit 143 as for main.py (Ctrl-C: 130), one error line,
    the results folder not written and no empty folder left in --runs-dir."""
    import signal
    import time

    import tl.engine.run
    from experiments import imbalance
    from tl.engine.command import command

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    monkeypatch.setattr(tl.engine.run, "run", terminated)
    out, runs = tmp_path / "out", tmp_path / "runs" / "deep"
    argv = ["--data", str(tiny_data), "--backbone", "tiny", "--seeds", "0", "--out", str(out), "--runs-dir", str(runs)]
    if study == "compare_all":
        code = command(lambda: compare_all.main([*argv, "--quick", "--experiments", "resnet_scratch", "--workers",
                                                  "0", "--no-progress"]))
    else:
        code = command(lambda: imbalance.main([*argv, "--keep", "class_0=0.5", "--recipes", "resnet_scratch",
                                               "--weights", "none", "--epochs", "1"]))
    err = capsys.readouterr().err
    assert code == 143 and err.count("error:") == 1 and "interrupted" in err, err
    assert "(no run finished)" in err and str(runs) not in err, err  # it names no folder it did not make
    assert not out.exists() and not (tmp_path / "runs").exists()
