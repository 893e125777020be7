"""Dropout masks as the sub-layer ops draw them, in Python exactly as in C++ (``csrc/blocks.cpp``):
the same ``bernoulli_`` calls on tensors of the same shapes and dtypes, in the same order, so every
backend drops the same units from the same seed."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def keep_scale(dropout_p: float) -> float:
    """What ``nn.Dropout(p)`` multiplies kept units by (with p == 1 nothing is kept)."""
    return 0.0 if dropout_p == 1.0 else 1.0 / (1.0 - dropout_p)


def draw_keep(like: torch.Tensor, shape: Sequence[int], dropout_p: float, train: bool) -> Optional[torch.Tensor]:
    """A bool mask of the units kept (on ``like``'s device), or None when nothing is dropped."""
    if not train or dropout_p == 0.0:
        return None
    return torch.empty(shape, dtype=torch.bool, device=like.device).bernoulli_(1.0 - dropout_p)


def draw_multiplier(like: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, dropout_p: float,
                    train: bool) -> Optional[torch.Tensor]:
    """A ``dtype`` multiplier, 0 or ``1 / (1 - p)`` per unit, or None when nothing is dropped."""
    if not train or dropout_p == 0.0:
        return None
    return torch.empty(shape, dtype=dtype, device=like.device).bernoulli_(1.0 - dropout_p).mul_(keep_scale(dropout_p))


def apply_keep(x: torch.Tensor, keep: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """``x * keep * scale``: dropout with a drawn mask (``x`` when there is none)."""
    return x if keep is None else x * keep * keep_scale(dropout_p)


def lower_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives ``t`` for a matrix product (``t``'s own when autocast is off or it is
    float64): the dtype the C++ sub-layer ops draw their attention-dropout multipliers in."""
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype
