"""What changes when a pretrained network is fine-tuned? Look at the same val photos twice.

    python -m experiments.look --frozen runs/<resnet_frozen run> --finetuned runs/<resnet_finetune run>

takes a run that kept the ImageNet backbone frozen (only the new head trained) and a run
that fine-tuned it, on the same data, backbone and image size, and writes to `--out`
(default `results/looking/`):

    cams.png         the same val photos, then each model's Grad-CAM for its predicted class
                     (tl/engine/explain.py): where the evidence for that class lies
    features.png     the val images' features (the input of the final Linear) projected onto
                     their two principal components, from the ImageNet backbone (the frozen
                     run's body, unchanged by training) and from the fine-tuned one, coloured
                     by true class
    README.md        the page: both figures, the runs and the command that made them

What to look for: a frozen ImageNet body looks where ImageNet classes were told apart,
which for ants and bees is often the right place but sometimes the flower or the leaf
beside it; fine-tuning can move the evidence onto the insect. In feature space, fine-tuning
pulls the classes apart along the first component, because the head's loss rewards
exactly that separation. Whether this happens on your runs is for the figures to say:
this page states no numbers it did not compute.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tl.engine import folders
from tl.engine.command import say_error
from tl.engine.tables import page_code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.look", description=__doc__.split("\n\n")[0])
    p.add_argument("--frozen", type=Path, required=True, help="run folder (or its best.pth) of a frozen-body recipe")
    p.add_argument("--finetuned", type=Path, required=True, help="run folder (or its best.pth) of a fine-tuned recipe")
    p.add_argument("--data", help="data folder (default: the fine-tuned run's)")
    p.add_argument("--images", type=int, default=8, help="val photos in cams.png (default 8, spread over classes)")
    p.add_argument("--out", type=Path, default=Path("results/looking"), help="default results/looking/")
    return p.parse_args(argv)


def _load(run: Path):
    """(model, context, config) of a run folder or weight file; best.pth in a folder."""
    from tl import TLError
    from tl.engine.model_loading import context_for, load_model

    weights = run / "best.pth" if run.is_dir() else run
    if not weights.is_file():
        raise TLError(f"{weights} not found: pass a run folder that holds best.pth")
    ctx = context_for(weights, None)
    config = json.loads((weights.parent / "config.json").read_text())
    return load_model(weights, ctx, len(ctx.classes)), ctx, config, weights


def look(frozen: Path, finetuned: Path, out: Path, data: str | None = None, images: int = 8,
         command: str = "", log=print) -> list[Path]:
    import torch

    from tl import TLError
    from tl.engine.backbones import backbone_spec
    from tl.engine.evaluate import split_loader
    from tl.engine.explain import class_activation_maps, head_features, pca_2d
    from tl.engine.plots import cam_figure, projection_plot
    from tl.engine.prepare import resolve_data_dir

    frozen_model, frozen_ctx, frozen_cfg, frozen_file = _load(frozen)
    tuned_model, tuned_ctx, tuned_cfg, tuned_file = _load(finetuned)
    for what in ("backbone", "classes", "image_size"):
        if getattr(frozen_ctx, what) != getattr(tuned_ctx, what):
            raise TLError(f"the two runs differ in {what} ({getattr(frozen_ctx, what)} and {getattr(tuned_ctx, what)}):"
                          f" compare runs of the same backbone, classes and image size")
    groups = [g["name"] for g in frozen_cfg.get("param_groups", [])]
    if groups != ["head"]:
        log(f"note: {frozen_file.parent.name} trained {groups}, not only the head: its body is not the "
            f"ImageNet backbone, and the page says so")
    spec, classes = backbone_spec(tuned_ctx.backbone), tuned_ctx.classes
    loader, _ = split_loader(resolve_data_dir(data or tuned_ctx.data), "val", tuned_ctx, log=log)
    val = loader.dataset
    picks = [round(i * (len(val) - 1) / max(1, images - 1)) for i in range(min(images, len(val)))]
    x = torch.stack([val[i][0] for i in picks])
    labels = [val.targets[i] for i in picks]

    rows = []
    for name, model in (("pretrained, frozen", frozen_model), ("fine-tuned", tuned_model)):
        maps, predicted, probs = class_activation_maps(model, x)
        rows.append((name, maps, [f"{classes[p]} {q:.2f}" + ("" if p == t else " (wrong)")
                                  for p, q, t in zip(predicted.tolist(), probs.tolist(), labels)]))
    folders.make(out)
    written = [cam_figure(x, rows, out / "cams.png", mean=spec.mean, std=spec.std,
                          photo_titles=[f"true: {classes[t]}" for t in labels],
                          title="Grad-CAM for each model's predicted class (title: prediction and its probability)")]

    panels = []
    for name, model in (("ImageNet backbone (the frozen run's body)", frozen_model),
                        ("fine-tuned backbone", tuned_model)):
        coords, explained = pca_2d(head_features(model, spec, val))
        panels.append((name, coords, explained))
    written.append(projection_plot(panels, list(val.targets), classes, out / "features.png",
                                   title=f"{len(val)} val images in feature space (PCA of the head's input)"))

    rel = [Path(p).name for p, _ in (val.samples[i] for i in picks)]
    page = [
        "# Learn by looking: a frozen and a fine-tuned backbone on the same photos", "",
        f"Made by {page_code(command)} ({time.strftime('%Y-%m-%d %H:%M')}) from "
        f"{page_code(frozen_file)} ({frozen_cfg['experiment']}) and {page_code(tuned_file)} "
        f"({tuned_cfg['experiment']}), backbone {tuned_ctx.backbone}, {tuned_ctx.image_size}-pixel images, "
        f"val of {page_code(data or tuned_ctx.data)}.", "",
        "## Where each model looks", "",
        "The first row is the photo; below it, each model's Grad-CAM for the class it predicts (red: where the "
        "evidence for that class lies; tl/engine/explain.py has the method). Photos: " + ", ".join(rel) + ".", "",
        "![Grad-CAM of both models](cams.png)", "",
        "## How each backbone arranges the val images", "",
        "Each point is a val image: the vector the head sees, projected onto its two principal components "
        "(the axis labels give the share of variance each explains), coloured by true class. The left panel is "
        "the ImageNet backbone" + (" (the frozen run trained only its head, so its body is ImageNet's)"
                                   if groups == ["head"] else f" as the frozen run left it (it trained {groups})")
        + "; the right panel is the fine-tuned one.", "",
        "![PCA of the features](features.png)", "",
    ]
    from tl.engine.files import atomic_write_text

    written.append(atomic_write_text(out / "README.md", "\n".join(page)))
    for path in written:
        log(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tl import TLError
    from tl.engine.files import updating

    command = "python -m experiments.look " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        with updating(args.out, command):  # one process at a time; the pictures and the page together
            look(args.frozen, args.finetuned, args.out, args.data, args.images, command)
    except (TLError, OSError) as exc:
        say_error(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
