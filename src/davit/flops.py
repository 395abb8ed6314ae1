"""Parameter and multiply-accumulate counts, measured by PyTorch's FlopCounterMode (not a hand count)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_gmacs"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None,
                device: str | torch.device = "meta") -> float:
    """GMACs of one forward pass of one image (the paper's "GFLOPs" are MACs).

    Runs on the meta device by default, so even the 1.4B-parameter giant costs no memory or compute: build the
    model under ``torch.device("meta")`` and pass it in.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    c = in_chans if in_chans is not None else getattr(model, "in_chans", 3)
    x = torch.zeros(1, c, h, w, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9
