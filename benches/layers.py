"""Per-layer-count benchmark: the IPMT transformer alone (forward + backward) and the full
network's training step (forward + backward + optimizer step), every backend side by side.

    python -m benches.layers                                     # defaults sized for the device found
    python -m benches.layers --bench transformer --layers 1,3,5,8 --batch 4 --dtypes bf16,fp32
    python -m benches.layers --bench transformer --layers 5 --compile-layers 5   # + torch.compile variants
    python -m benches.layers --bench step --backends reference,auto,reference+graphs,auto+graphs   # CUDA

For each layer count L one model is built (seeded, so every L starts from the same kind of
weights) and every variant runs on that same model (``backend`` is switched between calls),
interleaved round by round after warm-up. A variant is ``<backend>[+recompute][+channels_last][+graphs]``:
backends are those of ``ipmt_fast.ops.registry.BACKENDS`` that are registered for at least one op
and can run on the device (the others are skipped with the reason), and ``auto``; ``+recompute``
turns on ``recompute_ffn``; ``+channels_last`` (step bench) runs the feature maps channels-last
(``IPMT.set_channels_last``); ``+graphs`` (CUDA only) captures the whole timed call in a CUDA graph
and replays it (transformer: forward + backward; step: ``ipmt_fast.train.GraphedStep``).
``--compile-layers`` adds ``torch.compile`` variants at those layer counts (transformer bench only):
``compile(<backend>[,<setting>])`` compiles a copy of the transformer configured as ``<backend>``;
``<setting>`` is a ``torch.compile`` mode (``reduce-overhead``, ``max-autotune``, ...) or the name of
a boolean Inductor option to turn on (``cpp_wrapper``: the generated code calls kernels and ops
from C++ instead of Python).

dtype ``fp32`` runs plain float32; ``bf16`` runs the forward under ``torch.autocast`` with bfloat16
(the backward outside it, as recommended). Inputs are random features / images with
rectangular foreground masks and a band of 255 padding at the bottom of the query label.

Memory per configuration (one extra call after timing, three on the CPU): the peak allocated
bytes above what was allocated before the call (on CUDA the caching allocator's counters,
``+graphs``: the bytes the graph's private pool reserved, which a graphed step holds between
replays; on the CPU the profiler's allocation events, ``common.cpu_peak_bytes``); everywhere the
bytes autograd saved for backward (unique storages, parameters and buffers excluded); on the CPU
also the process's peak resident set.
Host work per configuration (one more untimed call, after the memory one): the ops dispatched
(``ipmt_fast.instrument.DispatchCounter``; not for compiled variants, whose generated code calls
kernels directly) and the host syncs among them, and on CUDA the kernels launched (``torch.profiler``).
The summary fits time, memory, ops and kernels per layer (least-squares slope over L).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch._dynamo
import torch._inductor
import torch._inductor.config as inductor_config

import ipmt_fast
from ipmt_fast.constants import FOREGROUND_LABEL, IGNORE_LABEL, OUTPUT_STRIDE
from ipmt_fast.ops import extension, registry
from ipmt_fast.model.transformer import IPMTransformer
from ipmt_fast.train import graphs
from ipmt_fast.train.config import TrainConfig
from ipmt_fast.train.trainer import build_optimizers

from . import common

BENCHES = ("transformer", "step")
# torch.compile variants: compile(<backend>[,<setting>]), a compiled copy configured as <backend>,
# <setting> a torch.compile mode or a boolean Inductor option turned on (compile_settings).
COMPILE_VARIANT = "compile(reference)"
MAX_AUTOTUNE_VARIANT = "compile(reference,max-autotune)"
COMPILE_VARIANTS = (COMPILE_VARIANT, MAX_AUTOTUNE_VARIANT, "compile(auto)")
COMPILE_PATTERN = re.compile(r"^compile\((?P<backend>[\w+]+)(?:,(?P<setting>[\w-]+))?\)$")
# Fraction of the query label's rows at the bottom set to 255 (padding), as after a resize + pad.
PADDED_ROW_FRACTION = 0.125
SEED = 0
# The published optimisers (IPMT_SPEC section 4, as the trainer builds them) at a learning rate
# of 0: the optimisers do the same arithmetic while the weights stay put, so hundreds of benchmark
# steps on random data cannot diverge (with the published rates a random-weight network's losses
# blow up within a few steps).
BENCH_LR = 0.0

DEFAULTS = {
    # 2-core CPU: B=1, fp32, few layer counts and repeats.
    "cpu": dict(layers="1,3,5", batch=1, dtypes="fp32", warmup=1, repeats=5, compile_layers="", quiet_wait=30.0),
    "cuda": dict(layers="1,3,5,8", batch=4, dtypes="bf16,fp32", warmup=3, repeats=10, compile_layers="",
                 quiet_wait=0.0),
}
# --regime host: IPMT's batch (4 episodes) at sizes where every kernel is nearly free, so a call's
# time is the host's (Python, autograd, dispatcher, launches): what paces a GPU at IPMT's batch
# sizes. One thread on the CPU. Eager and torch.compile side by side, per layer (slope over L).
# A sample is many back-to-back calls there (at least HOST_SAMPLE_MS): single calls of a few ms,
# each after the quiet gate's wait, measured cold caches (IQR 25-56% against 2-14% warm).
HOST_SAMPLE_MS = 200.0
HOST_REGIME = dict(bench="transformer,step", layers="1,5", batch=4, image_size=17, width=32, dtypes="fp32",
                   threads=1, warmup=3, repeats=15, tag="layers-host", backends="reference,auto",
                   min_sample_ms=HOST_SAMPLE_MS)
HOST_COMPILE_VARIANTS = {"cpu": "compile(reference),compile(auto),compile(reference,cpp_wrapper),"
                                "compile(auto,cpp_wrapper)",
                         "cuda": "compile(reference),compile(reference,reduce-overhead),compile(auto)"}


# A variant is a model-wide backend name, optionally with these suffixes: +recompute, the
# transformer's FFNs recompute their hidden activations in backward instead of keeping them
# (``recompute_ffn``); +channels_last, the network's feature maps run channels-last
# (``IPMT.set_channels_last``); +tuned, each op's backend chosen by timing the variant's own call
# (``ipmt_fast.tune_backends``, before the timed calls); +graphs, the timed call is captured in a
# CUDA graph and replayed.
RECOMPUTE_SUFFIX = "+recompute"
CHANNELS_LAST_SUFFIX = "+channels_last"
TUNED_SUFFIX = "+tuned"
GRAPHS_SUFFIX = "+graphs"
# Variants run by default, after every runnable backend: what users get, and its graphed forms.
DEFAULT_EXTRA_VARIANTS = ("auto", "auto" + RECOMPUTE_SUFFIX)
DEFAULT_GRAPH_VARIANTS = ("reference" + GRAPHS_SUFFIX, "auto" + GRAPHS_SUFFIX)


class Variant(NamedTuple):
    backend: str
    recompute: bool
    graphed: bool
    channels_last: bool = False
    tuned: bool = False


def split_variant(variant: str) -> Variant:
    """The parts of a variant ``<backend>[+recompute][+channels_last][+tuned][+graphs]`` (in that
    order)."""
    rest = variant
    flags = []
    for suffix in (GRAPHS_SUFFIX, TUNED_SUFFIX, CHANNELS_LAST_SUFFIX, RECOMPUTE_SUFFIX):
        flags.append(rest.endswith(suffix))
        rest = rest.removesuffix(suffix)
    graphed, tuned, channels_last, recompute = flags
    return Variant(rest, recompute, graphed, channels_last, tuned)


def parse_compile_variant(variant: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(backend, setting)`` of ``compile(<backend>[,<setting>])``; None for other variants."""
    match = COMPILE_PATTERN.match(variant)
    return (match["backend"], match["setting"]) if match else None


