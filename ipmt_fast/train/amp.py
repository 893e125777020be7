"""Autocast settings by name (``none``, ``bf16``, ``fp16``), shared by training, evaluation and
the CUDA-graph wrappers."""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str = "none", cache_enabled: bool = True):
    """An autocast context for ``amp`` in ``none``, ``bf16``, ``fp16``.

    ``cache_enabled=False`` turns off autocast's cache of down-cast weights; CUDA-graph capture
    needs it off (PyTorch's CUDA-graph notes), since a cached cast made outside the captured
    region would not be redone by a replay.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)
