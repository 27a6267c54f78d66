"""Learn by looking: where the network looks, what it gets wrong, how it arranges images.

Three views of a trained model, each a short function (the pictures are drawn by tl/engine/plots.py):

* `class_activation_maps`: Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from
  Deep Networks via Gradient-based Localization", ICCV 2017, arXiv:1610.02391). Take the
  last layer that still has a spatial map (ResNet's `layer4`, EfficientNet's `bn2`, VGG's
  `features`): its K channels are K detectors, each firing at some places of the photo.
  The gradient of the class score with respect to each channel, averaged over the map,
  says how much that detector counts *for this class*; the weighted sum of the channels,
  through a ReLU (only evidence *for* the class), is a coarse map of where the evidence
  lies, upsampled to the photo's size. We use captum's `LayerGradCam`
  (https://captum.ai/api/layer.html#gradcam): captum is PyTorch's own interpretability
  library (pytorch/captum), it needs nothing beyond torch and numpy, and its siblings
  (Integrated Gradients, Occlusion, ...) share the same `attribute` call, so a reader
  can swap the method in one line. (jacobgil's `grad-cam` package is as good at CAMs but
  pulls OpenCV and scikit-learn in for the same result.)
* `top_losses`: the val images the model got most confidently wrong (fastai's
  `plot_top_losses`): where a model fails with confidence is where its data or its
  labels are worth a look.
* `head_features` + `pca_2d`: the vector the head sees (the input of the final Linear)
  for every val image, projected onto its two principal components. A frozen ImageNet
  backbone already separates many classes; fine-tuning pulls them further apart.
"""

from __future__ import annotations

import torch
from torch import nn

from tl.models import Backbone, StackedHead


def cam_layer(model: nn.Module, image_size: int = 224) -> tuple[str, nn.Module]:
    """(name, module) of the last module whose output still has a spatial map (B, C, H, W)
    with H, W > 1: the deepest layer where "where" is still known. Found by one forward
    pass with hooks, so it works for any architecture without a per-backbone table.

    A container's hook fires after its children's, so the outermost block ending there is
    chosen (ResNet: `layer4`, VGG: `features` or the identity-sized `avgpool`)."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, mod))
                                     if isinstance(o, torch.Tensor) and o.dim() == 4 and min(o.shape[2:]) > 1
                                     else None)
             for name, m in model.named_modules() if name]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not order:
        raise ValueError("the model has no layer with a spatial output map: no class-activation map is possible")
    return order[-1]


class _TwoLogits(nn.Module):
    """A single-logit model (004 §3's BCE head) as two logits (-z/2, z/2): their softmax is
    (1 - sigmoid(z), sigmoid(z)), so "the score of class k" means the same for every head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return torch.cat([-out / 2, out / 2], dim=1) if out.shape[1] == 1 else out


def class_activation_maps(model: nn.Module, images: torch.Tensor, target: torch.Tensor | list[int] | None = None,
                          layer: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM of each image for its `target` class (default: the predicted class).

    images: (B, 3, H, W), normalised as the model expects. Returns (maps, predicted,
    probabilities): maps (B, H, W) in [0, 1], the photo's own size (bilinear upsampling of
    the coarse map); predicted (B,) classes; probabilities (B,) of the class each map explains.
    A map is all zeros only where no channel carries positive evidence for the class."""
    from captum.attr import LayerAttribution, LayerGradCam

    was_training = model.training
    model.eval()
    net = _TwoLogits(model)
    layer = layer if layer is not None else cam_layer(model, images.shape[-1])[1]
    try:
        with torch.no_grad():
            probs = net(images).float().softmax(1)  # (B, C)
        predicted = probs.argmax(1)
        target = predicted if target is None else torch.as_tensor(target)
        # (B, 1, h, w): ReLU of the gradient-weighted sum of the layer's channels
        coarse = LayerGradCam(net, layer).attribute(images, target=target.tolist(), relu_attributions=True)
        maps = LayerAttribution.interpolate(coarse.detach().float(), tuple(images.shape[-2:]), "bilinear")[:, 0]
    finally:
        model.train(was_training)
    peak = maps.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    return (maps.clamp(min=0) / peak).cpu(), predicted.cpu(), probs.gather(1, target.view(-1, 1))[:, 0].cpu()


def mirrored_activation_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM under test-time augmentation (`--tta`): the class is the one the averaged
    probabilities of the photo and its mirror predict (tl/engine/tta.Mirrored), and the
    map is the mean of the photo's map and the mirror's map flipped back, so it shows where
    the evidence lies for the answer the two views give together. Same returns as
    `class_activation_maps`; the probability is the averaged one."""
    from tl.engine.tta import Mirrored

    was_training = model.training
    with torch.no_grad():
        probs = _TwoLogits(Mirrored(model).eval())(images).float().softmax(1)
    model.train(was_training)
    predicted = probs.argmax(1)
    layer = cam_layer(model, images.shape[-1])[1]  # found once, for both views
    photo, _, _ = class_activation_maps(model, images, predicted, layer)
    mirror, _, _ = class_activation_maps(model, torch.flip(images, dims=[3]), predicted, layer)
    maps = (photo + torch.flip(mirror, dims=[2])) / 2
    peak = maps.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    return maps / peak, predicted.cpu(), probs.gather(1, predicted.view(-1, 1))[:, 0].cpu()


def top_losses(probabilities: torch.Tensor, labels: list[int] | torch.Tensor, k: int = 16) -> list[dict]:
    """The `k` misclassified images with the most confident wrong answer, most confident first.

    probabilities: (N, C) per image (tl.engine.evaluate.evaluate's "probabilities"). Each row:
    index, predicted, true, probability of the prediction, and the loss -log p(true class),
    which is largest exactly for the confident mistakes (fastai sorts by this loss)."""
    labels = torch.as_tensor(labels)
    p_pred, predicted = probabilities.max(1)
    loss = -probabilities.gather(1, labels.view(-1, 1))[:, 0].clamp(min=1e-12).log()
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[loss[wrong].argsort(descending=True)][:k]
    return [{"index": int(i), "predicted": int(predicted[i]), "true": int(labels[i]),
             "probability": float(p_pred[i]), "loss": float(loss[i])} for i in order]


def head_module(model: nn.Module, spec: Backbone) -> str:
    """Dotted name of the final Linear the features feed (the stacked `dense` for 004 §3)."""
    return "dense" if isinstance(model, StackedHead) else spec.head


def head_features(model: nn.Module, spec: Backbone, dataset, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, D): what the head sees for each image of `dataset`, in order (the feature cache's
    own pass, stopped at the head by `tl.features.forward_to`)."""
    from tl.engine.feature_store import FeaturePass, compute_features

    return compute_features(model, head_module(model, spec), dataset, FeaturePass(device=device))[0]


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (N, D) features onto their first two principal components.

    Centre the features, take the SVD X = U S V^T; the rows of V^T are the directions of
    largest variance, and X V[:, :2] are the coordinates. Returns (coords (N, 2), fraction
    of the total variance each of the two components explains)."""
    x = features.double() - features.double().mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    variance = s**2
    explained = variance[:2] / variance.sum().clamp(min=1e-12)
    coords = x @ vt[:2].T
    # an SVD's sign is arbitrary: fix it so the largest coordinate on each axis is positive
    coords = coords * torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    return coords.float(), explained.float()
