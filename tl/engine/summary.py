"""The summary a run prints before it trains: output shapes, parameter counts, what trains."""

from __future__ import annotations

import torch
from torch import nn

from tl.models import parameter_table


def format_parameter_table(model: nn.Module, input_size: tuple[int, ...] | None = None) -> str:
    """The summary printed at the start of every run: per top-level module its output shape
    (for one `input_size` input), parameter count and whether it trains, with totals; then
    which parameter tensors train (documents 001 5-18/5-21 and 002 print these names).

    The table is torchinfo's `summary` (https://github.com/TylerYep/torchinfo), the
    maintained successor of the `torchsummary` that document 004 §2.2 uses: the same
    layout, run with one forward pass of a zero image through hooks. `mode="eval"` keeps
    that pass from touching BatchNorm's running statistics (a train-mode pass would move
    them, and the run would no longer equal one without the summary)."""
    from torchinfo import summary

    lines = []
    if input_size:
        was_training = model.training
        device = next(model.parameters()).device
        try:
            # a zero image of our own: torchinfo's default input is torch.rand, which would draw from
            # the run's random stream and shift every later draw (augmentation, initialisation)
            stats = summary(model, input_data=torch.zeros(input_size, device=device), depth=1, device=device,
                            mode="eval", verbose=0,
                            col_names=("output_size", "num_params", "trainable"), row_settings=("var_names",))
        finally:
            model.train(was_training)
        lines.append(str(stats))
    else:
        total = parameter_table(model)[-1]
        lines.append(f"Total params: {total['total']:,}\nTrainable params: {total['trainable']:,}\n"
                     f"Non-trainable params: {total['frozen']:,}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = sum(1 for _ in model.parameters())
    if len(names) == total:
        lines.append(f"trainable: all {total} parameter tensors")
    else:
        shown = ", ".join(names[:12]) + (f", ... and {len(names) - 12} more" if len(names) > 12 else "")
        lines.append(f"trainable ({len(names)} of {total} tensors): {shown}")
    return "\n".join(lines)
