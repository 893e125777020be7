"""Argument checks shared by the public op functions: errors name the argument and what it expects."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, shape: Sequence, dtypes=FLOAT_DTYPES, device=None) -> None:
    """Check rank, sizes (None = any size), dtype and device of ``t``.

    ``shape`` names the expected layout, e.g. ``("B", "N", "C")``, using ints for fixed sizes and
    strings for symbolic ones; symbols are only checked for rank here (callers compare sizes).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")

    def expected() -> str:  # formatted only for a message (sizes may be symbolic while compiling)
        return "(" + ", ".join(str(s) for s in shape) + ")"

    if t.dim() != len(shape):
        raise ValueError(f"{name} must have shape {expected()}, got {tuple(t.shape)}")
    for i, s in enumerate(shape):
        if isinstance(s, (int, torch.SymInt)) and t.shape[i] != s:
            raise ValueError(f"{name} must have shape {expected()} with dim {i} == {s}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")


def check_same_size(what: str, **sizes: int) -> None:
    """Check that the named sizes agree, e.g. ``check_same_size('batch', prototype=2, tokens=3)``."""
    first, *others = sizes.values()
    if any(size != first for size in others):
        detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{what} sizes must agree: {detail}")
