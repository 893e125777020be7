"""Whole-iteration CUDA graphs: a training step (forward with losses, backward, gradient clipping,
both optimisers' steps) or an inference forward captured once and replayed.

At IPMT's batch sizes a GPU step is paced by the host issuing several hundred ops per layer,
not by the kernels (see the README's *Performance*). Replaying a captured graph issues all of
them with one launch. The pattern is PyTorch's whole-network capture (its CUDA-graph notes):

* warm-up iterations on a side stream first, so that everything done once (cuBLAS/cuDNN
  handles and algorithm choices, Triton compilation, the optimisers' lazily created state)
  happens before capture, then one iteration captured on that same stream into a private
  memory pool;
* inputs are static device buffers: each new batch is copied into them (from pinned memory,
  non-blocking) before a replay;
* the optimisers run their graph-safe forms: AdamW (and Adam) with ``capturable=True``, SGD
  ``fused`` (its foreach and single-tensor forms read a tensor learning rate back to the host);
  learning rates are 0-dim device tensors the schedule writes before each replay;
* dropout stays random: ``torch.cuda.graph`` registers the default CUDA generator, so every
  replay draws fresh masks from an advancing Philox offset;
* gradients are set to ``None`` before capture, so backward allocates them in the graph's pool
  and every replay overwrites them (as the eager step's ``zero_grad(set_to_none=True)``).

The captured region must not synchronise with the host. The model's own input checks do (they
read label and finiteness tests back to the host), so they are switched off while warming up and
capturing through ``model.check_values`` (the data layer validates labels on the host).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .amp import autocast

# Eager iterations before capture. They absorb every one-time cost (library handles, algorithm
# choice, kernel compilation, optimiser state creation); PyTorch's example uses three.
WARMUP_ITERATIONS = 3
# Inference graphs kept per GraphedForward (one per input signature), least recently used
# dropped first: each holds its own memory pool.
MAX_CACHED_SHAPES = 4
# Collated-batch keys of the model's inputs (x, s_x, s_y, y), as ipmt_fast.train.evaluate.episode_inputs.
INPUT_KEYS = ("image", "support_images", "support_labels", "label")
# The first two inputs are images, copied in the model's floating dtype; labels keep theirs.
NUM_IMAGE_INPUTS = 2
LOSS_NAMES = ("loss", "main_loss", "aux_loss")
# Capture errors only for unsafe CUDA calls of the capturing thread: a DataLoader's pin-memory
# thread may allocate pinned memory and query events while a capture is under way.
CAPTURE_ERROR_MODE = "thread_local"


class CudaGraphError(ValueError):
    """A CUDA-graph capture that cannot work here (device, settings, or inputs), refused before
    anything is captured."""


def require_cuda(device: torch.device) -> None:
    """Refuse a device other than CUDA."""
    if torch.device(device).type != "cuda":
        raise CudaGraphError(f"CUDA graphs (--cuda-graphs) need a CUDA device, got {device} "
                             f"(drop --cuda-graphs to run eagerly)")


def check_training_support(device: torch.device, amp: str = "none", distributed: bool = False) -> None:
    """Refuse the training settings a captured step does not support (see the README's *CUDA graphs*)."""
    require_cuda(device)
    if amp == "fp16":
        raise CudaGraphError("--cuda-graphs does not support --amp fp16: the fp16 gradient scaler reads its "
                             "inf/NaN check back to the host to decide whether to skip each step, which a "
                             "replayed graph cannot do; use --amp bf16 (no scaler needed) or drop --cuda-graphs")
    if distributed:
        raise CudaGraphError("--cuda-graphs is not supported under torchrun with several processes: DDP's "
                             "gradient all-reduce has not been captured and verified in a graph yet; train on one "
                             "GPU with --cuda-graphs, or on several without it")


# --------------------------------------------------------------------------- optimisers
def configure_optimizers_for_graphs(optimizers: Iterable[torch.optim.Optimizer], enabled: bool) -> None:
    """Switch SGD and Adam/AdamW between their graph-safe forms and the trainer's eager forms, in place.

    Enabled: SGD ``fused=True`` (its other forms turn a tensor learning rate into a host scalar),
    Adam/AdamW ``capturable=True`` in PyTorch's multi-tensor form, the ``step`` counters on the
    parameters' device. Disabled: both ``fused`` (see ``trainer.build_optimizers``), e.g. after
    resuming an eager run from a checkpoint a graphed run wrote. The optimiser state keeps its
    values either way.
    """
    for opt in optimizers:
        if isinstance(opt, torch.optim.SGD):
            for group in opt.param_groups:
                if enabled and group["dampening"]:
                    # Warm-up state is zeroed before capture (see _WarmupSnapshot), which equals "no
                    # momentum buffer yet" only without dampening.
                    raise CudaGraphError(f"CUDA graphs need SGD without dampening, got {group['dampening']}")
                group["fused"] = True
                group["foreach"] = None
        elif isinstance(opt, torch.optim.Adam):  # AdamW is an Adam
            for group in opt.param_groups:
                group["capturable"] = enabled
                group["fused"] = None if enabled else True
                group["foreach"] = None
                for p in group["params"]:
                    state = opt.state.get(p)
                    if state and "step" in state:  # on the device for both forms
                        state["step"] = state["step"].to(p.device)
        else:
            raise CudaGraphError(f"CUDA graphs support SGD and Adam/AdamW optimisers, got {type(opt).__name__}")


class _WarmupSnapshot:
    """What warm-up iterations change, restored before capture: the optimised parameters and the
    optimisers' state. State the warm-up created is zeroed, which for Adam/AdamW (step 0, zero
    moments) and SGD without dampening (zero momentum) takes the same first step as no state."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = optimizers
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        self.params = [(p, p.detach().clone()) for p in params]
        self.state = {(id(p), key): value.clone() for opt in optimizers for p, state in opt.state.items()
                      for key, value in state.items() if isinstance(value, torch.Tensor)}

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.params:
            p.copy_(saved)
        for opt in self.optimizers:
            for p, state in opt.state.items():
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    saved = self.state.get((id(p), key))
                    if saved is None:
                        value.zero_()
                    else:
                        value.copy_(saved)


# --------------------------------------------------------------------------- capture
@dataclass
class CapturedGraph:
    """One captured CUDA graph and the output tensors of the captured call (overwritten in place
    by every replay)."""

    graph: "torch.cuda.CUDAGraph"
    output: Any
    pool_bytes: int  # device memory the graph's private pool reserved during capture

    def replay(self) -> None:
        self.graph.replay()


def capture(fn: Callable[[], Any], warmup: int = WARMUP_ITERATIONS,
            before_capture: Optional[Callable[[], None]] = None) -> CapturedGraph:
    """Call ``fn`` ``warmup`` times on a side stream, then ``before_capture()``, then capture one
    call of ``fn`` on that stream into a new graph with a private memory pool.

    ``fn`` must read its inputs from, and leave its results in, tensors that outlive the capture
    (static buffers, parameters): a replay runs the recorded kernels on the same addresses.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        if before_capture is not None:
            before_capture()
    torch.cuda.current_stream().wait_stream(stream)
    # torch.cuda.graph empties the allocator's cache on entry; doing it first makes the reserved
    # bytes before and after capture differ by the private pool alone.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
        output = fn()
    return CapturedGraph(graph, output, torch.cuda.memory_reserved() - reserved)


@contextlib.contextmanager
def value_checks_off(model: torch.nn.Module):
    """Switch the model's host-syncing input value checks off (``model.check_values``) inside."""
    previous = getattr(model, "check_values", True)
    model.check_values = False
    try:
        yield
    finally:
        model.check_values = previous


def _signature(tensors: Sequence[Optional[torch.Tensor]]) -> Tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device.type) for t in tensors)


