"""DistributedDataParallel under torchrun, on this CPU with 2 gloo processes: the core's [DDP] lines
(tl/distributed.py) and the machinery around them (tl/engine/distributed.py).

Each test starts `torchrun --standalone --nproc_per_node=2 tests/ddp_main.py ...` (main.py
with the tiny backbone registered and two test hooks) as a subprocess and checks:

* the two processes end with identical weights (BatchNorm statistics included);
* every val row of the distributed run equals a single-process evaluation of that epoch's
  weights: the same accuracy exactly, so each val image was counted once;
* a run whose process 0 is killed after epoch 1 resumes under torchrun and ends exactly
  like the uninterrupted run;
* a frozen recipe's feature cache is computed once (by process 0) and used by both.

The data has odd sizes (33 train, 21 val images), so the shards are uneven and the train
sampler pads: the cases where a careless sum counts an image twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import write_image_folder
from tl.engine import checkpoint, files
from tl.engine.evaluate import evaluate, split_loader
from tl.engine.model_loading import context_for, load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# resnet_finetune trains every layer, BatchNorm included; a low rate keeps accuracies off 0 and 1
FINETUNE = ["-e", "resnet_finetune", "-b", "tiny", "--weights", "none", "--epochs", "3", "--batch-size", "4",
            "--lr-scale", "0.3", "--workers", "0", "--save-every-epoch", "--no-progress"]


def torchrun(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    # about 10 s on an idle 2-core machine; the limit only stops a hang (starting 2 processes
    # that import torch took 3 minutes once on a machine shared with other runs)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "ddp_main.py"), *args]
    environment = {**os.environ, "TORCH_HOME": str(tmp / "torch_home"), "TL_CACHE_DIR": str(tmp / "cache"), **env}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def _run_dir(out: Path) -> Path:
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One uninterrupted 2-process run of resnet_finetune, with per-process weight digests."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_image_folder(tmp / "data", classes=3, train=11, val=7)
    digests = tmp / "digests"
    digests.mkdir()
    done = torchrun([*FINETUNE, "--data", str(data), "--out", str(tmp / "runs")], tmp, TL_TEST_DIGESTS=str(digests))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"tmp": tmp, "data": data, "run": _run_dir(tmp / "runs"), "digests": digests, "stdout": done.stdout}


def test_processes_end_with_identical_weights(ddp_run):
    ranks = [json.loads((ddp_run["digests"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["final"] == ranks[1]["final"]  # parameters and BatchNorm buffers
    assert ranks[0]["best"] == ranks[1]["best"]
    # ...and what process 0 saved is that state
    assert files.state_digest(checkpoint.load_checkpoint(ddp_run["run"] / "last.ckpt")["model"]) == \
        ranks[0]["final"]
    assert ddp_run["stdout"].count("headline acc") == 1  # one process prints and writes
    # ...and it says at the start that the run is distributed, over what, with which batch
    assert ddp_run["stdout"].count("distributed: ") == 1
    assert "distributed: 2 processes on 1 machine(s), backend gloo, devices cpu x2; batch 4 per process, 8 per step" \
        in ddp_run["stdout"].splitlines()[0:3]


def test_with_ema_every_process_averages_the_same_weights(ddp_run):
    """--ema under torchrun: each process folds its own (identical) weights into its average
    after every step, so the averages, and what val scored, stay identical across processes;
    process 0 saves that average in last.ckpt and as best.pth."""
    tmp, digests = ddp_run["tmp"], ddp_run["tmp"] / "digests_ema"
    digests.mkdir()
    done = torchrun([*FINETUNE, "--ema", "0.8", "--data", str(ddp_run["data"]), "--out", str(tmp / "runs_ema")],
                    tmp, TL_TEST_DIGESTS=str(digests))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final"] == ranks[1]["final"] and ranks[0]["best"] == ranks[1]["best"]
    run = _run_dir(tmp / "runs_ema")
    ckpt = checkpoint.load_checkpoint(run / "last.ckpt")
    assert int(ckpt["ema"]["n_averaged"]) == 1 + 3 * 5  # the start, then 3 epochs of 5 steps (17 images x 2, 4 each)
    assert files.state_digest(checkpoint.load_state_file(run / "best.pth")) == ranks[0]["best"]
    assert ranks[0]["best"] != ranks[0]["final"]  # the average, not the loop's last weights


def test_distributed_val_rows_equal_a_single_process_evaluation(ddp_run, tiny_backbone):
    run, data = ddp_run["run"], ddp_run["data"]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["dataset_sizes"]["val"] == 21
    history = pd.read_csv(run / "history.csv")
    val = history[history.phase == "val"].set_index("epoch")
    accs = []
    for epoch in range(4):
        path = run / f"{epoch:02d}.pth"
        ctx = context_for(path, None)
        loader, classes = split_loader(data, "val", ctx)
        result = evaluate(load_model(path, ctx, len(classes)), loader, torch.device("cpu"), len(classes))
        assert result["n"] == 21
        assert val.loc[epoch, "acc"] == result["acc"], epoch  # exactly: every val image counted once
        assert val.loc[epoch, "loss"] == pytest.approx(result["loss"], rel=1e-5), epoch
        accs.append(result["acc"])
    assert any(0 < a < 1 for a in accs), accs  # a figure that a double-counted image would change


def test_a_killed_distributed_run_resumes_to_the_same_result(ddp_run):
    tmp = ddp_run["tmp"]
    out = tmp / "killed"
    killed = torchrun([*FINETUNE, "--data", str(ddp_run["data"]), "--out", str(out)], tmp, TL_TEST_KILL_AFTER="1")
    assert killed.returncode != 0
    half = _run_dir(out)
    assert checkpoint.load_checkpoint(half / "last.ckpt")["epoch"] == 1
    resumed = torchrun(["--resume", str(half / "last.ckpt"), "--no-progress"], tmp)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    full = ddp_run["run"]
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    strip = ["seconds", "images_per_s"]
    assert pd.read_csv(full / "history.csv").drop(columns=strip).equals(pd.read_csv(half / "history.csv").drop(
        columns=strip))
    assert files.state_digest(a["model"]) == files.state_digest(b["model"])
    assert files.state_digest(checkpoint.load_state_file(full / "best.pth")) == \
        files.state_digest(checkpoint.load_state_file(half / "best.pth"))


def test_resume_with_another_process_count_is_refused(ddp_run, tmp_path):
    import main

    code = main.main(["--resume", str(ddp_run["run"] / "last.ckpt"), "--epochs", "4", "--no-progress"])
    assert code == 2  # 2 processes trained it; 1 would shard and batch differently


def test_feature_cache_is_computed_once_and_shared(tmp_path, tiny_backbone):
    data = write_image_folder(tmp_path / "data", classes=3, train=11, val=7)
    digests = tmp_path / "digests"
    digests.mkdir()
    done = torchrun(["-e", "resnet_frozen", "-b", "tiny", "--weights", "none", "--epochs", "2", "--batch-size", "4",
                     "--no-augment", "--workers", "0", "--no-progress", "--data", str(data), "--out",
                     str(tmp_path / "runs")], tmp_path, TL_TEST_DIGESTS=str(digests))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "feature cache: train + val (exact: no augmentation)" in done.stdout
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and val
    passes = [json.loads((digests / f"rank{r}.json").read_text())["feature_passes"] for r in (0, 1)]
    assert passes == [2, 0]  # process 0 computed both; process 1 loaded them
    run = _run_dir(tmp_path / "runs")
    best = json.loads((run / "config.json").read_text())["results"]["best_val_acc"]
    ctx = context_for(run / "best.pth", None)
    loader, classes = split_loader(data, "val", ctx)
    assert evaluate(load_model(run / "best.pth", ctx, len(classes)), loader, torch.device("cpu"),
                    len(classes))["acc"] == best
