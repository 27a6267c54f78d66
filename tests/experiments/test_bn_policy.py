"""experiments/bn_policy.py: the drift statistic is zero exactly when no statistic moved, and the
docs section says what the CSV says (its verdicts follow the numbers, none are typed in)."""

from __future__ import annotations

import pandas as pd
import torch

from experiments import bn_policy
from tests.conftest import TinyNet


def test_drift_is_zero_for_untouched_statistics_and_grows_with_the_shift():
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert bn_policy.drift(before, net.state_dict()) == {"bn_mean_shift": 0.0, "bn_var_change": 0.0}
    net.stem[1].running_mean += 0.5  # half a standard deviation (var is 1) in one of two layers
    net.block[1].running_var *= 2
    moved = bn_policy.drift(before, net.state_dict())
    assert abs(moved["bn_mean_shift"] - 0.25) < 1e-5
    assert abs(moved["bn_var_change"] - torch.log(torch.tensor(2.0)).item() / 2) < 1e-9


def _rows(eval_acc: float, train_acc: float, std: float) -> pd.DataFrame:
    rows = []
    for policy, acc in (("frozen_bn_eval", eval_acc), ("frozen_bn_train", train_acc)):
        for seed, noise in enumerate((-std, 0.0, std)):
            rows.append({"dataset": "d", "policy": policy, "backbone": "b", "seed": seed, "train_epochs": 3,
                         "batch_size": 16, "headline": "val, final epoch", "headline_acc": acc + noise,
                         "final_val_acc": acc, "best_val_acc": acc, "headline_images": 100,
                         "bn_mean_shift": 0.0 if policy.endswith("eval") else 0.2, "bn_var_change": 0.0,
                         "train_seconds": 1.0, "quick": False, "run": "r"})
    return pd.DataFrame(rows)


def test_the_section_follows_the_numbers(tmp_path):
    clear = bn_policy.section(_rows(0.90, 0.80, 0.01))  # 10 points apart, seeds 1 point: beyond the noise
    assert "+10.0 points (beyond the noise)" in clear and "use frozen_bn_eval" in clear
    close = bn_policy.section(_rows(0.80, 0.805, 0.02))  # half a point apart, seeds 2 points: noise
    assert "(within the noise)" in close and "prefer frozen_bn_eval" in close
    doc = tmp_path / "RECIPES.md"
    doc.write_text("# Recipes\n\nkept text\n")
    csv = tmp_path / "bn.csv"
    _rows(0.90, 0.80, 0.01).to_csv(csv, index=False)
    bn_policy.write_section(csv, doc)
    _rows(0.80, 0.805, 0.02).to_csv(csv, index=False)
    bn_policy.write_section(csv, doc)  # rewritten in place, not appended twice
    text = doc.read_text()
    assert text.count(bn_policy.START) == 1 and "kept text" in text and "within the noise" in text
