"""Each op's backend chosen by measurement, end to end, on the machine and shapes at hand.

``auto`` takes each op's backend from a fixed per-device preference list (``ipmt_fast.ops.registry``),
which measurements on one machine chose. Which backend is cheapest depends on the device, the
shapes and whether the host or the kernels set the pace: at IPMT's batch of 4 a GPU waits on the
host issuing ops, at large maps on the kernels. :func:`tune_backends` times the user's own call
(a forward and backward of a typical batch) with each candidate backend of one op while the
others stay fixed, keeps the fastest, and goes on to the next op (one pass of coordinate descent:
the ops' costs add up nearly independently, and a full search would cost the product of the
candidates). Every backend computes the same values up to rounding and draws the same dropout
masks, so the choice changes time only.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from .ops import registry

# Rounds of timed calls per candidate (the candidates interleaved in each round, so that a drift of
# the machine's speed falls on all of them), calls per round, and untimed calls per candidate
# first (a Triton kernel compiles, an extension loads, the allocator fills at its first calls).
DEFAULT_ROUNDS = 5
DEFAULT_CALLS_PER_ROUND = 3
DEFAULT_WARMUP = 2
# A candidate replaces the op's current backend only when it takes at least this fraction less
# time (the median of its per-round ratios): a tie within the noise keeps what ``auto`` would run.
DEFAULT_MIN_GAIN = 0.02
# Backends never tried unless named: the literal published math is the oracle, not a contender.
EXCLUDED_BY_DEFAULT = ("reference",)


@dataclass
class TuningResult:
    """What :func:`tune_backends` measured and chose.

    Attributes:
        choices: op name -> the backend it now runs with.
        timings: op name -> backend name -> median seconds of one call of ``call`` with that
            backend for the op (the ops tuned before it already on their choices); empty for an
            op with a single candidate.
        initial: op name -> the backend it ran with before tuning.
        device: the device type the model's parameters are on.
    """

    choices: Dict[str, str]
    timings: Dict[str, Dict[str, float]] = field(default_factory=dict)
    initial: Dict[str, str] = field(default_factory=dict)
    device: str = "cpu"

    def table(self) -> str:
        """The timings as text: one line per op and candidate, ``*`` on the choice."""
        lines = [f"# backends by measurement on {self.device} (ms per call; * chosen, = before tuning)"]
        for op, choice in self.choices.items():
            times = self.timings.get(op) or {choice: float("nan")}
            for backend, seconds in times.items():
                marks = ("*" if backend == choice else " ") + ("=" if backend == self.initial.get(op) else " ")
                lines.append(f"{op:34s} {backend:10s} {marks} {seconds * 1e3:10.3f}")
        return "\n".join(lines)


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    raise ValueError("model has no parameters to tell its device")


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work, so a timing covers the kernels and not only their
    issue: nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _candidates(op: str, device: torch.device, wanted: Optional[Sequence[str]], current: str) -> list:
    """The backends tried for ``op``: the named ones (or every available one but the reference)
    that can run here, in ``auto``'s order of preference, the current backend among them."""
    available = registry.available_backends(op, device.type)
    names = [b for b in available if b not in EXCLUDED_BY_DEFAULT] if wanted is None else \
        [b for b in wanted if b in available]
    preference = registry.AUTO_PREFERENCE.get(device.type, ())
    names.sort(key=lambda b: preference.index(b) if b in preference else len(preference))
    return names if current in names else [current, *names]


