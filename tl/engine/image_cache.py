"""`--image-cache` / `--device-images`: every image decoded once, kept as uint8 tensors."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from tl.engine.images import CheckedImageFolder, read_image


class DecodedImages(torch.utils.data.Dataset):
    """Every image of `folder` decoded once and resized (shorter side `resize`), kept as
    uint8 tensors (3, H, W), so epochs after the first do no JPEG decoding.

    The folder's own transform still runs on each access: the random crop and flip of the
    train phase stay random. The val pipeline's `Resize(resize)` then has nothing left to
    do, so val tensors are the same as without the cache; train crops are cut from the
    resized image instead of the full-size photo, a small difference in sharpness.

    `device` (`--device-images`): keep the tensors on the training device instead, so the
    crop, flip and normalisation run there too and the loop's `inputs.to(device)` has
    nothing left to copy. Why: a GPU trains a batch faster than CPU workers can decode and
    augment its JPEGs (results/benchmark_cuda.md measured the loop at 22-53% of its compute
    bound with 8 workers); decoded once, the images cost the GPU a few small kernels each.
    torchvision's v2 transforms run on CUDA tensors unchanged, and they draw their random
    crop and flip from torch's global CPU generator whatever the tensor's device, so the
    crops are the ones `--image-cache --workers 0` draws, and a checkpoint restores them.
    The transform runs in the loader's own process (CUDA tensors do not go to worker
    processes), one image at a time: every image gets its own crop, as on the CPU.
    """

    def __init__(self, folder: CheckedImageFolder, resize: int, device: torch.device | str | None = None):
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes
        self.transform, self.root, self.skipped = folder.transform, folder.root, folder.skipped
        shrink = v2.Resize(resize, antialias=True)  # on the CPU, as the cache without `device`
        self.images = [shrink(v2.functional.pil_to_tensor(read_image(path))).to(device or "cpu")
                       for path, _ in folder.samples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.targets[i]


def decoded_bytes(folder: CheckedImageFolder, resize: int) -> int:
    """The bytes `DecodedImages(folder, resize)` will hold, read from the image headers alone."""
    needed = 0
    for path, _ in folder.samples:
        with Image.open(path) as img:  # the header gives the size without decoding
            w, h = img.size
        needed += 3 * resize * round(resize * max(w, h) / min(w, h))
    return needed


def decoded_images(folder: CheckedImageFolder, resize: int, limit_gb: float, log=print,
                   device: torch.device | str | None = None):
    """`DecodedImages(folder, resize, device)` if its tensors fit in `limit_gb`, else `folder`
    unchanged (`--device-images` runs are refused before that, in `tl.engine.run.run`)."""
    needed = decoded_bytes(folder, resize)
    if needed > limit_gb * 2**30:
        log(f"image cache for {folder.root} would need {needed / 2**30:.2f} GB > {limit_gb} GB: decoding per epoch")
        return folder
    decoded = DecodedImages(folder, resize, device)
    if device is not None:
        log(f"image cache for {folder.root}: {len(decoded)} images, {needed / 2**30:.2f} GB on {device}")
    return decoded
