"""tl/engine/model_loading.py: the run context read from a config.json beside the weights,
a hand-edited count included."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_image_folder
from tl import TLError
from tl.engine.evaluate import split_loader
from tl.engine.model_loading import context_for


def test_a_hand_edited_train_per_class_string_is_still_a_count(tmp_path, tiny_backbone):
    """config.json edited by hand to "train_per_class": "3" is read as the count 3 (--evaluate
    --split train scores the run's draw of 3 per class); a string that is no count is refused."""
    data = write_image_folder(tmp_path / "d", train=6, val=2, size=16)
    config = {"recipe": {"backbone": "tiny"}, "classes": ["class_0", "class_1"],
              "options": {"image_size": 32, "train_per_class": "3", "max_per_class": "5"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ctx = context_for(tmp_path / "best.pth", None)
    assert (ctx.train_per_class, ctx.max_per_class) == (3, 5)
    loader, _ = split_loader(data, "train", ctx, log=lambda s: None)
    assert len(loader.dataset) == 6
    (tmp_path / "config.json").write_text(json.dumps(config | {"options": {"train_per_class": "three"}}))
    with pytest.raises(TLError, match="not a run config"):
        context_for(tmp_path / "best.pth", None)
