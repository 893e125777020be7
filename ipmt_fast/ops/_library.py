"""Plumbing shared by the ops' ``torch.library`` registrations: the operator namespace and the
autocast rules the ops follow.

Autocast policies (what a floating-point tensor argument becomes under ``torch.autocast``; float64
is never touched, as autocast itself leaves it alone):

``lower_precision``
    Cast to the active autocast dtype, like ``nn.Linear``: the op then runs in bf16 / fp16 (the
    fused backends accumulate in float32).
``float32``
    Cast bf16 / fp16 up to float32, like ``grid_sample`` (which autocast runs in float32): for the
    deformable sampling, whose locations address sub-pixel positions.

The public op functions apply the policy with :func:`follows_autocast`; the custom ops get the same
rule registered at their autocast dispatch keys (the Triton ops here, :func:`register_autocast`;
the C++ ops in ``csrc/autograd.cpp``), so a direct ``torch.ops.ipmt_fast.*`` call under autocast,
or one traced by ``torch.compile``, is cast the same way. A backward op has no autocast rule: it takes
its forward's tensors in the dtypes the forward made them (a backward run inside an autocast
region must not cast, say, float32 sampling locations to bf16).
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch

NAMESPACE = "ipmt_fast"
AUTOCAST_POLICIES = ("lower_precision", "float32")
# Device types whose autocast rules the custom ops register.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
# What autocast may cast; float64 stays as it is.
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)
# The Python-side registrations (fake implementations, autograd, autocast) of every op in the
# namespace live as long as this library object.
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def qualified_name(name: str) -> str:
    """``ipmt_fast::name``."""
    return f"{NAMESPACE}::{name}"


def autocast_target_dtype(policy: str, device_type: str) -> Optional[torch.dtype]:
    """The dtype ``policy`` casts eligible floating tensors to under the autocast active for
    ``device_type``, or None when autocast is off there."""
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"policy must be one of {AUTOCAST_POLICIES}, got {policy!r}")
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if policy == "lower_precision" else torch.float32


def autocast_cast(value, dtype: torch.dtype):
    """``value`` cast to ``dtype`` if it is a tensor autocast may cast (lists and tuples elementwise)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in _AUTOCAST_ELIGIBLE and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(autocast_cast(v, dtype) for v in value)
    return value


def _cast_except(args, kwargs, dtype, exempt_positions, exempt_names):
    """``args`` and ``kwargs`` cast by :func:`autocast_cast`, except the exempt ones."""
    args = tuple(a if i in exempt_positions else autocast_cast(a, dtype) for i, a in enumerate(args))
    kwargs = {k: v if k in exempt_names else autocast_cast(v, dtype) for k, v in kwargs.items()}
    return args, kwargs


def follows_autocast(policy: str, exempt: Tuple[str, ...] = ()):
    """Decorate a public op function: under autocast its tensor arguments, but those named in
    ``exempt``, are cast by ``policy`` and it runs with autocast disabled. The device is that of
    the first tensor argument."""
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"policy must be one of {AUTOCAST_POLICIES}, got {policy!r}")

    def decorate(op):
        names = list(inspect.signature(op).parameters)
        exempt_positions = frozenset(names.index(name) for name in exempt)

        @functools.wraps(op)
        def wrapper(*args, **kwargs):
            device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            dtype = autocast_target_dtype(policy, device.type) if device is not None else None
            if dtype is None:
                return op(*args, **kwargs)
            args, kwargs = _cast_except(args, kwargs, dtype, exempt_positions, exempt)
            with torch.autocast(device.type, enabled=False):
                return op(*args, **kwargs)

        return wrapper

    return decorate


def register_autocast(qualname: str, policy: str, exempt: Tuple[str, ...] = ()) -> None:
    """Register ``policy`` as the autocast rule of the custom op ``qualname`` for every device type
    in :data:`AUTOCAST_DEVICE_TYPES`, the arguments named in ``exempt`` left as they are
    (``torch.library.register_autocast`` takes a fixed dtype; ``lower_precision`` needs the one
    active at call time)."""
    op = torch._library.utils.lookup_op(qualname)
    _, name = torch._library.utils.parse_namespace(qualname)
    exempt_positions = frozenset(i for i, argument in enumerate(op._schema.arguments) if argument.name in exempt)
    for device_type in AUTOCAST_DEVICE_TYPES:
        autocast_key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        dispatch_key = getattr(torch._C.DispatchKey, autocast_key)

        def run(*args, _device_type=device_type, _dispatch_key=dispatch_key):
            dtype = autocast_target_dtype(policy, _device_type)
            if dtype is not None:
                args, _ = _cast_except(args, {}, dtype, exempt_positions, exempt)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_dispatch_key)):
                return op(*args)

        # The Python-dispatcher path (used while tracing) and the C++ dispatcher path.
        if op.has_kernel_for_dispatch_key(dispatch_key):
            op.py_kernels.pop(dispatch_key, None)
        op.py_impl(dispatch_key)(run)
        LIBRARY.impl(name, lambda _keyset, *args, _run=run: _run(*args), autocast_key, with_keyset=True)


def contiguous_like(*tensors: torch.Tensor):
    """Fresh contiguous tensors of the given tensors' shapes and dtypes: what the kernels return
    (a fake implementation must match their strides, not the inputs')."""
    empties = tuple(t.new_empty(t.shape) for t in tensors)
    return empties[0] if len(empties) == 1 else empties


def register_compiled_fakes(name: str, fake, backward_fake) -> None:
    """Fake (shape-only) implementations of a C++ op ``ipmt_fast::name`` and of its
    ``name_backward`` (call once the library is loaded, see ``extension.on_load``). Their autograd
    and autocast rules are registered in C++ (``csrc/autograd.cpp``)."""
    torch.library.register_fake(qualified_name(name), fake, lib=LIBRARY)
    torch.library.register_fake(qualified_name(f"{name}_backward"), backward_fake, lib=LIBRARY)
