"""Argument checks shared by the public op functions: errors name the argument and what it expects."""
from __future__ import annotations

import functools
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
    expected = "(" + ", ".join(str(s) for s in shape) + ")"
    if t.dim() != len(shape):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    for i, s in enumerate(shape):
        if isinstance(s, int) and t.shape[i] != s:
            raise ValueError(f"{name} must have shape {expected} with dim {i} == {s}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")


def check_same_size(what: str, **sizes: int) -> None:
    """Check that the named sizes agree, e.g. ``check_same_size('batch', prototype=2, tokens=3)``."""
    values = set(sizes.values())
    if len(values) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{what} sizes must agree: {detail}")


def autocast_dtype(device: torch.device):
    """The autocast dtype active for ``device``'s type, or None when autocast is off there.

    Under autocast the ops follow ``nn.Linear``: floating inputs are cast to the autocast dtype
    and the op itself runs with autocast disabled (fused backends accumulate in float32).
    """
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def follows_autocast(op):
    """Decorate a public op so that under autocast its floating tensor arguments are cast to the
    autocast dtype and it runs with autocast disabled (see :func:`autocast_dtype`). The device is
    that of the first tensor argument."""

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        dtype = autocast_dtype(device) if device is not None else None
        if dtype is None:
            return op(*args, **kwargs)

        def cast(a):
            return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(device.type, enabled=False):
            return op(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper
