"""What a CUDA graph would capture, traced with fake CUDA tensors on a machine without a GPU.

The captured work of ``ipmt_fast.train.graphs`` (a whole training iteration of
:class:`~ipmt_fast.train.graphs.GraphedStep`, an inference forward of
:class:`~ipmt_fast.train.graphs.GraphedForward`) is run for real, through those classes, but on
``FakeTensorMode`` tensors of device ``cuda`` (shapes and dtypes, no data), in a process where
``fake_cuda_shim.cpp`` stands in for the CUDA device guard and hooks of the CPU-only torch build
(see ``shim.py``). ``graphs.capture`` is replaced by :func:`recording_capture`: the warm-up
iterations run as they would, then the call a graph would capture, both under
:class:`CaptureRecorder`, a ``TorchDispatchMode`` that sees every op dispatched below autograd
(forward, backward, clipping, optimiser steps). In the captured call it records every op and what
a CUDA graph cannot hold:

* ``host read``: an op whose result the host must read (``.item()``, ``bool(t)``, ``nonzero``...,
  ``ipmt_fast.instrument.HOST_SYNC_OPS``); fake tensors have no values, so the trace stops there;
* ``tensor from host data``: ``torch.tensor(...)`` inside the step (a host-to-device copy);
* ``CPU tensor``: an op that makes a CPU tensor (a factory without ``device=``, a copy to the host);
* ``CPU operand``: a CPU tensor (not a Python number) handed to an op on CUDA tensors, whose
  value a graph would freeze at capture;
* ``no fake implementation``: a custom op with no fake (shape-only) implementation (nor Meta
  kernel), which neither FakeTensorMode nor ``torch.compile`` can trace; the trace stops there;
* ``fails on fake tensors``: any other op that raised on fake tensors; the trace stops there.

In the warm-up (eager iterations, where host reads and CPU tensors are allowed) only what stops
a trace is recorded (host reads, ops without a fake implementation or failing on fake tensors):
the same code runs there first.

Ops are discovered from what runs, never listed: the report names every op seen, and the test
checks each ``aten`` one against the CUDA kernels of torch's build (``cuda_kernels.py``).

Overrides, each the least that lets the CPU build run the CUDA code path (:func:`cuda_overrides`):

* ``ipmt_fast.ops.deform_sample._grid_sample_rounds_once`` answers True for CUDA: its probe runs a
  real ``grid_sample`` and reads the result, which fake tensors cannot (it runs once, during
  warm-up, in a real run); CUDA's kernel rounds once (NOTES.md, 2026-11-30);
* ``ipmt_fast.ops.extension.built_with_cuda`` answers True: the C++ library built here has no
  CUDA kernels (no nvcc build without a GPU), but under fake tensors its ops run their fake
  implementations, which is what is checked; the CUDA kernels themselves are not;
* ``torch.cuda.amp.common.amp_definitely_not_available`` answers False and
  ``torch.cuda.is_bf16_supported`` True: otherwise ``torch.autocast("cuda")`` switches itself off
  (with a warning) in a build without CUDA, and a bf16 trace would silently run float32;
* ``torch.cuda.is_current_stream_capturing`` answers True while the captured call runs, as it
  would inside ``torch.cuda.graph`` (the model's value checks branch on it);
* ``ipmt_fast.train.graphs.capture`` is :func:`recording_capture` (no streams, no graph; its
  "replay" does nothing);
* ``FakeTensor`` joins the tensor types the optimisers' and ``clip_grad_norm_``'s foreach (and
  fused) paths accept (``_foreach_supported_types``, which ``torch.distributed.tensor`` extends
  with ``DTensor`` the same way): on CUDA a real run's parameters and gradients, plain tensors,
  take those paths, and without it the trace would follow the per-tensor loops instead;
* ``aten::_fused_sgd_`` (both overloads) gets a Meta kernel where torch has none (2.13 has not):
  the fused SGD step GraphedStep runs is otherwise untraceable on fake tensors. It checks the
  lists' lengths, the gradients' shapes and that a tensor learning rate holds one value, and
  returns nothing (the step is in place); the recorder checks the devices.

Run in a process of its own through ``run_trace.py`` (the shim must be loaded before torch).
"""
from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ipmt_fast
from ipmt_fast.instrument import HOST_SYNC_OPS, TENSOR_FROM_HOST_DATA_OPS
from ipmt_fast.ops import registry
from ipmt_fast.train import graphs
from ipmt_fast.train.config import make_config
from ipmt_fast.train.trainer import build_optimizers