def compile_settings(setting: Optional[str]) -> dict:
    """``torch.compile`` keyword arguments for a variant's ``<setting>``: ``mode=`` for one of
    torch.compile's modes, ``options={setting: True}`` for a boolean Inductor option (torch.compile
    takes one or the other). Raises ValueError naming the setting otherwise."""
    if setting is None:
        return {}
    if setting in torch._inductor.list_mode_options():
        return {"mode": setting}
    if isinstance(inductor_config.get_config_copy().get(setting), bool):
        return {"options": {setting: True}}
    raise ValueError(f"compile setting {setting!r} is neither a torch.compile mode "
                     f"({', '.join(torch._inductor.list_mode_options())}) nor a boolean Inductor option")


def parse_compile_list(text: str) -> List[str]:
    """Comma-separated ``compile(...)`` variants (commas inside the parentheses kept)."""
    return [v.strip() for v in re.findall(r"[^,(]+(?:\([^)]*\))?", text) if v.strip()]


def configure(model: torch.nn.Module, variant: str) -> None:
    """Set ``model`` (an ``IPMT`` or ``IPMTransformer``) up as ``variant``."""
    parts = split_variant(variant)
    model.set_backend(parts.backend)
    model.set_recompute_ffn(parts.recompute)
    if parts.channels_last:
        if not hasattr(model, "set_channels_last"):
            raise ValueError(f"variant {variant!r}: {CHANNELS_LAST_SUFFIX} applies to the whole network "
                             "(the step bench), not to the transformer alone")
        model.set_channels_last(True)


def candidate_backends(device: torch.device, wanted: Optional[List[str]] = None, log=print) -> List[str]:
    """Variants worth running on ``device``: ``reference``, then every other backend name that
    some op registers and that can run there for each op having it, then ``auto`` (what a user
    gets by default; its per-op choice is logged) and ``auto+recompute`` (see ``RECOMPUTE_SUFFIX``),
    and on CUDA ``reference+graphs`` and ``auto+graphs``. A name some op lacks stays in: if the
    model cannot route it, its warm-up fails and the reason is reported. ``+graphs`` variants are
    skipped off CUDA, with the reason logged."""
    ops = list(registry.registered_ops())
    defaults = (*registry.BACKENDS, *DEFAULT_EXTRA_VARIANTS) + (DEFAULT_GRAPH_VARIANTS if device.type == "cuda" else ())
    chosen = []
    for variant in wanted or defaults:
        parts = split_variant(variant)
        backend, graphed = parts.backend, parts.graphed
        if graphed and device.type != "cuda":
            log(f"# skipping {variant!r}: CUDA graphs need a CUDA device, this run is on {device.type}")
            continue
        if backend == "auto":
            picks = ", ".join(f"{op}: {registry.selected_backend(op, 'auto', device)}" for op in ops)
            log(f"# auto on {device.type} -> {picks}")
            chosen.append(variant)
            continue
        having = [op for op in ops if backend in registry.registered_backends(op)]
        if not having:
            log(f"# skipping backend {backend!r}: no op registers it")
            continue
        reasons = []
        for op in having:
            try:
                registry.get_implementation(op, backend, device)
            except (RuntimeError, ValueError) as exc:
                reasons.append(str(exc))
        if reasons:
            log(f"# skipping backend {backend!r}: {reasons[0]}")
            continue
        chosen.append(variant)
    return chosen