def _state_snapshot(model: torch.nn.Module) -> tuple:
    """Copies of the parameters, buffers and gradients ``call`` may change."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    return tensors, grads


def _restore(model: torch.nn.Module, snapshot: tuple) -> None:
    tensors, grads = snapshot
    model.load_state_dict(tensors)
    for p, grad in grads:
        p.grad = grad


def tune_backends(model: torch.nn.Module, call: Callable[[], None], *, candidates: Optional[Sequence[str]] = None,
                  rounds: int = DEFAULT_ROUNDS, calls_per_round: int = DEFAULT_CALLS_PER_ROUND,
                  warmup: int = DEFAULT_WARMUP, min_gain: float = DEFAULT_MIN_GAIN,
                  clock: Callable[[], float] = time.perf_counter, progress: bool = False) -> TuningResult:
    """Choose each op's backend of ``model`` by timing ``call``, and set the model to the choices.

    For each op the model calls (``model.ops``, in that order), ``call`` runs with each candidate
    backend for that op, the ops before it on their choices and those after it as they were,
    the candidates in turn in every round; the op keeps its current backend unless a candidate's
    time over the current backend's, round by round, has a median at least ``min_gain`` below 1. The
    model ends with ``model.set_backend(model.backend, choices)``: ``model.backend`` (and with it
    the backbone's folding) is unchanged.

    Tune before capturing CUDA graphs or calling ``torch.compile`` (both fix the ops they saw).
    The model's parameters, buffers and gradients and the random number generators' states are
    restored afterwards, so tuning changes what runs, not what a run computes; optimiser states
    are not: ``call`` should not step one.

    Args:
        model: an :class:`ipmt_fast.IPMT` or :class:`ipmt_fast.IPMTransformer`.
        call: one unit of the work to be sped up, e.g. a forward and backward of a typical batch.
        candidates: backend names to try (default: every backend of the op that runs on the
            model's device, but ``reference``); a name an op lacks is skipped for that op.
        rounds, calls_per_round, warmup: timed rounds per candidate (interleaved), calls per
            round, untimed calls per candidate before them.
        min_gain: the fraction of time a candidate must save (median of the per-round ratios) to
            replace the current backend.
        clock: seconds, monotonic (the device is synchronised before each reading).
        progress: show a progress bar.

    Returns:
        A :class:`TuningResult` with the choices and the median time of ``call`` per candidate.
    """
    if not all(hasattr(model, name) for name in ("ops", "op_backend", "op_backends", "set_backend")):
        raise TypeError(f"model must be an ipmt_fast.IPMT or IPMTransformer (pass the module itself, not one "
                        f"wrapped in DDP or another module), got {type(model).__name__}")
    if not callable(call):
        raise TypeError(f"call must be a function of no arguments, got {type(call).__name__}")
    for name, value in (("rounds", rounds), ("calls_per_round", calls_per_round)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain!r}")
    if candidates is not None:
        unknown = [b for b in candidates if b not in registry.BACKENDS]
        if unknown:
            raise ValueError(f"candidates must be backend names from {registry.BACKENDS}, got {unknown}")
    device = _model_device(model)
    sync = _synchronizer(device)
    backend = model.backend
    initial = {op: registry.selected_backend(op, model.op_backend(op), device) for op in model.ops}
    tried = {op: _candidates(op, device, candidates, initial[op]) for op in model.ops}
    choices: Dict[str, str] = dict(initial)
    timings: Dict[str, Dict[str, float]] = {}

    def per_call(names: Mapping[str, str], calls: int) -> float:
        model.set_backend(backend, names)
        sync()
        start = clock()
        for _ in range(calls):
            call()
        sync()
        return (clock() - start) / calls

    total = sum(len(names) * (warmup + rounds * calls_per_round) for names in tried.values() if len(names) > 1)
    snapshot, before = _state_snapshot(model), dict(model.op_backends)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), \
                tqdm(total=total, desc="tuning backends", unit="call", disable=not progress) as bar:
            for op, names in tried.items():
                if len(names) < 2:
                    continue
                for name in names:
                    if warmup:
                        per_call({**choices, op: name}, warmup)
                        bar.update(warmup)
                samples: Dict[str, list] = {name: [] for name in names}
                for r in range(rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        samples[name].append(per_call({**choices, op: name}, calls_per_round))
                        bar.update(calls_per_round)
                timings[op] = {name: statistics.median(times) for name, times in samples.items()}
                # Judged round by round against the current backend (a paired ratio: the machine's
                # drift between rounds cancels), the first of equals in auto's order.
                current = samples[choices[op]]
                ratios = {name: statistics.median(t / c for t, c in zip(times, current))
                          for name, times in samples.items()}
                fastest = min(names, key=ratios.__getitem__)
                if ratios[fastest] < 1 - min_gain:
                    choices[op] = fastest
    except BaseException:
        model.set_backend(backend, before)
        raise
    finally:
        _restore(model, snapshot)
    model.set_backend(backend, choices)
    return TuningResult(choices=choices, timings=timings, initial=initial, device=device.type)