MODES = ("train", "eval")
AMPS = ("none", "bf16")
BACKENDS = registry.BACKENDS + ("auto",)
# The smallest IPMT that has every part (one transformer layer), at the smallest input size it takes
# ((H - 1) % 8 == 0); fake tensors cost the same per op whatever their size.
MODEL_ARGS = dict(layers=50, shot=1, reduce_dim=32, num_layers=1)
IMAGE_SIZE = 33
BATCH_SIZE = 2
# Clipping on, so that the trace includes it (GraphedStep clips only when a norm is given).
CLIP_GRAD_NORM = 0.5
AUX_WEIGHT = 1.0
# GraphedStep's minimum: one eager iteration creates the optimisers' state before capture.
WARMUP_ITERATIONS = 1
# Labels as the loader gives them; fake tensors carry no values, only shapes and dtypes.
LABEL_DTYPE = torch.int64

HOST_READ = "host read"
TENSOR_FROM_HOST_DATA = "tensor from host data"
CPU_TENSOR = "CPU tensor"
CPU_OPERAND = "CPU operand"
NO_FAKE = "no fake implementation"
FAKE_FAILURE = "fails on fake tensors"
# Phases of a recorded capture (CaptureRecorder).
WARMUP = "warm-up"
CAPTURE = "capture"
# Namespaces of ops that run their kernels through the dispatcher's backends (checked against
# torch's CUDA kernels); `prim` ops only query metadata (`prim::device`).
ATEN_NAMESPACE = "aten"
METADATA_NAMESPACE = "prim"
# Frames of these files are the machinery, not the code that issued an op.
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())
_RECORDER_FUNCTIONS = frozenset({"__torch_dispatch__", "_record", "_check_devices", "_issuer"})
_REPO_ROOT = Path(ipmt_fast.__file__).resolve().parents[1]


class HarnessOutOfDate(RuntimeError):
    """A name the harness overrides is gone from the library: update :func:`cuda_overrides`."""


class UncapturableOp(RuntimeError):
    """The captured iteration reached an op the trace cannot go past (a host read, an op without
    a fake implementation); the recorder's violations say which and where."""


@dataclass(frozen=True)
class Case:
    """One trace: ``mode`` (``train``: GraphedStep's iteration; ``eval``: GraphedForward's forward),
    the model-wide ``backend``, ``amp`` (``none`` or ``bf16``) and an optional fault from
    :data:`INJECTIONS` (the harness's self-test)."""

    mode: str
    backend: str
    amp: str
    inject: Optional[str] = None

    @property
    def name(self) -> str:
        base = f"{self.mode}-{self.backend}-{self.amp}"
        return f"{base}+{self.inject}" if self.inject else base

    @classmethod
    def parse(cls, name: str) -> "Case":
        base, _, inject = name.partition("+")
        mode, backend, amp = base.split("-")
        case = cls(mode, backend, amp, inject or None)
        if mode not in MODES or backend not in BACKENDS or amp not in AMPS or \
                (case.inject is not None and case.inject not in INJECTIONS):
            raise ValueError(f"unknown case {name!r}: mode in {MODES}, backend in {BACKENDS}, amp in {AMPS}, "
                             f"fault in {tuple(INJECTIONS)}")
        return case


def all_cases() -> List[Case]:
    """Every mode, backend and precision, without faults."""
    return [Case(mode, backend, amp) for mode in MODES for backend in BACKENDS for amp in AMPS]


