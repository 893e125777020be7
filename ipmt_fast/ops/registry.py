"""Backend registry for the fused ops.

Every hot path of IPMT is an *op* (``masked_prototype_attention``, ``prototype_mask_logits``,
``prototype_query_update``, ``ms_deform_sample``, ``feed_forward``) with interchangeable *backends*:

``reference``
    A literal, naive PyTorch transcription of the published math: the oracle.
``torch``
    The algebraically fused form in plain PyTorch ops (autograd differentiates it); any device.
``triton``
    Triton kernels (``ipmt_fast.kernels``). On CUDA tensors, or on the CPU when the
    ``TRITON_INTERPRET=1`` environment variable was set before ``triton`` was imported.
``compiled``
    The C++ (CPU, OpenMP) / CUDA sources in ``csrc/``, built on first use with ninja: the
    deformable sampling's own kernels, and every other op's forward and backward as one
    dispatcher call each (its torch form's algebra written against ATen), so the host issues a
    fraction of the ops.

A backend asked for by name fails loudly when it cannot serve the tensors it is given.
``auto`` walks a per-device preference list and takes the first backend that is registered for
the op and available; when a preferred backend fails to *become* available (e.g. its extension
cannot build) it warns once and falls back to the next one.

A model-wide backend name is applied per op by :func:`resolve_backend_name`: an op that has no
implementation of that name uses the ``torch`` fused form instead (``triton`` exists for all but
``feed_forward``, whose two dense matmuls are cuBLAS / oneDNN work already), so
``IPMT(backend="triton")`` is meaningful for the whole model.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("reference", "torch", "triton", "compiled")

# What `auto` tries, in order, per device type, chosen by measurement (NOTES.md,
# benches/results/): on an H100 at IPMT's sizes the model is bound by the host issuing ops, and
# the compiled CUDA deformable sampling plus the fused torch forms of the other ops (fewest
# launches then) ran fastest: 1.44x the reference at B=16, while the Triton kernels' extra
# launches cost more than they saved there; the compiled forms of the other ops issue fewer ops
# still. On the CPU the compiled extension avoids the reference's large intermediates without
# Python overhead. The Triton kernels stay available by name.
AUTO_PREFERENCE = {
    "cuda": ("compiled", "torch", "triton", "reference"),
    "cpu": ("compiled", "torch", "reference"),
}


@dataclass
class _Implementation:
    fn: Callable
    devices: tuple
    # Returns None when usable, else a human-readable reason (checked lazily, once per device).
    availability: Optional[Callable[[str], Optional[str]]] = None
    _reasons: Dict[str, Optional[str]] = field(default_factory=dict)

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type not in self.devices:
            return f"it does not run on {device_type} tensors (runs on: {', '.join(self.devices)})"
        if device_type not in self._reasons:
            self._reasons[device_type] = self.availability(device_type) if self.availability else None
        return self._reasons[device_type]


_REGISTRY: Dict[str, Dict[str, _Implementation]] = {}
_WARNED: set = set()


def register(op: str, backend: str, fn: Callable, devices=("cpu", "cuda"), availability=None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` for the given device types."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Implementation(fn, tuple(devices), availability)


def triton_availability(device_type: str) -> Optional[str]:
    """Why Triton kernels cannot run on ``device_type`` tensors here, or None if they can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the `triton` package is not installed (pip install triton)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton runs on CPU tensors only in interpreter mode: set TRITON_INTERPRET=1 in the "
                "environment before triton is first imported")
    return None


def registered_ops() -> tuple:
    """The names of every registered op."""
    return tuple(_REGISTRY)


def registered_backends(op: str) -> tuple:
    """The backend names registered for ``op``."""
    return tuple(_REGISTRY[op])


def available_backends(op: str, device_type: str) -> tuple:
    """The backend names of ``op`` that can run on ``device_type`` tensors here (an extension that
    must build is built, once), in registration order."""
    return tuple(name for name, impl in _REGISTRY[op].items() if impl.unavailable_reason(device_type) is None)


def resolve_backend_name(op: str, backend: str) -> str:
    """Map a model-wide backend name to the one ``op`` uses (see module docstring)."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto" or backend in _REGISTRY[op]:
        return backend
    return "torch"


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device_type: str) -> str:
    """The backend name that runs ``op`` for the (model-wide or op) name ``backend`` on
    ``device_type`` tensors: ``auto``'s choice, with its fallbacks; a named backend that cannot run
    there raises. A constant to ``torch.compile`` (its availability checks build extensions and
    take locks, which must not be traced), decided on its first call."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    impls = _REGISTRY[op]
    if backend != "auto":
        if backend not in impls:
            raise ValueError(f"op {op!r} has no {backend!r} backend; it has {tuple(impls)}")
        reason = impls[backend].unavailable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} of {op!r} cannot run here: {reason}")
        return backend
    for name in AUTO_PREFERENCE.get(device_type, ("torch", "reference")):
        impl = impls.get(name)
        if impl is None:
            continue
        reason = impl.unavailable_reason(device_type)
        if reason is None:
            return name
        key = (op, name, device_type)
        # A backend that simply is not meant for this device is skipped silently; one that
        # should have worked but did not (missing compiler, missing package) is reported once.
        if device_type in impl.devices and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{op}: backend {name!r} unavailable ({reason}); falling back", RuntimeWarning,
                          stacklevel=4)
    raise RuntimeError(f"no backend of {op!r} can run on {device_type} tensors")


def get_implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The function that runs ``op`` with ``backend`` on tensors of ``device``."""
    name = resolve(op, backend, torch.device(device).type)  # first: it names an unknown op
    return _REGISTRY[op][name].fn


def selected_backend(op: str, backend: str, device) -> str:
    """The backend name that ``get_implementation(op, backend, device)`` resolves to."""
    return resolve(op, backend, torch.device(device).type)
