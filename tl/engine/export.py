"""A model you can ship: one self-describing file, checked against the PyTorch model.

A `best.pth` is only weights: to use it you also need the code that builds the
architecture, the class names, the image size and the normalisation, which this project
keeps in `config.json` beside it. An exported file carries all of that inside itself:

    onnx         the graph + weights in the ONNX format (any runtime: onnxruntime, TensorRT,
                 browsers, phones); the description goes into the model proto's
                 `metadata_props` (key "tl_meta"), the place ONNX keeps free-form
                 key/value pairs (https://onnx.ai/onnx/repo-docs/IR.html, "Metadata").
    torchscript  a traced TorchScript archive (`torch.jit.load` in C++ or Python, no model
                 code needed); the description rides in the archive as an extra file
                 (`_extra_files={"tl_meta.json": ...}`, the hook torch.jit.save offers for it).
                 PyTorch has deprecated TorchScript in favour of `torch.export`, which is why
                 ONNX is the default here; it is kept because many deployments still read it.

The description ("tl_meta") holds what `--predict` needs and nothing else: class names,
backbone, input size, the val transform's resize, mean and std, and whether the head is a
single logit. `load_exported` reads it back, so `--predict --checkpoint model.onnx` works
with no config.json anywhere, and checks it first (`check_description`): every field there,
of its type, and fitting the graph (one output per class, or one logit for 2 classes, and
images of `image_size`), so a description edited by hand is one message, never a traceback
or made-up class names.

Exporting is a translation, and translations can be wrong (an operator the exporter maps
differently, a shape fixed where it should vary), so every export is followed by
`parity_check`: the PyTorch model and the exported one classify the same val images, and
the largest difference in logits and the top-1 agreement are printed and stored next to
the file (`<file>.check.json`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from tl import TLError
from tl.data import val_resize
from tl.engine import schema
from tl.engine.evaluate import split_loader
from tl.engine.files import atomic_write, atomic_write_text
from tl.engine.model_loading import context_for, load_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
META_KEY = "tl_meta"  # ONNX metadata_props key; the TorchScript extra file is META_KEY + ".json"
FORMAT = "tl-reference export 1"
# what `describe` writes and --predict needs: tl/engine/schema.py DESCRIPTION ("exported_from" is only provenance)
# float32 logits computed by two runtimes differ by rounding: a few 1e-6 relative. A real
# translation error (a wrong operator, a fixed shape) is orders of magnitude larger.
TOLERANCE = 1e-4


def describe(ctx, classes: list[str], source: Path) -> dict:
    """The self-description an exported file carries (everything --predict needs)."""
    from tl.engine.backbones import backbone_spec

    spec = backbone_spec(ctx.backbone)
    return {"format": FORMAT, "classes": list(classes), "backbone": ctx.backbone,
            "image_size": ctx.image_size, "resize": val_resize(ctx.image_size), "mean": list(spec.mean),
            "std": list(spec.std), "single_logit": ctx.single_logit, "exported_from": str(source)}


def _export_onnx(model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> None:
    import onnx

    talk = io.StringIO()  # the exporter reports its steps (and, on failure, the whole graph) on stdout
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(talk), \
            contextlib.redirect_stderr(talk):
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        # dynamo=True is torch 2.14's default exporter (torch.export + onnxscript); the batch
        # dimension stays free, so the file takes any number of images. external_data=False
        # keeps the weights inside the one file (the 2 GB protobuf limit is far away here).
        torch.onnx.export(model, (example,), str(raw), dynamo=True, external_data=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
        proto = onnx.load(str(raw))
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))


class FixedSize(nn.Module):
    """A traced network behind a check of the image size, itself scripted so that the check is
    saved in the file. ONNX fixes the input's height and width in the graph; a trace records no
    such check, and a network that pools adaptively takes any size and answers for a picture it
    was not trained on. So an exported TorchScript model, too, refuses images of another size
    than its run trained at, in any program that loads it."""

    def __init__(self, net: nn.Module, image_size: int):
        super().__init__()
        self.net, self.image_size = net, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(2) != self.image_size or x.size(3) != self.image_size:
            raise RuntimeError("this model takes (B, 3, " + str(self.image_size) + ", " + str(self.image_size)
                               + ") images, the size its run trained at")
        return self.net(x)


def _export_torchscript(model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FutureWarning that TorchScript is deprecated (see above)
        # trace, not script: tracing records the operations one forward pass runs, which
        # works for any architecture here (timm's included) as long as the forward has no
        # data-dependent branches, and the parity check below would catch one that mattered
        traced = torch.jit.trace(model, example, check_trace=False)
        guarded = torch.jit.script(FixedSize(traced, meta["image_size"]))  # (the check is scripted, not traced)
        atomic_write(path, lambda f: torch.jit.save(guarded, f, _extra_files={META_KEY + ".json": json.dumps(meta)}))


class ExportedModel(nn.Module):
    """An exported file behind the nn.Module interface the rest of the project uses
    (`predict_images`, `classify`, the parity check): (B, 3, S, S) images in, (B, C) logits out,
    where S is the size its description records and its graph takes; other sizes are refused."""

    def __init__(self, path: Path, fmt: str, runner, image_size: int):
        super().__init__()
        self.path, self.format, self._run, self.image_size = path, fmt, runner, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise TLError(f"{self.path} takes {self.image_size}x{self.image_size} images, the size its run trained "
                          f"at, not {'x'.join(map(str, x.shape[2:]))}: resize them as its description says")
        return self._run(x.detach().float().cpu().contiguous())


def _description_problems(meta, outputs) -> list[str]:
    """What is wrong with an exported file's description, checked field by field and against
    the graph: `outputs(size)` gives the logits of one blank image of that size."""
    if not isinstance(meta, dict):
        return [f"it is a JSON {type(meta).__name__}, not an object"]
    if wrong := schema.problems(meta, schema.DESCRIPTION):  # each field of its type, within its bounds
        return wrong
    classes, size = meta["classes"], meta["image_size"]
    problems = [] if meta["format"] == FORMAT else [f"format is {meta['format']!r}, this code reads {FORMAT!r}"]
    if meta["resize"] != val_resize(size):
        problems.append(f"image_size {size} and resize {meta['resize']} do not fit: the val transform resizes to "
                        f"{val_resize(max(size, 1))} and crops {size} (tl/data.py val_resize)")
    if problems:
        return problems
    try:
        shape = tuple(outputs(size).shape)
    except Exception as exc:
        return [f"the model does not take {size}x{size} images ({type(exc).__name__})"]
    width = shape[-1] if len(shape) == 2 else None
    if meta["single_logit"] and (width != 1 or len(classes) != 2):
        problems.append(f"single_logit is true, which needs 1 output and 2 classes; the model has {width} "
                        f"output(s) and the description {len(classes)} classes")
    elif not meta["single_logit"] and width != len(classes):
        problems.append(f"it names {len(classes)} classes but the model has {width} output(s)"
                        + (" (a single-logit head: set single_logit true, with 2 classes)" if width == 1 else ""))
    return problems


def check_description(meta, path: Path, run) -> dict:
    """`meta` if it holds every field `--predict` needs, of the right type, and fits the
    graph (one output per class, or one logit for 2 classes); else a TLError naming them.
    A hand-edited description must not give made-up class names or a traceback."""
    problems = _description_problems(meta, lambda size: run(torch.zeros(1, 3, size, size)))
    if problems:  # one error: line each
        raise schema.SchemaError([f"{path}: its description ({META_KEY}) does not fit the model: {p}. Export the "
                                  f"run again (python main.py --export RUN) rather than editing it" for p in problems])
    return meta


def _read_description(text: str, path: Path):
    try:
        return schema.loads(text)
    except ValueError:
        raise TLError(f"{path}: its description ({META_KEY}) is not JSON: export the run again "
                      f"(python main.py --export RUN) rather than editing it") from None


def load_exported(path: str | os.PathLike) -> tuple[ExportedModel, dict]:
    """(model, description) of an exported file: `.onnx` runs in onnxruntime, `.pt` with
    `torch.jit.load`. No config.json and no model code are needed; the description is
    checked against the graph (`check_description`)."""
    path = Path(path)
    if not path.is_file():
        raise TLError(f"no such file: {path}")
    try:
        if path.suffix == ".onnx":
            import onnx
            import onnxruntime as ort

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            if META_KEY not in props:
                raise TLError(f"{path} is an ONNX model without this project's description ({META_KEY} in "
                              f"metadata_props): export it with python main.py --export RUN")
            meta = _read_description(props[META_KEY], path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name

            def run(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

            meta = check_description(meta, path, run)
            return ExportedModel(path, "onnx", run, meta["image_size"]), meta
        extra = {META_KEY + ".json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        if not extra[META_KEY + ".json"]:
            raise TLError(f"{path} is a TorchScript model without this project's description "
                          f"({META_KEY}.json): export it with python main.py --export RUN --format torchscript")
        meta = _read_description(extra[META_KEY + ".json"], path)

        def run_ts(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        meta = check_description(meta, path, run_ts)
        return ExportedModel(path, "torchscript", run_ts, meta["image_size"]), meta
    except TLError:
        raise
    except Exception as exc:  # not an ONNX/TorchScript file, or a damaged one
        kind = "an ONNX" if path.suffix == ".onnx" else "a TorchScript"
        raise TLError(f"{path} is not {kind} model this project exported "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


@torch.no_grad()
def parity_check(model: nn.Module, exported: nn.Module, loader) -> dict:
    """Both models on the same images: the largest |logit difference| and how often their
    top-1 classes agree. (Float rounding may differ; classes should not.)"""
    from tl.engine.progress import progress
    from tl.loop import predictions

    model.eval()
    worst, agree, n = 0.0, 0, 0
    for images, _labels in progress(loader, "checking the exported model", unit=" batches"):
        ours, theirs = model(images).float(), exported(images).float()
        worst = max(worst, (ours - theirs).abs().max().item())
        agree += int((predictions(ours) == predictions(theirs)).sum())
        n += len(images)
    return {"images": n, "max_abs_logit_diff": worst, "top1_agreement": agree / n if n else None,
            "tolerance": TOLERANCE, "ok": n > 0 and worst <= TOLERANCE and agree == n}


def export_run(run: Path, fmt: str = "onnx", data: str | None = None, out: Path | None = None,
               log=print) -> tuple[Path, dict]:
    """`main.py --export RUN [--format onnx|torchscript]`: RUN's best.pth as one
    self-describing file (default RUN/model.onnx or RUN/model.pt), checked on the run's val
    images. Returns (file, check figures)."""
    from tl.engine.prepare import resolve_data_dir

    if fmt not in FORMATS:
        raise TLError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    run = Path(run)
    weights = run / "best.pth" if run.is_dir() else run
    if not weights.is_file():
        raise TLError(f"{weights} not found: --export takes a run folder that holds best.pth (or the .pth file); "
                      f"a run writes best.pth after its first validated epoch")
    if not (weights.parent / "config.json").is_file():
        raise TLError(f"no config.json beside {weights}: the exported file needs the run's class names, backbone, "
                      f"image size and normalisation, which the run recorded there")
    ctx = context_for(weights, None)
    model = load_model(weights, ctx, len(ctx.classes)).cpu()
    meta = describe(ctx, ctx.classes, weights)
    target = Path(out) if out else weights.parent / f"model{FORMATS[fmt]}"
    example = torch.zeros(2, 3, ctx.image_size, ctx.image_size)  # batch 2: a batch of 1 may be specialised
    try:
        (_export_onnx if fmt == "onnx" else _export_torchscript)(model, example, meta, target)
    except (TLError, OSError):
        raise  # bad input, or the disk (full, not writable): the other format would not help
    except Exception as exc:
        if os.environ.get("TL_DEBUG"):
            raise
        other = "torchscript" if fmt == "onnx" else "onnx"
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).strip()).split("\n")[0]  # without terminal colours
        raise TLError(f"cannot export this {ctx.backbone} model to {fmt}: {type(exc).__name__}: {first}\n"
                      f"  try --format {other} (TL_DEBUG=1 shows the exporter's traceback)") from None
    log(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB, {fmt}, with classes, backbone, size, mean/std)")
    loader, _ = split_loader(resolve_data_dir(data or ctx.data), "val", ctx, log=log)
    exported, _ = load_exported(target)
    check = parity_check(model, exported, loader) | {"format": fmt, "file": target.name, "torch": torch.__version__}
    atomic_write_text(target.with_name(target.name + ".check.json"), json.dumps(check, indent=2) + "\n")
    log(f"check on {check['images']} val images: largest logit difference {check['max_abs_logit_diff']:.2e}, "
        f"top-1 agreement {check['top1_agreement']:.4f} -> {target.name}.check.json")
    if not check["ok"]:
        raise TLError(f"the exported {fmt} model does not match the PyTorch model (largest logit difference "
                      f"{check['max_abs_logit_diff']:.2e} > {TOLERANCE:g}, or a different class): do not ship "
                      f"{target}; the figures are in {target.name}.check.json")
    return target, check