# --------------------------------------------------------------------------- recording
def qualified_name(func) -> str:
    """``namespace::name`` or ``namespace::name.overload`` of an op overload."""
    name = func._schema.name
    return name if func._overloadname == "default" else f"{name}.{func._overloadname}"


def _tensors(value) -> List[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _issuer() -> str:
    """Where the current op was issued: the innermost frame outside torch and the recorder."""
    for frame in reversed(traceback.extract_stack()):
        filename = str(Path(frame.filename).resolve())
        if filename.startswith(_TORCH_DIR) or (filename == _THIS_FILE and frame.name in _RECORDER_FUNCTIONS):
            continue
        try:
            filename = str(Path(filename).relative_to(_REPO_ROOT))
        except ValueError:
            pass
        return f"{filename}:{frame.lineno} in {frame.name}"
    return "unknown"


def takes_or_gives_tensors(func) -> bool:
    """Whether an op's schema has a tensor argument or result; one without runs no device kernel
    (e.g. ``profiler::_record_function_enter_new``) and needs no fake implementation."""
    return any("Tensor" in str(value.type) for value in (*func._schema.arguments, *func._schema.returns))


def has_fake_implementation(qualname: str) -> bool:
    """Whether a custom op has a fake implementation or a Meta kernel. An op made with
    ``torch.library.custom_op`` always holds a fake kernel, which raises unless one was
    registered (or the op returns nothing, which gets a generated one); one registered with
    ``torch.library.register_fake`` (the C++ ops) or a ``triton_op`` holds the implementation."""
    opdef = torch._library.custom_ops._maybe_get_opdef(qualname)
    if opdef is not None:
        return opdef._abstract_fn is not None or \
            torch._library.utils.can_generate_trivial_fake_impl(opdef._opoverload)
    entry = torch._library.simple_registry.singleton.find(qualname)
    return entry.fake_impl.kernel is not None or torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")


class CaptureRecorder(TorchDispatchMode):
    """Record the ops dispatched while active (to run above a ``FakeTensorMode``), and what in
    them a CUDA graph capture cannot hold (see the module docstring).

    In phase :data:`CAPTURE` (the call a graph would capture) every op is counted and checked.
    In phase :data:`WARMUP` (the eager iterations before it, where host reads and CPU tensors are
    allowed) only what stops a fake trace is recorded: a host read (a fake tensor has no value
    to read) and an op that cannot run on fake tensors. The same code runs in both phases, so a
    host read in the step shows up in the warm-up first.

    Attributes:
        ops: ``Counter`` of the qualified op names of the captured call (``aten::add.Tensor``),
            but for ``prim`` ops (metadata queries).
        output_dtypes: ``Counter`` of the dtypes of its ops' tensor results.
        custom_ops: per op outside ``aten`` and ``prim`` that takes or gives tensors, whether it
            has a fake implementation (:func:`has_fake_implementation`).
        violations: dicts ``kind``, ``op``, ``phase``, ``where`` (file:line of the issuing code).
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.output_dtypes: Counter = Counter()
        self.custom_ops: Dict[str, bool] = {}
        self.violations: List[Dict[str, str]] = []
        self.phase = CAPTURE

    @contextlib.contextmanager
    def recording(self, phase: str) -> Iterator[None]:
        """Active in ``phase`` (:data:`WARMUP` or :data:`CAPTURE`) inside."""
        self.phase = phase
        with self:
            yield

    def _record(self, kind: str, name: str) -> str:
        where = _issuer()
        self.violations.append({"kind": kind, "op": name, "phase": self.phase, "where": where})
        return where

    def _check_devices(self, name: str, inputs: List[torch.Tensor], outputs: List[torch.Tensor]) -> None:
        if any(t.device.type == "cpu" for t in outputs):
            self._record(CPU_TENSOR, name)
        elif any(t.device.type == "cpu" for t in inputs) and any(t.device.type == "cuda" for t in inputs + outputs):
            self._record(CPU_OPERAND, name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == METADATA_NAMESPACE:  # device queries: no kernel, nothing to check
            return func(*args, **kwargs)
        name = qualified_name(func)
        capturing = self.phase == CAPTURE
        if capturing:
            self.ops[name] += 1
        if func._schema.name in HOST_SYNC_OPS:
            where = self._record(HOST_READ, name)
            raise UncapturableOp(f"{name} reads a device value on the host ({self.phase}, at {where})")
        if func.namespace != ATEN_NAMESPACE and takes_or_gives_tensors(func):
            has_fake = has_fake_implementation(func._schema.name)
            self.custom_ops[name] = has_fake
            if not has_fake:
                where = self._record(NO_FAKE, name)
                raise UncapturableOp(f"{name} has no fake implementation ({self.phase}, at {where})")
        if capturing and func._schema.name in TENSOR_FROM_HOST_DATA_OPS:
            self._record(TENSOR_FROM_HOST_DATA, name)
        try:
            out = func(*args, **kwargs)
        except Exception as error:
            where = self._record(FAKE_FAILURE, name)
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise UncapturableOp(f"{name} failed on fake tensors ({self.phase}, at {where}): {first_line}") from error
        if capturing:
            outputs = _tensors(out)
            self._check_devices(name, _tensors((args, kwargs)), outputs)
            self.output_dtypes.update(str(t.dtype).replace("torch.", "") for t in outputs)
        return out


class _NoGraph:
    """What :func:`recording_capture` returns as the graph: nothing to replay on fake tensors."""

    def replay(self) -> None:
        pass


@contextlib.contextmanager
def stream_capturing(active: bool) -> Iterator[None]:
    """``torch.cuda.is_current_stream_capturing()`` answers ``active`` inside."""
    saved = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: active
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = saved


def recording_capture(recorder: CaptureRecorder) -> Callable:
    """A stand-in for ``graphs.capture`` with its signature: ``warmup`` eager calls of ``fn``,
    ``before_capture()``, then the call a graph would capture, recorded by ``recorder``."""

    def capture(fn: Callable[[], Any], warmup: int = graphs.WARMUP_ITERATIONS,
                before_capture: Optional[Callable[[], None]] = None) -> graphs.CapturedGraph:
        with recorder.recording(WARMUP):
            for _ in range(warmup):
                fn()
        if before_capture is not None:
            before_capture()
        with stream_capturing(True), recorder.recording(CAPTURE):
            output = fn()
        return graphs.CapturedGraph(_NoGraph(), output, pool_bytes=0)

    return capture


# --------------------------------------------------------------------------- overrides
def _override(stack: contextlib.ExitStack, owner, name: str, value) -> None:
    if not hasattr(owner, name):
        raise HarnessOutOfDate(f"{getattr(owner, '__name__', owner)}.{name} no longer exists; the fake-CUDA "
                               f"harness overrides it (tests/fake_cuda/capture_trace.py, cuda_overrides)")
    saved = getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, saved)


def _append(stack: contextlib.ExitStack, owner, name: str, item) -> None:
    if not isinstance(getattr(owner, name, None), list):
        raise HarnessOutOfDate(f"{owner.__name__}.{name} is no longer a list; the fake-CUDA harness extends it "
                               f"(tests/fake_cuda/capture_trace.py, cuda_overrides)")
    values = getattr(owner, name)
    if item not in values:
        values.append(item)
        stack.callback(values.remove, item)


@contextlib.contextmanager
def cuda_overrides(recorder: CaptureRecorder) -> Iterator[None]:
    """The overrides of the module docstring, undone on exit."""
    from ipmt_fast.ops import deform_sample, extension
    from torch.optim import optimizer
    from torch.utils import _foreach_utils

    with contextlib.ExitStack() as stack:
        for owner in (optimizer, _foreach_utils):
            _append(stack, owner, "_foreach_supported_types", FakeTensor)
        _override(stack, deform_sample, "_grid_sample_rounds_once", _cuda_grid_sample_rounds_once)
        _override(stack, extension, "built_with_cuda", lambda: True)
        _override(stack, torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
        _override(stack, torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        _override(stack, torch.cuda, "is_current_stream_capturing", lambda: False)
        _override(stack, graphs, "capture", recording_capture(recorder))
        yield


def _cuda_grid_sample_rounds_once(device_type: str, dtype: torch.dtype) -> bool:
    """CUDA's ``grid_sample`` rounds its source coordinate once (see the module docstring)."""
    if device_type != "cuda":
        raise AssertionError(f"the CUDA trace asked for grid_sample's rounding on {device_type}")
    return True


# Kept alive for the process: the Meta kernels registered by _register_missing_meta_kernels.
_ATEN_META_LIBRARY: Optional[torch.library.Library] = None
FUSED_SGD_OVERLOADS = ("_fused_sgd_", "_fused_sgd_.tensor_lr")


def _fused_sgd_meta(params, grads, momentum_buffer_list, **options):
    """Shape-only ``_fused_sgd_``: one gradient (and momentum buffer, if any) per parameter, of its
    shape; a tensor learning rate holds one value. In place: nothing returned."""
    torch._check(len(grads) == len(params), lambda: "_fused_sgd_: one gradient per parameter")
    torch._check(not momentum_buffer_list or len(momentum_buffer_list) == len(params),
                 lambda: "_fused_sgd_: one momentum buffer per parameter")
    for i, (param, grad) in enumerate(zip(params, grads)):
        torch._check(grad.shape == param.shape, lambda: f"_fused_sgd_: gradient {i} has another shape")
    lr = options["lr"]
    if isinstance(lr, torch.Tensor):
        torch._check(lr.numel() == 1, lambda: "_fused_sgd_: a tensor learning rate holds one value")


def _register_missing_meta_kernels() -> None:
    """Meta kernels for the aten ops of the step that torch lacks them for (module docstring)."""
    global _ATEN_META_LIBRARY
    missing = [name for name in FUSED_SGD_OVERLOADS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta")]
    if missing and _ATEN_META_LIBRARY is None:
        _ATEN_META_LIBRARY = torch.library.Library("aten", "IMPL")
        for name in missing:
            _ATEN_META_LIBRARY.impl(name, _fused_sgd_meta, "Meta")


# --------------------------------------------------------------------------- faults (self-test)
# A throwaway custom op with a kernel for every device and, on purpose, no fake implementation.
SELFTEST_OP = "ipmt_fast_selftest::doubled"


def _selftest_op():
    namespace, name = SELFTEST_OP.split("::")
    if not hasattr(getattr(torch.ops, namespace), name):
        torch.library.custom_op(SELFTEST_OP, lambda x: x * 2, mutates_args=(),
                                schema="(Tensor x) -> Tensor")
    return getattr(getattr(torch.ops, namespace), name)


def _inject_host_read():
    def reads_a_value(module, inputs):  # in every iteration
        inputs[0].sum().item()
    return reads_a_value


def _inject_host_read_when_capturing():
    def reads_a_value_when_capturing(module, inputs):  # a capture check the wrong way round
        if torch.cuda.is_current_stream_capturing():
            inputs[0].sum().item()
    return reads_a_value_when_capturing


def _inject_cpu_tensor():
    def makes_a_cpu_tensor(module, inputs):  # a factory call without device=
        torch.zeros(len(inputs))
    return makes_a_cpu_tensor


def _inject_cpu_operand():
    scale = torch.ones(())  # made once, outside the step, on the CPU (like a non-capturable step counter)

    def uses_a_cpu_tensor(module, inputs):  # its value would be frozen into the graph
        return (inputs[0] * scale,) + tuple(inputs[1:])
    return uses_a_cpu_tensor


def _inject_op_without_fake():
    op = _selftest_op()

    def calls_an_op_without_fake(module, inputs):
        return (op(inputs[0]),) + tuple(inputs[1:])
    return calls_an_op_without_fake


# Faults, each a factory of a forward pre-hook that puts it into the model's forward, hence into
# every iteration (host_read_when_capturing: the captured one only). The harness must report
# each (tests/test_cuda_capture_trace.py).
INJECTIONS: Dict[str, Callable[[], Callable]] = {
    "host_read": _inject_host_read,
    "host_read_when_capturing": _inject_host_read_when_capturing,
    "cpu_tensor": _inject_cpu_tensor,
    "cpu_operand": _inject_cpu_operand,
    "op_without_fake": _inject_op_without_fake,
}


# --------------------------------------------------------------------------- one trace
def _batch(shot: int) -> Dict[str, torch.Tensor]:
    """A collated episode batch as the loader gives it: on the CPU (fake)."""
    size, b = IMAGE_SIZE, BATCH_SIZE
    return {"image": torch.randn(b, 3, size, size), "support_images": torch.randn(b, shot, 3, size, size),
            "support_labels": torch.zeros(b, shot, size, size, dtype=LABEL_DTYPE),
            "label": torch.zeros(b, size, size, dtype=LABEL_DTYPE)}


def expected_auto_choices() -> Dict[str, str]:
    """What ``auto`` picks on CUDA per op when every backend is available: the first registered
    name of ``registry.AUTO_PREFERENCE["cuda"]``."""
    return {op: next(name for name in registry.AUTO_PREFERENCE["cuda"] if name in registry.registered_backends(op))
            for op in registry.registered_ops()}


def run_case(case: Case) -> Dict[str, Any]:
    """Trace ``case``; returns its report (JSON-ready): ``case``; ``error``: None, or why the trace
    stopped (with ``traceback``); the recorder's ``ops``, ``output_dtypes``, ``custom_ops`` and
    ``violations``; ``backends``: the backend each registered op resolved to on CUDA for the
    case's backend name (``error: ...`` where it raised)."""
    _register_missing_meta_kernels()
    recorder = CaptureRecorder()
    report: Dict[str, Any] = {"case": case.name, "error": None}
    try:
        with cuda_overrides(recorder), FakeTensorMode(), warnings.catch_warnings():
            # A fallback of `auto` is a coverage loss here, not a convenience.
            warnings.filterwarnings("error", message=".*unavailable.*falling back")
            try:
                _trace(case)
            finally:
                report["backends"] = {op: _resolved(op, case.backend) for op in registry.registered_ops()}
    except Exception as error:  # reported, not raised: the test names the case and the cause
        report["error"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc(limit=-8)
    report.update(ops=dict(recorder.ops), output_dtypes=dict(recorder.output_dtypes),
                  custom_ops=recorder.custom_ops, violations=recorder.violations)
    return report


def _resolved(op: str, backend: str) -> str:
    try:
        return registry.selected_backend(op, registry.resolve_backend_name(op, backend), "cuda")
    except Exception as error:
        return f"error: {error}"


def _trace(case: Case) -> None:
    # Built on the device: Module.to("cuda") swaps each fake parameter's payload in place, which
    # the fake tensor mode's weak references to them forbid.
    with torch.device("cuda"):
        model = ipmt_fast.IPMT(**MODEL_ARGS, backend=case.backend)  # graphs switches its value checks off
    on_cpu = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    if on_cpu:
        raise HarnessOutOfDate(f"the model made {on_cpu} off the default device, under which the harness builds "
                               f"it (a real run moves them with .to): move them to CUDA in _trace")
    if case.inject is not None:
        model.register_forward_pre_hook(INJECTIONS[case.inject]())
    batch = _batch(MODEL_ARGS["shot"])
    if case.mode == "train":
        model.train()
        config = make_config(data="synthetic", reduce_dim=MODEL_ARGS["reduce_dim"],
                             num_layers=MODEL_ARGS["num_layers"])
        step = graphs.GraphedStep(model, build_optimizers(model, config), amp=case.amp,
                                  clip_grad_norm=CLIP_GRAD_NORM, aux_weight=AUX_WEIGHT,
                                  warmup=WARMUP_ITERATIONS)
        step.step(batch)
    else:
        model.eval()
        forward = graphs.GraphedForward(model, amp=case.amp, warmup=WARMUP_ITERATIONS)
        forward(batch["image"], batch["support_images"], batch["support_labels"], batch["label"])
