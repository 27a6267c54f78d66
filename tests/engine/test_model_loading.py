"""tl/engine/model_loading.py: the run context read from a config.json beside the weights,
a hand-edited count included."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_image_folder
from tl import TLError
from tl.engine.evaluate import split_loader
from tl.engine.model_loading import context_for


def test_a_hand_edited_count_is_a_count_and_a_string_is_refused(tmp_path, tiny_backbone):
    """config.json edited by hand to "train_per_class": 3 is read as the count 3 (--evaluate
    --split train scores the run's draw of 3 per class); a string where a count belongs ("3" as
    much as "three") is refused (tl/engine/schema.py)."""
    data = write_image_folder(tmp_path / "d", train=6, val=2, size=16)
    config = {"recipe": {"backbone": "tiny"}, "classes": ["class_0", "class_1"],
              "options": {"image_size": 32, "train_per_class": 3, "max_per_class": 5}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ctx = context_for(tmp_path / "best.pth", None)
    assert (ctx.train_per_class, ctx.max_per_class) == (3, 5)
    loader, _ = split_loader(data, "train", ctx, log=lambda s: None)
    assert len(loader.dataset) == 6
    for text in ("3", "three"):
        (tmp_path / "config.json").write_text(json.dumps(config | {"options": {"train_per_class": text}}))
        with pytest.raises(TLError, match=f'not a run config.*options.train_per_class is str "{text}"'):
            context_for(tmp_path / "best.pth", None)