def autocast_for(dtype_name: str, device: torch.device, cache_enabled: bool = True):
    """A factory of autocast contexts for ``dtype_name`` (``cache_enabled=False`` for graph capture)."""
    if dtype_name == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=common.DTYPES[dtype_name], cache_enabled=cache_enabled)


def amp_name(dtype_name: str) -> str:
    """The ``ipmt_fast.train`` autocast name of a bench dtype (``fp32`` -> ``none``)."""
    return "none" if dtype_name == "fp32" else dtype_name


class CapturedRun:
    """A bench call captured in a CUDA graph at its first call (after ``graphs.capture``'s eager
    warm-up) and replayed at every call."""

    def __init__(self, run: Callable[[], None]):
        self.run, self.captured = run, None

    def __call__(self) -> None:
        if self.captured is None:
            self.captured = graphs.capture(self.run)
        self.captured.replay()

    @property
    def pool_bytes(self) -> Optional[int]:
        return None if self.captured is None else self.captured.pool_bytes


def _random_span(size: int, generator: torch.Generator) -> slice:
    """A random interval of at least a quarter of ``size``, starting in its first half."""
    start = int(torch.randint(0, max(size // 2, 1), (1,), generator=generator))
    length = int(torch.randint(max(size // 4, 1), size - start + 1, (1,), generator=generator))
    return slice(start, start + length)


def _rectangle_labels(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Labels ``(..., H, W)``: 0 background with one random foreground rectangle per map."""
    *lead, height, width = shape
    labels = torch.zeros(*lead, height, width)
    for m in labels.view(-1, height, width):
        m[_random_span(height, generator), _random_span(width, generator)] = FOREGROUND_LABEL
    return labels.to(device)


def _query_labels(b, height, width, generator, device) -> torch.Tensor:
    labels = _rectangle_labels((b, height, width), generator, device)
    labels[:, height - int(height * PADDED_ROW_FRACTION):] = IGNORE_LABEL
    return labels


class TransformerBench:
    """The transformer alone: forward, then backward of random gradients into every output."""

    name = "transformer"

    def __init__(self, num_layers, batch, shot, image_size, width, device):
        torch.manual_seed(SEED)
        self.device, self.num_layers = device, num_layers
        self.model = IPMTransformer(embed_dims=width, num_layers=num_layers, shot=shot).to(device).train()
        h = (image_size - 1) // OUTPUT_STRIDE + 1
        g = torch.Generator().manual_seed(SEED)
        self.x = torch.randn(batch, width, h, h, device=device, requires_grad=True)
        self.s_x = torch.randn(batch * shot, width, h, h, device=device, requires_grad=True)
        self.qry_labels = _query_labels(batch, image_size, image_size, g, device)
        self.supp_labels = _rectangle_labels((batch, shot, image_size, image_size), g, device)
        self.init_mask = _rectangle_labels((batch, h, h), g, device).long()
        self.tokens = h * h
        self._grads: Dict[str, List[torch.Tensor]] = {}
        self._copies: Dict[str, torch.nn.Module] = {}

    def module_for(self, variant: str) -> torch.nn.Module:
        """A copy of the model configured as ``variant`` once (same weights for every variant, and no
        reconfiguring inside the timed call)."""
        if variant not in self._copies:
            self._copies[variant] = copy.deepcopy(self.model)
            configure(self._copies[variant], variant)
        return self._copies[variant]

    def parameters_and_buffers(self) -> List[torch.Tensor]:
        modules = [self.model, *self._copies.values()]
        return [t for m in modules for t in (*m.parameters(), *m.buffers())]

    def _outputs(self, module, autocast):
        with autocast():
            feats, query_logits, support_logits = module(self.x, self.qry_labels, self.s_x, self.supp_labels,
                                                         self.init_mask)
        return [feats[0], *query_logits, *support_logits]

    def runner(self, backend: str, dtype_name: str, module: Optional[torch.nn.Module] = None,
               cache_enabled: bool = True) -> Callable[[], None]:
        module = self.module_for(backend) if module is None else module
        autocast = autocast_for(dtype_name, self.device, cache_enabled)
        # Gradients reset as an optimiser's zero_grad does, over a list (Module.zero_grad walks the
        # module tree: 2.8M instructions a call at the host-bound shapes, a tenth of a fused step).
        parameters = list(module.parameters())

        def run():
            for p in parameters:
                p.grad = None
            self.x.grad = self.s_x.grad = None
            outs = self._outputs(module, autocast)
            if dtype_name not in self._grads:  # random output gradients, drawn once per dtype
                self._grads[dtype_name] = [torch.randn_like(o) for o in outs]
            grads = [g if g.dtype == o.dtype else g.to(o.dtype) for g, o in zip(self._grads[dtype_name], outs)]
            torch.autograd.backward(outs, grads)
        return run

    def graphed_runner(self, variant: str, dtype_name: str) -> CapturedRun:
        """Forward + backward captured in a CUDA graph (same inputs and output gradients)."""
        return CapturedRun(self.runner(variant, dtype_name, cache_enabled=False))

    def compiled(self, backend: str, setting: Optional[str]) -> torch.nn.Module:
        """``torch.compile`` of a copy of the transformer configured as ``backend``, as one graph
        (``fullgraph``: the transformer has no graph break, tests/test_compile.py), with the
        variant's ``setting`` (``compile_settings``)."""
        clone = copy.deepcopy(self.model)
        configure(clone, backend)
        return torch.compile(clone, fullgraph=True, **compile_settings(setting))


class StepBench:
    """The full network's training step: forward (losses), backward, SGD + AdamW steps. The
    ``reference`` variant steps with the published optimisers in PyTorch's default form, the others
    with the trainer's (``ipmt_fast.train.build_optimizers``: fused where PyTorch has it)."""

    name = "step"

    def __init__(self, num_layers, batch, shot, image_size, width, device, backbone_layers=50):
        torch.manual_seed(SEED)
        self.device, self.num_layers = device, num_layers
        self.model = ipmt_fast.IPMT(layers=backbone_layers, shot=shot, reduce_dim=width, num_layers=num_layers,
                                    backend="reference").to(device).train()
        g = torch.Generator().manual_seed(SEED)
        self.images = torch.randn(batch, 3, image_size, image_size, device=device)
        self.supp_images = torch.randn(batch, shot, 3, image_size, image_size, device=device)
        self.supp_labels = _rectangle_labels((batch, shot, image_size, image_size), g, device)
        self.labels = _query_labels(batch, image_size, image_size, g, device)
        self.tokens = ((image_size - 1) // OUTPUT_STRIDE + 1) ** 2
        self._copies: Dict[str, Tuple[torch.nn.Module, List[torch.optim.Optimizer]]] = {}

    def make_optimizers(self, model: torch.nn.Module, published: bool) -> List[torch.optim.Optimizer]:
        """The published pair (SGD outside the transformer, AdamW inside) at ``BENCH_LR``, in
        PyTorch's default form (``published``) or the trainer's."""
        cfg = TrainConfig(base_lr=BENCH_LR, transformer_lr=BENCH_LR)
        return list(build_optimizers(model, cfg, fast=not published))

    def copy_for(self, variant: str) -> Tuple[torch.nn.Module, List[torch.optim.Optimizer]]:
        """A copy of the network configured as ``variant`` once, with its own optimisers."""
        if variant not in self._copies:
            model = copy.deepcopy(self.model)
            configure(model, variant)
            published = split_variant(variant).backend == "reference"
            self._copies[variant] = model, self.make_optimizers(model, published)
        return self._copies[variant]

    def module_for(self, variant: str) -> torch.nn.Module:
        """The network configured as ``variant`` (see :meth:`copy_for`)."""
        return self.copy_for(variant)[0]

    def parameters_and_buffers(self) -> List[torch.Tensor]:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for model, optimizers in self._copies.values():
            tensors += list(model.parameters()) + list(model.buffers())
            tensors += [t for opt in optimizers for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor)]
        return tensors

    def runner(self, backend: str, dtype_name: str, module=None) -> Callable[[], None]:
        autocast = autocast_for(dtype_name, self.device)
        model, optimizers = self.copy_for(backend)

        def run():
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with autocast():
                _, main_loss, aux_loss = model(self.images, self.supp_images, self.supp_labels, self.labels)
            (main_loss + aux_loss).backward()
            for opt in optimizers:
                opt.step()
        return run

    def graphed_runner(self, variant: str, dtype_name: str) -> "GraphedStepRun":
        """The step through ``ipmt_fast.train.GraphedStep``, with optimisers of its own (it
        switches them to their graph-safe forms)."""
        return GraphedStepRun(self, variant, dtype_name)


class GraphedStepRun:
    """One :class:`ipmt_fast.train.GraphedStep` step on the bench's batch per call (the batch
    copied into the graph's input buffers, as a training loop copies each loader batch)."""

    def __init__(self, bench: StepBench, variant: str, dtype_name: str):
        model, optimizers = bench.copy_for(variant)
        self.step = graphs.GraphedStep(model, optimizers, amp=amp_name(dtype_name), aux_weight=1.0)
        self.batch = {"image": bench.images, "support_images": bench.supp_images,
                      "support_labels": bench.supp_labels, "label": bench.labels}

    def __call__(self) -> None:
        self.step.step(self.batch)

    @property
    def pool_bytes(self) -> Optional[int]:
        return self.step.pool_bytes


def build_variants(bench, backends: List[str], compile_variants: List[str], dtype_name: str,
                   log=print) -> Dict[str, Callable]:
    """The timed call of every variant (``compile(...)`` ones compile lazily, at their first call;
    ``+tuned`` ones are tuned here, on their eager call, before any capture)."""
    variants = {}
    for variant in backends:
        parts = split_variant(variant)
        if parts.tuned:
            result = ipmt_fast.tune_backends(bench.module_for(variant), bench.runner(variant, dtype_name))
            log(f"# {variant}, {bench.name} L={bench.num_layers} {dtype_name}:\n{result.table()}")
        variants[variant] = (bench.graphed_runner(variant, dtype_name) if parts.graphed
                             else bench.runner(variant, dtype_name))
    for variant in compile_variants:
        backend, setting = parse_compile_variant(variant)
        variants[variant] = bench.runner(backend, dtype_name, module=bench.compiled(backend, setting))
    return variants


def arithmetic_twin(variant: str) -> str:
    """The variant made of ATen ops that does ``variant``'s arithmetic, whose FLOPs
    ``common.count_flops`` can see: the reference for itself, the ``torch`` form for every fused
    backend (whose ops implement its algebra: the same products), with the same recompute and
    layout, not graphed."""
    parsed = split_variant(variant)
    return (("reference" if parsed.backend == "reference" else "torch") + (RECOMPUTE_SUFFIX if parsed.recompute else "")
            + (CHANNELS_LAST_SUFFIX if parsed.channels_last else ""))


def flop_bound_fields(flops: int, peak_flops: float) -> dict:
    """GFLOP of one call and the time they take at the machine's measured dense peak: no
    implementation of that arithmetic is faster here."""
    return dict(gflop=flops / 1e9, peak_gflops=peak_flops / 1e9, flop_bound_ms=flops / peak_flops * 1e3)


def host_work(name: str, run: Callable[[], None], device: torch.device) -> dict:
    """Ops dispatched (and host syncs among them) and CUDA kernels launched by one untimed call.
    On the CPU, where the compiled ops run loops of their own, also ``inner_ops_cuda_form`` and
    ``device_ops_cuda_form``: the counts with those loops off, as the compositions their CUDA
    kernels run, so the CPU's count does not flatter what a GPU will issue."""
    work = {} if parse_compile_variant(name) else common.count_dispatches(run)
    if work.get("inner_ops") and device.type == "cpu" and extension.unavailable_reason("cpu") is None:
        with extension.cpu_paths(False):
            cuda_form = common.count_dispatches(run)
        work.update(inner_ops_cuda_form=cuda_form["inner_ops"], device_ops_cuda_form=cuda_form["device_ops"])
    work["cuda_kernels"] = common.count_cuda_kernels(run, device)
    return work


def bench_layer_count(bench, backends: List[str], dtype_name: str, compile_variants: List[str], args,
                      device: torch.device, log=print) -> List[dict]:
    if compile_variants:
        # Each compiled variant is its own module instance, so Dynamo compiles the transformer's code
        # once per variant; within a run they would pass its per-code recompile limit (8). The
        # variants of earlier configurations are not called again: their compiled code is dropped.
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(compile_variants))
    variants = build_variants(bench, backends, compile_variants, dtype_name, log)
    failures: Dict[str, str] = {}
    stats = common.measure_interleaved(variants, device, warmup=args.warmup, repeats=args.repeats,
                                       min_sample_s=args.min_sample_ms / 1e3,
                                       failures=failures, log=log, quiet_wait_s=args.quiet_wait)
    base = dict(bench=bench.name, num_layers=bench.num_layers, dtype=dtype_name, batch=args.batch, shot=args.shot,
                image_size=args.image_size, tokens=bench.tokens, width=args.width)
    ref = stats.get("reference")
    peak_flops = common.dense_peak_flops(device, common.DTYPES[dtype_name]) if args.flop_bound else None
    flops_of_twin: Dict[str, int] = {}  # a twin counted once (auto and auto+graphs share theirs)
    rows = []
    for name, st in stats.items():
        row = dict(base, variant=name, **common.stats_fields(st))
        row["speedup_vs_reference"] = ref.median / st.median if ref else None
        row["speedup_paired"] = common.paired_ratio(ref, st) if ref else None
        compiled_ref = stats.get(compiled_reference_for(name))
        if compiled_ref is not None and compiled_ref is not st:
            row["vs_compile_paired"] = common.paired_ratio(compiled_ref, st)
        pool_bytes = getattr(variants[name], "pool_bytes", None)
        if pool_bytes is not None:
            # A replay allocates nothing and saves nothing for backward: its memory is the pool.
            row.update(peak_bytes=pool_bytes, peak_is_graph_pool=True)
        elif not args.no_memory:
            try:
                row.update(common.measure_memory(variants[name], device, excluded=bench.parameters_and_buffers()))
            except Exception as exc:  # noqa: BLE001 - reported in the row
                row["memory_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if not args.no_op_count:
            try:
                row.update(host_work(name, variants[name], device))
            except Exception as exc:  # noqa: BLE001 - reported in the row
                row["count_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if args.dense_time:
            row["dense_ms"] = common.dense_time_ms(variants[name], device)
        if peak_flops is not None and not parse_compile_variant(name):
            twin = arithmetic_twin(name)
            if twin not in flops_of_twin:
                flops_of_twin[twin] = common.count_flops(bench.runner(twin, dtype_name))
            row.update(flop_bound_fields(flops_of_twin[twin], peak_flops))
        if args.saved_breakdown and pool_bytes is None:
            print_saved_breakdown(variants[name], bench, f"{bench.name} L={bench.num_layers} {dtype_name} {name}",
                                  args.saved_breakdown, log)
        rows.append(row)
    for name, reason in failures.items():
        rows.append(dict(base, variant=name, error=reason))
    return rows


def print_saved_breakdown(run: Callable[[], None], bench, title: str, top: int, log=print) -> None:
    """One more call, its saved tensors attributed to the source lines that saved them."""
    saved = common.SavedTensorBytes(bench.parameters_and_buffers(), trace=True)
    with saved:
        run()
    log(f"# saved for backward, {title}: {common.fmt_mib(saved.nbytes)} MiB; largest sites:")
    for nbytes, count, site in saved.by_site()[:top]:
        log(f"  {common.fmt_mib(nbytes):>8} MiB  x{count:<3} {site}")


def device_ops_cuda_form(row: dict) -> Optional[int]:
    """A row's ops with device work as CUDA would run them: its own count where no CPU loop ran
    (the reference, or a run on CUDA)."""
    return row.get("device_ops_cuda_form", row.get("device_ops"))


def per_layer_rows(rows: List[dict]) -> List[dict]:
    """Least-squares slopes over L of time and memory, per bench, dtype and variant."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r.get("median_ms") is not None:
            groups.setdefault((r["bench"], r["dtype"], r["variant"]), []).append(r)
    out = []
    for (bench, dtype, variant), members in groups.items():
        ls = [r["num_layers"] for r in members]
        out.append(dict(bench=bench, dtype=dtype, variant=variant, layer_counts=",".join(map(str, sorted(ls))),
                        ms_per_layer=common.linear_slope(ls, [r["median_ms"] for r in members]),
                        host_ms_per_layer=common.linear_slope(ls, [r.get("host_median_ms") for r in members]),
                        saved_bytes_per_layer=common.linear_slope(ls, [r.get("saved_bytes") for r in members]),
                        peak_bytes_per_layer=common.linear_slope(ls, [r.get("peak_bytes") for r in members]),
                        ops_per_layer=common.linear_slope(ls, [r.get("ops") for r in members]),
                        inner_ops_per_layer=common.linear_slope(ls, [r.get("inner_ops") for r in members]),
                        inner_ops_cuda_form_per_layer=common.linear_slope(
                            ls, [r.get("inner_ops_cuda_form") for r in members]),
                        device_ops_per_layer=common.linear_slope(ls, [r.get("device_ops") for r in members]),
                        device_ops_cuda_form_per_layer=common.linear_slope(
                            ls, [device_ops_cuda_form(r) for r in members]),
                        kernels_per_layer=common.linear_slope(ls, [r.get("cuda_kernels") for r in members])))
    return out


def compiled_reference_for(variant: str) -> str:
    """What ``variant`` is compared with under torch.compile: ``compile(reference)`` with the same
    setting for a compiled variant, plain ``compile(reference)`` for an eager one."""
    parsed = parse_compile_variant(variant)
    setting = parsed[1] if parsed else None
    return f"compile(reference,{setting})" if setting else COMPILE_VARIANT


def ratio_rows(rows: List[dict], device_label: str) -> List[dict]:
    """Every non-reference variant against the reference of the same configuration."""
    refs = {(r["bench"], r["dtype"], r["num_layers"]): r for r in rows
            if r["variant"] == "reference" and r.get("median_ms") is not None}
    compiled: Dict[str, Dict[tuple, dict]] = {}
    for r in rows:
        if parse_compile_variant(r["variant"]) and r.get("median_ms") is not None:
            compiled.setdefault(r["variant"], {})[(r["bench"], r["dtype"], r["num_layers"])] = r
    out = []
    for r in rows:
        key = (r["bench"], r["dtype"], r["num_layers"])
        if r["variant"] == "reference" or r.get("median_ms") is None or key not in refs:
            continue
        ref = refs[key]
        row = dict(machine=device_label, bench=r["bench"], dtype=r["dtype"],
                   shape=f"B{r['batch']} S{r['shot']} {r['image_size']}px L{r['num_layers']}", backend=r["variant"],
                   ms=r["median_ms"], ref_ms=ref["median_ms"], speedup=ref["median_ms"] / r["median_ms"],
                   speedup_of_minima=ref["min_ms"] / r["min_ms"], speedup_paired=r.get("speedup_paired"),
                   vs_compile_paired=r.get("vs_compile_paired"))
        for field, name in (("vs_compile", compiled_reference_for(r["variant"])),
                            ("vs_compile_max_autotune", MAX_AUTOTUNE_VARIANT)):
            if key in compiled.get(name, {}) and r["variant"] != name:
                row[field] = compiled[name][key]["median_ms"] / r["median_ms"]
        if r.get("dense_ms"):  # were all but the convolutions and matrix products free
            row["ceiling"] = ref["median_ms"] / r["dense_ms"]
        if r.get("flop_bound_ms"):  # were its arithmetic done at the machine's dense peak
            row["flop_ceiling"] = ref["median_ms"] / r["flop_bound_ms"]
        for field in ("saved_bytes", "peak_bytes", "rss_rise_bytes", "ops", "cuda_kernels"):
            if r.get(field) is not None and ref.get(field):
                row[f"{field}_ratio"] = r[field] / ref[field]
        out.append(row)
    return out


TABLE_COLUMNS = [
    ("bench", "bench"), ("L", "num_layers"), ("dtype", "dtype"), ("variant", "variant"),
    ("median ms", lambda r: common.fmt_ms(r.get("median_ms"))),
    ("host ms", lambda r: common.fmt_ms(r.get("host_median_ms"))),
    ("IQR %", common.fmt_iqr),
    ("n", "samples"),
    ("retaken/disturbed", lambda r: f"{r.get('retaken_samples', 0)}/{r.get('disturbed_samples', 0)}"),
    ("vs ref", lambda r: common.fmt_ratio(r.get("speedup_vs_reference"))),
    ("saved MiB", lambda r: common.fmt_mib(r.get("saved_bytes"))),
    ("peak MiB", lambda r: common.fmt_mib(r.get("peak_bytes"))),
    ("peak RSS MiB", lambda r: common.fmt_mib(r.get("peak_rss_bytes"))),
    ("ops", lambda r: common.fmt_count(r.get("ops"))), ("in custom ops", lambda r: common.fmt_count(r.get("inner_ops"))),
    ("(CUDA form)", lambda r: common.fmt_count(r.get("inner_ops_cuda_form"))),
    ("device ops", lambda r: common.fmt_count(r.get("device_ops"))),
    ("(CUDA form)", lambda r: common.fmt_count(device_ops_cuda_form(r))),
    ("syncs", lambda r: common.fmt_count(r.get("host_syncs"))),
    ("kernels", lambda r: common.fmt_count(r.get("cuda_kernels"))),
    ("dense ms", lambda r: common.fmt_ms(r.get("dense_ms"))),
    ("GFLOP", lambda r: "-" if r.get("gflop") is None else f"{r['gflop']:.1f}"),
    ("flop-bound ms", lambda r: common.fmt_ms(r.get("flop_bound_ms"))),
]
SLOPE_COLUMNS = [
    ("bench", "bench"), ("dtype", "dtype"), ("variant", "variant"), ("L", "layer_counts"),
    ("ms/layer", lambda r: common.fmt_ms(r["ms_per_layer"])),
    ("host ms/layer", lambda r: common.fmt_ms(r.get("host_ms_per_layer"))),
    ("saved MiB/layer", lambda r: common.fmt_mib(r["saved_bytes_per_layer"])),
    ("peak MiB/layer", lambda r: common.fmt_mib(r["peak_bytes_per_layer"])),
    ("ops/layer", lambda r: common.fmt_count(r["ops_per_layer"])),
    ("in custom ops/layer", lambda r: common.fmt_count(r.get("inner_ops_per_layer"))),
    ("(CUDA form)", lambda r: common.fmt_count(r.get("inner_ops_cuda_form_per_layer"))),
    ("device ops/layer", lambda r: common.fmt_count(r.get("device_ops_per_layer"))),
    ("(CUDA form)", lambda r: common.fmt_count(r.get("device_ops_cuda_form_per_layer"))),
    ("kernels/layer", lambda r: common.fmt_count(r["kernels_per_layer"])),
]
RATIO_COLUMNS = [
    ("machine", "machine"), ("bench", "bench"), ("dtype", "dtype"), ("shape", "shape"), ("backend", "backend"),
    ("ms", lambda r: common.fmt_ms(r["ms"])), ("ref ms", lambda r: common.fmt_ms(r["ref_ms"])),
    ("ref/fused", lambda r: common.fmt_ratio(r["speedup"])),
    ("(of minima)", lambda r: common.fmt_ratio(r["speedup_of_minima"])),
    ("(paired)", lambda r: common.fmt_ratio(r.get("speedup_paired"))),  # common.paired_ratio
    ("compile/fused", lambda r: common.fmt_ratio(r.get("vs_compile"))),  # same setting (compiled_reference_for)
    ("(paired)", lambda r: common.fmt_ratio(r.get("vs_compile_paired"))),
    ("max-autotune/fused", lambda r: common.fmt_ratio(r.get("vs_compile_max_autotune"))),
    ("ref/dense", lambda r: common.fmt_ratio(r.get("ceiling"))),
    ("ref/flop-bound", lambda r: common.fmt_ratio(r.get("flop_ceiling"))),
    ("ops fused/ref", lambda r: common.fmt_fraction(r.get("ops_ratio"))),
    ("saved fused/ref", lambda r: "-" if r.get("saved_bytes_ratio") is None else f"{r['saved_bytes_ratio']:.2f}"),
    ("peak fused/ref", lambda r: "-" if r.get("peak_bytes_ratio") is None else f"{r['peak_bytes_ratio']:.2f}"),
]


# Defaults of every regime, where the device's DEFAULTS do not decide.
GENERAL_DEFAULTS = dict(bench=",".join(BENCHES), image_size=473, width=384, compile_variants=",".join(COMPILE_VARIANTS),
                        tag="layers", min_sample_ms=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benches.layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=("default", "host"), default="default",
                   help="host: IPMT's batch at tiny sizes (17 px, C=32, B=4, L=1,5, fp32, one CPU thread), so the "
                        "time measured is the host's, with torch.compile variants at every L; options given "
                        "explicitly still win")
    p.add_argument("--bench", help="transformer, step (comma-separated; default both)")
    p.add_argument("--layers", help="comma-separated layer counts L")
    p.add_argument("--batch", type=int)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--image-size", type=int, help="input side; tokens per map = ((size-1)/8+1)^2 (default 473)")
    p.add_argument("--width", type=int, help="hidden width C (reduce_dim; default 384)")
    p.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--backbone", type=int, default=50, choices=(50, 101), help="ResNet depth (step bench)")
    p.add_argument("--dtypes", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--backends", help="comma-separated variants <backend>[+recompute][+graphs]: +recompute "
                   "recomputes the FFN hidden activations in backward, +graphs (CUDA) replays the call from a "
                   "CUDA graph; default: every runnable backend, auto, auto+recompute, and on CUDA "
                   "reference+graphs and auto+graphs")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--min-sample-ms", type=float,
                   help="time back-to-back calls for at least this long per sample (default 0: one call; "
                        f"{HOST_SAMPLE_MS:g} in the host regime)")
    p.add_argument("--compile-layers", help="layer counts at which to add the --compile-variants "
                                            "(transformer bench; compile time is long)")
    p.add_argument("--compile-variants",
                   help="torch.compile variants compile(<backend>[,<setting>]), <setting> a torch.compile mode or a "
                        f"boolean Inductor option to turn on (default: {','.join(COMPILE_VARIANTS)})")
    p.add_argument("--quiet-wait", type=float,
                   help="CPU: wait up to this many seconds before each sample for other processes to go quiet, "
                        "and retake samples they disturbed (0 = off; default 30 on CPU, 0 on CUDA)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-op-count", action="store_true", help="skip counting ops dispatched and kernels launched")
    p.add_argument("--saved-breakdown", type=int, default=0, metavar="K",
                   help="print the K largest saving sites (source line, shape) of each variant's saved tensors")
    p.add_argument("--dense-time", action="store_true",
                   help="CPU: profile one more call of each variant and report the time in its convolutions and "
                        "matrix products (dense ms), and the reference's time over it (ref/dense): the largest "
                        "speedup fusing everything else could give")
    p.add_argument("--flop-bound", action="store_true",
                   help="count each eager variant's FLOPs in products and convolutions (GFLOP; fused backends "
                        "counted on their torch form) and measure the machine's dense peak (a large matrix product "
                        "and 3x3 convolution): flop-bound ms is the fastest any implementation of that arithmetic "
                        "could run here, ref/flop-bound the largest speedup it allows")
    p.add_argument("--out", help="output folder (default benches/results/<device>/)")
    p.add_argument("--tag", help="file name stem of the outputs (default layers, layers-host for --regime host)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    regime = dict(GENERAL_DEFAULTS)
    if args.regime == "host":
        device_type = common.resolve_device(args.device).type
        regime.update(HOST_REGIME, compile_layers=HOST_REGIME["layers"],
                      compile_variants=HOST_COMPILE_VARIANTS[device_type])
    for key, value in regime.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args, device = common.parse_with_device_defaults(p, argv, DEFAULTS, parsed=args)
    if (args.image_size - 1) % OUTPUT_STRIDE:
        p.error(f"--image-size must satisfy (size - 1) % {OUTPUT_STRIDE} == 0 (e.g. 473, 233, 97)")
    for variant in parse_compile_list(args.compile_variants):
        parsed = parse_compile_variant(variant)
        if parsed is None:
            p.error(f"--compile-variants: {variant!r} is not compile(<backend>[,<setting>])")
        try:
            compile_settings(parsed[1])
        except ValueError as exc:
            p.error(f"--compile-variants: {variant!r}: {exc}")
    return args, device


def main(argv=None) -> List[dict]:
    args, device = parse_args(argv)
    if args.threads is not None and device.type == "cpu":
        torch.set_num_threads(args.threads)
    label = common.device_label(device)
    out_dir = common.results_dir(device, args.out)
    meta = common.run_metadata(device, "benches.layers")
    meta.update(regime=args.regime, threads=torch.get_num_threads())
    print(f"# layers benchmark on {label}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{common.describe_allocator()}", flush=True)
    backends = candidate_backends(device, common.parse_str_list(args.backends) if args.backends else None)
    if not backends:
        raise SystemExit("no backend can run here")
    compile_at = set(common.parse_int_list(args.compile_layers))
    compile_variants = parse_compile_list(args.compile_variants)
    rows: List[dict] = []

    def save(rows):  # after every configuration, so a run cut short keeps what it measured
        slopes, ratios = per_layer_rows(rows), ratio_rows(rows, label)
        meta["finished"] = common.run_metadata(device, "benches.layers")["date"]
        common.write_csv(rows, out_dir / f"{args.tag}.csv")
        common.write_json({"meta": meta, "rows": rows, "per_layer": slopes, "ratios": ratios},
                          out_dir / f"{args.tag}.json")
        return slopes, ratios

    for bench_name in common.parse_str_list(args.bench):
        if bench_name not in BENCHES:
            raise SystemExit(f"unknown bench {bench_name!r}; known: {BENCHES}")
        for num_layers in common.parse_int_list(args.layers):
            if bench_name == "transformer":
                bench = TransformerBench(num_layers, args.batch, args.shot, args.image_size, args.width, device)
            else:
                bench = StepBench(num_layers, args.batch, args.shot, args.image_size, args.width, device,
                                  args.backbone)
            for dtype_name in common.parse_str_list(args.dtypes):
                print(f"# {bench_name} L={num_layers} {dtype_name} B={args.batch} S={args.shot} "
                      f"{args.image_size}px: {', '.join(backends)}", flush=True)
                with_compile = bench_name == "transformer" and num_layers in compile_at
                new = bench_layer_count(bench, backends, dtype_name, compile_variants if with_compile else [], args,
                                        device)
                print(common.format_table([r for r in new if r.get("median_ms") is not None], TABLE_COLUMNS[3:]),
                      flush=True)
                rows.extend(new)
                save(rows)
            del bench
            if device.type == "cuda":
                torch.cuda.empty_cache()
    slopes, ratios = save(rows)
    print("\n" + common.format_table([r for r in rows if r.get("median_ms") is not None], TABLE_COLUMNS))
    for r in rows:
        if r.get("error"):
            print(f"# {r['bench']} L={r['num_layers']} {r['dtype']} {r['variant']} failed: {r['error']}")
    print("\n# per layer (least-squares slope over L)")
    print(common.format_table(slopes, SLOPE_COLUMNS))
    print("\n# fused / reference ratios (ref/fused: higher is faster; memory fused/ref: lower is better)")
    print(common.format_table(ratios, RATIO_COLUMNS))
    title = f"{label}  B={args.batch} S={args.shot} {args.image_size}px"
    plotted = not args.no_plot and common.write_plot(
        lambda plot: plot.plot_layers(rows, out_dir / f"{args.tag}.png", title=title))
    print(f"# wrote {out_dir}/{args.tag}.csv, .json" + (", .png" if plotted else ""))
    return rows


if __name__ == "__main__":
    main()
