"""The device a run trains on, and the mixed-precision settings that go with it."""

from __future__ import annotations

import torch

from tl import TLError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks the GPU when there is one; an unavailable device is a clear error.

    Only devices that compute and that this machine has are accepted: torch.device("meta")
    or "mps" on Linux parse fine and fail later, deep inside the first forward pass."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "use auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TLError(f"unknown device {name!r}; {choices}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TLError(f"--device {name}: no CUDA GPU is visible to PyTorch on this machine; {choices}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TLError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"numbered from 0; {choices}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise TLError(f"--device {name}: Apple's Metal (MPS) backend is not available here; {choices}")
    elif device.type != "cpu":
        raise TLError(f"--device {name}: {device.type!r} is not a device this project trains on; {choices}")
    return device


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype `--amp` trains in on this device: None (float32) except on CUDA, where bf16
    (float32's exponent range, so no loss scaling is needed) or else fp16."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_grad_scaler(device: torch.device | str, amp: bool) -> torch.amp.GradScaler:
    """The loss scaler fp16 autocast needs (disabled, a no-op, everywhere else). Its scale
    adapts during training, so a checkpoint saves it and a resumed run restores it."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(torch.device(device), amp) == torch.float16)


def prepare_device(device: torch.device) -> None:
    """What a run sets once for its device before it trains: on CUDA, fixed input sizes let
    cuDNN time its algorithms once and keep the fastest (002 §1.4)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_hooks(device: torch.device, amp: bool = True, channels_last: bool | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> dict:
    """The loop's settings (fields of `tl.loop.Hooks`) that the device decides, as a run has
    them: the autocast dtype of `--amp`, the memory layout (None: the one measured faster
    here), loss sums kept on a GPU and read once per phase (no host sync per step), and the
    loss scaler where fp16 needs one. `tl.engine.run` trains with these, and the benchmark's
    compute bound (benchmarks/bench.py) too, so the bound measures the loop a run has."""
    return dict(autocast_dtype=autocast_dtype(device, amp),
                channels_last=default_channels_last(device) if channels_last is None else channels_last,
                device_sums=device.type == "cuda",  # no host sync per step (tl/loop.py run_phase)
                scaler=scaler if scaler is not None and scaler.is_enabled() else None)


def default_channels_last(device: torch.device) -> bool:
    """`--channels-last` left out: the layout measured faster on this kind of device. On the
    2-core CPU, NHWC won for every backbone of results/benchmark.md (efficientnet_lite0 finetune:
    27.2 vs 18.7 img/s, compute bound); on CUDA the contiguous layout won for efficientnet_lite0
    fine-tune on an H200 (results/benchmark_cuda.md, bounds: 597.5 img/s off vs 394.9 on, repeats
    585-610 vs 382-408; BatchNorm-only 1903.2 vs 1667.0 overlaps, 1608-2198 vs 1531-1803) and on an
    H100 (385.6 vs 326.0, commit 1585a0e's message). Other devices: off."""
    return device.type == "cpu"