def _describe(signature: Tuple) -> str:
    return ", ".join("None" if s is None else f"{list(s[0])} {str(s[1]).replace('torch.', '')}" for s in signature)


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _static_inputs(sources: Sequence[Optional[torch.Tensor]], model: torch.nn.Module,
                   device: torch.device) -> List[Optional[torch.Tensor]]:
    """Device buffers holding a copy of ``(x, s_x, s_y, y)``: images in the model's floating dtype."""
    dtype = _float_dtype(model)
    buffers = []
    for i, source in enumerate(sources):
        if source is None:
            buffers.append(None)
            continue
        buffer = torch.empty(source.shape, dtype=dtype if i < NUM_IMAGE_INPUTS else source.dtype, device=device)
        buffers.append(buffer.copy_(source))
    return buffers


# --------------------------------------------------------------------------- training
class GraphedStep:
    """An IPMT training step captured as one CUDA graph and replayed.

    One replay is the whole iteration of :meth:`ipmt_fast.train.Trainer.train_step`: forward with
    the losses (``main + aux_weight * aux``), backward, gradient-norm clipping when
    ``clip_grad_norm`` is set, and every optimiser's step, at the learning rates found in the
    optimisers' ``param_groups`` when :meth:`step` is called (the schedule keeps writing floats
    there; they are copied into the graph's device-side rates before each replay).

    Args:
        model: an :class:`ipmt_fast.IPMT` on a CUDA device, in training mode.
        optimizers: SGD and/or Adam/AdamW optimisers over its parameters. They are switched to
            their graph-safe forms (see :func:`configure_optimizers_for_graphs`).
        amp: ``none`` or ``bf16`` autocast (``fp16`` needs a gradient scaler and is refused).
        clip_grad_norm: clip the gradients' total norm to this value (None: no clipping).
        aux_weight: weight of the duplex (aux) loss in the optimised loss.
        recapture_on_shape_change: a batch of another shape or dtype recaptures the graph (True),
            or raises :class:`CudaGraphError` (False).
        warmup: eager iterations before each capture. Their effect on the parameters and the
            optimiser state is undone, so the first replay takes the step an eager run would.

    The first :meth:`step` (and the first after :meth:`invalidate` or a change of input shape)
    warms up and captures, on that batch. ``captures`` counts the captures; ``pool_bytes`` is the
    device memory the current graph's pool reserved. Call :meth:`invalidate` after replacing
    optimiser state (``load_state_dict``): the graph holds the addresses of the old tensors.
    """

    def __init__(self, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], *, amp: str = "none",
                 clip_grad_norm: Optional[float] = None, aux_weight: float = 1.0,
                 recapture_on_shape_change: bool = True, warmup: int = WARMUP_ITERATIONS):
        self.device = next(model.parameters()).device
        check_training_support(self.device, amp)
        if warmup < 1:  # the optimisers' lazily created state must exist before capture
            raise ValueError(f"warmup must be >= 1 iteration, got {warmup}")
        self.model, self.optimizers = model, list(optimizers)
        configure_optimizers_for_graphs(self.optimizers, True)  # refuses unsupported ones now, not at capture
        self.amp, self.clip_grad_norm, self.aux_weight = amp, clip_grad_norm, aux_weight
        self.recapture_on_shape_change, self.warmup = recapture_on_shape_change, warmup
        self._groups = [group for opt in self.optimizers for group in opt.param_groups]
        # One device vector of learning rates, each group reading its own element: a single copy
        # per step writes them all.
        self._lrs = torch.zeros(len(self._groups), dtype=torch.float32, device=self.device)
        self.captures = 0
        self._graph: Optional[CapturedGraph] = None
        self._inputs: List[torch.Tensor] = []
        self._signature: Optional[Tuple] = None

    @property
    def pool_bytes(self) -> Optional[int]:
        """Device memory reserved by the current graph's private pool (None before capture)."""
        return None if self._graph is None else self._graph.pool_bytes

    def invalidate(self) -> None:
        """Drop the captured graph (and its memory); the next :meth:`step` captures again."""
        self._graph, self._inputs, self._signature = None, [], None

    def step(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One training step on ``batch`` (a collated episode batch: ``image``,
        ``support_images``, ``support_labels``, ``label``, on the CPU, pinned or not, or on the
        device). Returns ``loss``, ``main_loss`` and ``aux_loss`` as 0-dim device tensors of this
        step (copies: later replays do not change them)."""
        sources = [batch[key] for key in INPUT_KEYS]
        signature = _signature(sources)
        if signature != self._signature:
            if self._signature is not None and not self.recapture_on_shape_change:
                raise CudaGraphError(f"the captured training step takes inputs {_describe(self._signature)}; "
                                     f"got {_describe(signature)} (recapture_on_shape_change=False)")
            self._capture(sources, signature)
        for buffer, source in zip(self._inputs, sources):
            buffer.copy_(source, non_blocking=True)
        self._write_learning_rates()
        self._graph.replay()
        return dict(zip(LOSS_NAMES, self._graph.output.clone().unbind()))

    # ----------------------------------------------------------------------------------------
    def _write_learning_rates(self) -> None:
        # From pageable host memory a non-blocking copy is staged before it returns, so the
        # temporary host tensor may go at once.
        values = torch.tensor([float(group["lr"]) for group in self._groups], dtype=torch.float32)
        self._lrs.copy_(values, non_blocking=True)

    @contextlib.contextmanager
    def _device_learning_rates(self):
        """The groups read the device rates while warming up and capturing; floats again after,
        so ``state_dict()`` and the schedule see plain numbers."""
        floats = [group["lr"] for group in self._groups]
        self._write_learning_rates()
        for i, group in enumerate(self._groups):
            group["lr"] = self._lrs[i]
        try:
            yield
        finally:
            for group, lr in zip(self._groups, floats):
                group["lr"] = lr

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _iteration(self) -> torch.Tensor:
        """The captured work: the same sequence as the eager ``Trainer.train_step``."""
        self._zero_grad()
        x, s_x, s_y, y = self._inputs
        with autocast(self.device, self.amp, cache_enabled=False):
            _, main_loss, aux_loss = self.model(x, s_x, s_y, y)
        loss = main_loss + self.aux_weight * aux_loss
        loss.backward()
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.clip_grad_norm)
        for opt in self.optimizers:
            opt.step()
        return torch.stack([loss, main_loss, aux_loss]).detach()

    def _capture(self, sources: Sequence[torch.Tensor], signature: Tuple) -> None:
        if not self.model.training:
            raise CudaGraphError("GraphedStep captures a training step: call model.train() first")
        self.invalidate()  # the old graph's memory goes before the new one is captured
        configure_optimizers_for_graphs(self.optimizers, True)  # again: load_state_dict may have replaced state
        self._inputs = _static_inputs(sources, self.model, self.device)
        snapshot = _WarmupSnapshot(self.optimizers)

        def before_capture():
            snapshot.restore()
            self._zero_grad()

        with value_checks_off(self.model), self._device_learning_rates(), _quiet_capturable_warning():
            self._graph = capture(self._iteration, self.warmup, before_capture)
        self._signature = signature
        self.captures += 1


@contextlib.contextmanager
def _quiet_capturable_warning():
    # A capturable optimiser warns when it steps outside a capture, as the warm-up does on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield


# --------------------------------------------------------------------------- inference
class GraphedForward:
    """An IPMT inference forward captured once per input signature (shapes, dtypes) and replayed.

    ``GraphedForward(model)(x, s_x, s_y, y=None)`` returns what ``model(x, s_x, s_y, y)`` returns
    in eval mode (the logits, a copy), under ``torch.no_grad`` and the ``amp`` autocast. Inputs
    may be on the CPU or the device; they are copied into the graph's static buffers. The graphs
    of the last ``max_shapes`` signatures are kept; the model's weights may change between calls
    (a graph reads them in place), its modules may not.
    """

    def __init__(self, model: torch.nn.Module, amp: str = "none", max_shapes: int = MAX_CACHED_SHAPES,
                 warmup: int = WARMUP_ITERATIONS):
        self.device = next(model.parameters()).device
        require_cuda(self.device)
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.model, self.amp, self.max_shapes, self.warmup = model, amp, max_shapes, warmup
        self._graphs: "OrderedDict[Tuple, Tuple[List[Optional[torch.Tensor]], CapturedGraph]]" = OrderedDict()

    @property
    def captures(self) -> int:
        """Graphs held now (one per input signature seen, at most ``max_shapes``)."""
        return len(self._graphs)

    def __call__(self, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor,
                 y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.model.training:
            raise CudaGraphError("GraphedForward captures inference: call model.eval() first")
        sources = [x, s_x, s_y, y]
        signature = _signature(sources)
        if signature not in self._graphs:
            self._graphs[signature] = self._capture(sources)
            if len(self._graphs) > self.max_shapes:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(signature)
        buffers, graph = self._graphs[signature]
        for buffer, source in zip(buffers, sources):
            if buffer is not None:
                buffer.copy_(source, non_blocking=True)
        graph.replay()
        return graph.output.clone()

    def _capture(self, sources: Sequence[Optional[torch.Tensor]]):
        buffers = _static_inputs(sources, self.model, self.device)

        @torch.no_grad()
        def forward():
            with autocast(self.device, self.amp, cache_enabled=False):
                return self.model(*buffers)

        with value_checks_off(self.model):
            return buffers, capture(forward, self.warmup)
