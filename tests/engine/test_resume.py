"""tl/engine/resume.py: restore refuses a best.pth that is not the file config.json recorded, a
checkpoint without a thread count resumes on this process's count and says so, and a refused
--epochs total comes with advice that works when followed."""

from __future__ import annotations

import pytest
import torch

import main
import tl.engine.run
import tl.engine.run_folder
from tests.conftest import TinyNet
from tests.helpers import seeded_tiny_net
from tl import TLError
from tl.engine import checkpoint, files, resume
from tl.engine.device import make_grad_scaler


def test_resume_refuses_a_best_pth_that_does_not_match_its_recorded_digest(tmp_path):
    best_model, later_model = seeded_tiny_net(1), seeded_tiny_net(2)
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
                                      torch.Generator(), ["a", "b"], "fp", num_epochs=5, data="d")

    files.atomic_save(best_state, tmp_path / "best.pth")  # the genuine best epoch's weights
    restored, start_epoch, _ = restore()
    assert start_epoch == 3 and restored.best_epoch == 1
    assert all(torch.equal(t, best_state[k]) for k, t in restored.best_state.items())
    # other valid weights in the same format (a copy from another run, a damaged disk that still loads)
    files.atomic_save(seeded_tiny_net(3).state_dict(), tmp_path / "best.pth")
    with pytest.raises(TLError, match="best.pth"):
        restore()


def test_an_old_checkpoint_without_a_thread_count_resumes_on_this_one(tmp_path, capsys):
    config = {"options": {}}
    torch.set_num_threads(1)
    lines = []
    resume.restore_threads(config, lines.append)
    assert torch.get_num_threads() == 1 and config["threads"] == 1 and "does not say how many" in lines[0]


# ----------------------------------------------------------------------------- the advice of a refused --epochs
def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main.main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def _interrupted_after(epoch: int):
    """RunFolder.end_of_epoch, interrupted (as Ctrl-C would) once `epoch` is saved."""
    end_of_epoch = tl.engine.run_folder.RunFolder.end_of_epoch

    def interrupting(self, at, history):
        stop = end_of_epoch(self, at, history)
        if at == epoch:
            raise KeyboardInterrupt
        return stop
    return interrupting


ADVICE = {  # recipe (its last stage's schedule), stopped after epoch (None: every epoch trained)
    "two_stage, killed in its second stage (one-cycle)": ("two_stage", 2),
    "modern_finetune, finished (warmup-cosine)": ("modern_finetune", None),
    "resnet_frozen, finished (constant rate)": ("resnet_frozen", None),
}


@pytest.mark.parametrize("recipe, killed_after", ADVICE.values(), ids=ADVICE.keys())
def test_a_refused_total_advises_what_the_run_can_take(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch,
                                                        recipe, killed_after):
    """--resume with --epochs below what the run trained, or above the total it started with, is
    refused (or, at a constant rate, trains on), and the advice, followed as printed, works: a
    stage with a learning-rate schedule laid it out for the run's total, so that run continues
    only to it (a larger total is refused, as the advice says); a constant rate takes a larger total."""
    total = 3
    with monkeypatch.context() as patch:
        if killed_after is not None:
            patch.setattr(tl.engine.run_folder.RunFolder, "end_of_epoch", _interrupted_after(killed_after))
        code, _ = _run(["-e", recipe, "-b", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
                        "--epochs", str(total), "--weights", "none", "--image-size", "32", "--batch-size", "6"], capsys)
    assert code == (0 if killed_after is None else 130)
    (run_dir,) = (tmp_path / "runs").iterdir()
    resume = ["--resume", str(run_dir / "last.ckpt")]
    trained = total if killed_after is None else killed_after
    for given in (trained - 1, total + 2):  # below what it trained; above the total it started with
        code, err = _run([*resume, "--epochs", str(given)], capsys)
        if code == 0:  # a constant rate takes a larger total
            assert given > total and "constant" in recipe_kind(run_dir), err
            return
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        if "start a new run with a larger --epochs" in err:
            code, err = _run([*resume, "--epochs", str(total + 2)], capsys)
            assert code == 2 and "schedule" in err, err
        elif "leave out --epochs" in err:
            assert _run(resume, capsys)[0] == 0
            return
        else:
            assert f"pass the new total, larger than {trained}" in err, err
            assert _run([*resume, "--epochs", str(trained + 1)], capsys)[0] == 0
            return


def recipe_kind(run_dir) -> str:
    """The schedule of the run's last stage, as config.json records it."""
    import json

    return json.loads((run_dir / "config.json").read_text())["stages"][-1]["schedule"]
