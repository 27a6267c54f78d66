"""`python main.py --explain IMAGE... --checkpoint RUN/best.pth`: one class-activation map per
photo, and with --tta the map of the averaged (photo and mirror) answer, for a softmax head and
a one-logit head."""

from __future__ import annotations

import torch

import main
from tests.helpers import train_three_epochs
from tl.engine.explain import class_activation_maps


def test_explain_command_writes_a_map_per_photo(quick_run, tiny_data, capsys):
    photo = next((tiny_data / "val" / "class_1").iterdir())
    assert main.main(["--explain", str(photo), "--checkpoint", str(quick_run / "best.pth")]) == 0
    assert (quick_run / "explain" / f"{photo.stem}-cam.png").is_file()
    assert "predicted class_" in capsys.readouterr().out
    assert main.main(["--explain", str(photo)]) == 2
    assert "--explain needs --checkpoint" in capsys.readouterr().err


def test_explain_with_tta_explains_the_averaged_answer(quick_run, tiny_data, capsys):
    from tl.engine.explain import mirrored_activation_maps
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.tta import Mirrored

    model = load_model(quick_run / "best.pth", context_for(quick_run / "best.pth", None), 2)
    x = torch.randn(2, 3, 32, 32)
    maps, predicted, probs = mirrored_activation_maps(model, x)
    with torch.no_grad():
        averaged = Mirrored(model).eval()(x).softmax(1)
    assert predicted.tolist() == averaged.argmax(1).tolist()
    assert torch.allclose(probs, averaged.max(1).values, atol=1e-6)
    # the two views together: the mirror's map of the mirrored photo is the photo's map mirrored
    flipped, _, _ = mirrored_activation_maps(model, torch.flip(x, dims=[3]))
    assert torch.allclose(flipped, torch.flip(maps, dims=[2]), atol=1e-5)
    photo = next((tiny_data / "val" / "class_1").iterdir())
    assert main.main(["--explain", str(photo), "--checkpoint", str(quick_run / "best.pth"), "--tta"]) == 0
    assert "test-time augmentation" in capsys.readouterr().out


def test_explain_with_tta_of_a_one_logit_model(tiny_data, tiny_backbone, tmp_path, capsys):
    """vgg_stacked's single logit (BCE): the averaged answer is the mirrored sigmoid's, and its
    probability is that of the class predicted, whichever of the two it is."""
    from tl.engine.explain import mirrored_activation_maps
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.tta import Mirrored

    run_dir = train_three_epochs(tiny_data, tmp_path / "runs", "tiny", "vgg_stacked", "--weights", "none")
    model = load_model(run_dir / "best.pth", context_for(run_dir / "best.pth", None), 2)
    x = torch.randn(3, 3, 32, 32)
    maps, predicted, probs = mirrored_activation_maps(model, x)
    with torch.no_grad():
        p1 = torch.sigmoid(Mirrored(model).eval()(x)[:, 0])  # P(class 1) of the two views averaged
    assert predicted.tolist() == (p1 > 0.5).long().tolist()
    assert torch.allclose(probs, torch.where(predicted == 1, p1, 1 - p1), atol=1e-6)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all() and maps.max() <= 1
    flipped, _, _ = mirrored_activation_maps(model, torch.flip(x, dims=[3]))
    assert torch.allclose(flipped, torch.flip(maps, dims=[2]), atol=1e-5)
    _, single, _ = class_activation_maps(model, x)  # the one-view path takes the single logit too
    with torch.no_grad():
        assert single.tolist() == (model(x)[:, 0] > 0).long().tolist()
    photo = next((tiny_data / "val" / "class_1").iterdir())
    assert main.main(["--explain", str(photo), "--checkpoint", str(run_dir / "best.pth"), "--tta"]) == 0
    assert "predicted class_" in capsys.readouterr().out
