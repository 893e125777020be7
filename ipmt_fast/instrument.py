"""Counting what a piece of PyTorch code asks of the dispatcher: ops, and the ones that stall the host.

At IPMT's batch sizes a GPU step is paced by the host issuing ops, not by the kernels, so the
number of ops dispatched per layer is a cost of its own; and an op that reads a device value on
the host (``.item()``, ``bool(t)``, ``nonzero``) or copies host data to the device stalls the
host and cannot be captured in a CUDA graph.

:class:`DispatchCounter` is a ``TorchDispatchMode`` that counts every op reaching the dispatcher
below autograd (forward and backward alike, views included), by name, and records the host syncs
and host<->device copies among them. A custom op (``ipmt_fast::...``) counts once in ``ops``;
with ``inside_custom_ops=True`` the ATen calls its implementation makes (from C++ or Python) are
counted too, in ``inner_ops``, so both the dispatches issued from Python and autograd and the
ATen calls behind them can be reported.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must read from the device before it can go on.
HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), int(t), float(t), bool(t), .tolist()
    "aten::is_nonzero",
    "aten::equal",
    "aten::allclose",
    "aten::nonzero",  # output size depends on the values
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
})
# A tensor built from Python data (``torch.tensor(...)``) inside the counted region: on a GPU a
# host-to-device copy.
TENSOR_FROM_HOST_DATA_OPS = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})
# The namespace of the project's custom ops.
CUSTOM_OP_NAMESPACE = "ipmt_fast"
# Tensor methods that read a CPU tensor's values without dispatching any op (on a GPU tensor they
# dispatch a device-to-host copy first); the counter records their calls by wrapping them.
HOST_READ_METHODS = ("tolist", "numpy")
# Ops that allocate, re-describe memory or compute on dtypes only: like views
# (``OpOverload.is_view``), they do no device work.
NO_DEVICE_WORK_OPS = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::resize_", "aten::set_", "aten::lift_fresh", "aten::_unsafe_view", "aten::promote_types",
    "aten::result_type"})


def _devices(value) -> List[torch.device]:
    if isinstance(value, torch.Tensor):
        return [value.device]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _devices(v)]
    return []


class DispatchCounter(TorchDispatchMode):
    """Count dispatched ops while active::

        with DispatchCounter() as counter:
            loss = model(...); loss.backward()
        counter.total, counter.ops.most_common(10), counter.host_syncs

    Args:
        inside_custom_ops: also count, in ``inner_ops``, the ATen calls made inside ``ipmt_fast``
            custom ops (run below the dispatcher's Python key with this counter active).

    Attributes:
        ops: ``Counter`` of op names (``aten::mm``, ``ipmt_fast::ms_deform_sample``...).
        inner_ops: ``Counter`` of the ops dispatched inside custom ops (``inside_custom_ops``).
        without_device_work: the names among them that do no work on the device: views,
            allocations and dtype functions (``NO_DEVICE_WORK_OPS``) and custom ops (whose inner
            calls do it). The others are what a GPU would run as kernels (``device_total``,
            ``inner_device_total``).
        host_syncs: names of the ops that read device values on the host or moved data between
            the host and a device (``HOST_SYNC_OPS``, ``TENSOR_FROM_HOST_DATA_OPS``, any op whose
            tensor arguments and results sit on different devices, and the ``HOST_READ_METHODS``
            called), in call order.
    """

    def __init__(self, inside_custom_ops: bool = False):
        super().__init__()
        self.ops: Counter = Counter()
        self.inner_ops: Counter = Counter()
        self.host_syncs: List[str] = []
        self.without_device_work: Set[str] = set()
        self._inside_custom_ops = inside_custom_ops
        self._custom_op_depth = 0
        self._saved_methods = {}

    def __enter__(self):
        for name in HOST_READ_METHODS:
            method = getattr(torch.Tensor, name)
            self._saved_methods[name] = method

            def recorded(tensor, *args, _name=name, _method=method, **kwargs):
                self.host_syncs.append(f"Tensor.{_name}")
                return _method(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, recorded)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved_methods.items():
            setattr(torch.Tensor, name, method)
        self._saved_methods.clear()
        return super().__exit__(*exc)

    def _run_counting_inside(self, func, args, kwargs):
        """Run a custom op's device kernel with this counter active, so the ops it dispatches are counted."""
        device = next(d for d in _devices(list(args) + list(kwargs.values())))
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)
        self._custom_op_depth += 1
        try:
            with self:
                return func.redispatch(keys, *args, **kwargs)
        finally:
            self._custom_op_depth -= 1

    @property
    def total(self) -> int:
        """Every op dispatched outside custom ops (custom ops included, once each)."""
        return sum(self.ops.values())

    @property
    def inner_total(self) -> int:
        """Every op dispatched inside custom ops (``inside_custom_ops=True``)."""
        return sum(self.inner_ops.values())

    @property
    def device_total(self) -> int:
        """The ops outside custom ops that do device work (see ``without_device_work``)."""
        return sum(n for name, n in self.ops.items() if name not in self.without_device_work)

    @property
    def inner_device_total(self) -> int:
        """The ops inside custom ops that do device work (``inside_custom_ops=True``)."""
        return sum(n for name, n in self.inner_ops.items() if name not in self.without_device_work)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        (self.inner_ops if self._custom_op_depth else self.ops)[name] += 1
        custom = name.startswith(CUSTOM_OP_NAMESPACE + "::")
        if custom or func.is_view or name in NO_DEVICE_WORK_OPS:
            self.without_device_work.add(name)
        if self._inside_custom_ops and custom:
            out = self._run_counting_inside(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if name in HOST_SYNC_OPS or name in TENSOR_FROM_HOST_DATA_OPS:
            self.host_syncs.append(name)
        else:
            devices = {d.type for d in _devices(args) + _devices(list(kwargs.values())) + _devices(out)}
            if len(devices) > 1:
                self.host_syncs.append(f"{name} ({' <-> '.join(sorted(devices))})")
        return out
