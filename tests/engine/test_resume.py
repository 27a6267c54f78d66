"""tl/engine/resume.py: restore refuses a best.pth that is not the file config.json recorded, and a
checkpoint without a thread count resumes on this process's count and says so."""

from __future__ import annotations

import pytest
import torch

import tl.engine.run
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
