"""`--image-cache` / `--device-images`: every image decoded once, kept as uint8 tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import v2

from tl.engine.images import CheckedImageFolder, read_image
from tl.engine.progress import progress


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
    augment its JPEGs (on an H200, results/benchmark_cuda.md: the fine-tune loop at 58% of its
    compute bound with 8 JPEG workers, 80% with the images on the GPU); decoded once, the images
    cost the GPU a few small kernels per batch.
    torchvision's v2 transforms run on CUDA tensors unchanged, and they draw their random
    crop and flip from torch's global CPU generator whatever the tensor's device, so the
    crops are the ones `--image-cache --workers 0` draws, and a checkpoint restores them.
    The transform runs in the loader's own process (CUDA tensors do not go to worker
    processes). The train pipeline of `tl.data.build_transforms` runs a whole batch at once
    (`collate`, a `BatchedCrops`): the same boxes and flips, one crop-and-resize for the batch;
    any other pipeline (TrivialAugment's, say) runs one image at a time, exactly as on the CPU.
    """

    def __init__(self, folder: CheckedImageFolder, resize: int, device: torch.device | str | None = None):
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes
        self.transform, self.root, self.skipped = folder.transform, folder.root, folder.skipped
        shrink = v2.Resize(resize, antialias=True)  # on the CPU, as the cache without `device`
        self.images = [shrink(v2.functional.pil_to_tensor(read_image(path))).to(device or "cpu")
                       for path, _ in progress(folder.samples, f"decoding {folder.root}", unit=" images")]
        # --device-images: the loader's collate_fn augments the whole batch; items stay untransformed
        self.collate = BatchedCrops.of(self.transform) if device is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (self.images[i] if self.collate else self.transform(self.images[i])), self.targets[i]


class BatchedCrops:
    """The train pipeline RandomResizedCrop + flip + scale + normalise, for a whole batch.

    `draw` takes each image's crop box and flip from torch's global generator with the
    transforms' own code, in the order the per-image pipeline draws them (image 1's box, its
    flip, image 2's box, ...), so the boxes and flips, and the generator's state after the
    batch, are the per-image path's (tests/test_busy_gpu.py). `apply` then crops and resizes
    the batch in one `roi_align` (bilinear samples averaged over each output pixel's footprint)
    and flips it with a mask: a few kernels per batch instead of several per image. Its pixels
    differ from torchvision's antialiased resize by interpolation alone (docs/GUIDE.md gives the
    measured difference)."""

    def __init__(self, crop: v2.RandomResizedCrop, flip: v2.RandomHorizontalFlip, normalize: v2.Normalize):
        self.crop, self.flip, self.mean, self.std = crop, flip, normalize.mean, normalize.std
        self.mean_std_on = {}  # device -> (mean, std) as (1, 3, 1, 1) tensors there, made once

    @classmethod
    def of(cls, transform) -> BatchedCrops | None:
        """For `build_transforms`' standard/tutorial train pipeline; None for any other, which
        then runs per image (TrivialAugmentWide draws its own random numbers per image)."""
        steps = list(getattr(transform, "transforms", []))
        kinds = [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
        if [type(t) for t in steps] != kinds:
            return None
        crop, flip, to_float, normalize = steps[1:]
        bilinear = v2.InterpolationMode(crop.interpolation) == v2.InterpolationMode.BILINEAR
        if not bilinear or to_float.dtype != torch.float32 or not to_float.scale:
            return None
        return cls(crop, flip, normalize)

    def draw(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4) boxes (top, left, height, width) and (B,) flips, drawn as the per-image pipeline draws."""
        boxes, flips = [], []
        for image in images:
            box = self.crop.make_params([image])  # RandomResizedCrop's own draw
            boxes.append((box["top"], box["left"], box["height"], box["width"]))
            flips.append(bool(torch.rand(1) < self.flip.p))  # RandomHorizontalFlip: flips unless rand >= p
        return torch.tensor(boxes), torch.tensor(flips)

    def apply(self, images, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop `boxes` out of the uint8 `images`, resize to the crop size, flip, scale and normalise."""
        device, (height, width) = images[0].device, self.crop.size
        tall, wide = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        # one (B, 3, tall, wide) canvas; edge-replicated padding: a box's border samples see the image's edge
        canvas = torch.stack([F.pad(i[None].float(), (0, wide - i.shape[-1], 0, tall - i.shape[-2]),
                                    mode="replicate")[0] for i in images])
        top, left, h, w, flip = to_device_queued(torch.cat([boxes, flips[:, None]], 1).float(), device).unbind(1)
        rois = torch.stack([torch.arange(len(images), device=device, dtype=torch.float32), left, top,
                            left + w, top + h], 1)  # (batch index, x1, y1, x2, y2)
        out = roi_align(canvas, rois, (height, width), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out = out.round_().clamp_(0, 255)  # the uint8 values the per-image resize gives
        out = torch.where(flip.bool()[:, None, None, None], out.flip(-1), out)
        if device not in self.mean_std_on:  # (v2's normalize makes them from lists at every call: a waiting copy)
            self.mean_std_on[device] = [to_device_queued(torch.tensor(v).view(1, 3, 1, 1), device)
                                        for v in (self.mean, self.std)]
        mean, std = self.mean_std_on[device]
        return (out / 255 - mean) / std  # v2.Normalize's arithmetic

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The DataLoader's collate_fn: (image, label) pairs -> (inputs, labels), augmented."""
        images, labels = zip(*batch)
        boxes, flips = self.draw(images)
        return self.apply(images, boxes, flips), to_device_queued(torch.tensor(labels), images[0].device)


def to_device_queued(small: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`small` (a CPU tensor) copied to `device` without waiting for the GPU. A plain
    `.to("cuda")` from ordinary memory first waits for every kernel already queued (the last
    step's backward) to finish, so the GPU idles while Python prepares the next batch; from
    page-locked (pinned) memory the copy is queued behind those kernels like one more."""
    if device.type == "cuda":
        small = small.pin_memory()
    return small.to(device, non_blocking=True)


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
