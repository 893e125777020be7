"""Per-op benchmark: every registered backend of each fused op against its reference form and
against what a user would write otherwise.

    python -m benches.ops                      # defaults sized for the device found
    python -m benches.ops --ops masked_prototype_attention --tokens 3600,18000 --widths 384 --no-compile

Variants per op: each backend ``ipmt_fast.ops.registered_backends(op)`` lists that can run here
(the others are skipped with the registry's reason), ``compile(reference)`` (``torch.compile``
of the reference form; ``--no-compile`` leaves it out), for the attention ``sdpa``
(``F.scaled_dot_product_attention`` with a boolean mask over projected K/V), and for the FFN
``torch+recompute`` (the hidden activation recomputed in backward instead of kept).

Modes: ``fwd`` (inference, under ``torch.no_grad``) and ``fwdbwd`` (forward, then the gradients
of every float input, weights included, via ``torch.autograd.grad``).

Memory-traffic floor printed beside each time, per call: every input read once and every output
written once in the forward; ``fwdbwd`` adds a backward that reads the output gradients and every
input once and writes the gradient of every differentiable input once. On CUDA the floor is also
given as a time (floor bytes over the measured device-to-device copy bandwidth) and the achieved
fraction (floor time over measured time; 1.0 = at the floor).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ipmt_fast import ops
from ipmt_fast.model.transformer import DROPOUT, FFN_EXPANSION
from ipmt_fast.ops import registry
from ipmt_fast.ops.deform_attention import offset_normalizer, pixel_centre_points
from ipmt_fast.train import graphs

from . import common

OP_NAMES = ("masked_prototype_attention", "prototype_mask_logits", "prototype_query_update", "ms_deform_sample",
            "deformable_self_attention", "feed_forward")
MODES = ("fwd", "fwdbwd")
COMPILE_VARIANT = "compile(reference)"
SDPA_VARIANT = "sdpa"
RECOMPUTE_VARIANT = "torch+recompute"
# IPMT's sizes: one prototype row, 9 deformable points, one level, one head; masks keep about half.
PROTOTYPE_ROWS = 1
DEFORM_POINTS = 9
DEFORM_LEVELS = 1
DEFORM_HEADS = 1
MASK_KEEP_PROBABILITY = 0.5
# Deformable sampling locations are drawn a little outside [0, 1] so the zero padding is exercised.
LOCATION_MARGIN = 0.05

DEFAULTS = {
    # 2-core CPU: small, quick.
    "cpu": dict(batch=1, tokens="900,3600", widths="384", dtypes="fp32", warmup=2, repeats=10),
    # 3600 = one 60x60 shot, 18000 = five shots (the support side of 5-shot IPMT).
    "cuda": dict(batch=4, tokens="900,3600,18000", widths="256,384", dtypes="bf16,fp32", warmup=5, repeats=30),
}


@dataclass
class OpInputs:
    """One set of inputs: positional args of the op (after the checks), the differentiable
    ones, the parameters (excluded from saved bytes) and a random gradient for the output."""
    args: tuple
    differentiable: List[torch.Tensor]
    parameters: List[torch.Tensor]
    grad_output: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args if isinstance(t, torch.Tensor))


def _weight(c_out: int, c_in: int, dtype, device, *trailing) -> torch.Tensor:
    return (torch.randn(c_out, c_in, *trailing, device=device, dtype=torch.float32) / math.sqrt(c_in)).to(dtype)


def _nonempty_mask(b: int, n: int, device) -> torch.Tensor:
    mask = torch.rand(b, n, device=device) < MASK_KEEP_PROBABILITY
    mask[:, 0] = True  # every row keeps a token, so -inf masking (sdpa) stays finite too
    return mask


def make_attention(b, n, c, dtype, device) -> OpInputs:
    prototype = torch.randn(b, PROTOTYPE_ROWS, c, device=device, dtype=dtype)
    tokens = torch.randn(b, n, c, device=device, dtype=dtype)
    weights = [_weight(c, c, dtype, device) for _ in range(4)]
    args = (prototype, tokens, _nonempty_mask(b, n, device), *weights, None, None)
    return OpInputs(args, [prototype, tokens, *weights], weights,
                    torch.randn(b, PROTOTYPE_ROWS, c, device=device, dtype=dtype))


def make_mask_logits(b, n, c, dtype, device) -> OpInputs:
    embedding = torch.randn(b, PROTOTYPE_ROWS, c, device=device, dtype=dtype)
    tokens = torch.randn(b, n, c, device=device, dtype=dtype)
    return OpInputs((embedding, tokens), [embedding, tokens], [],
                    torch.randn(b, PROTOTYPE_ROWS, n, device=device, dtype=dtype))


def make_query_update(b, n, c, dtype, device) -> OpInputs:
    query = torch.randn(b, n, c, device=device, dtype=dtype)
    prototype = torch.randn(b, 1, c, device=device, dtype=dtype)
    weight = _weight(c, 2 * c, dtype, device, 1, 1)
    return OpInputs((query, prototype, weight), [query, prototype, weight], [weight],
                    torch.randn(b, n, c, device=device, dtype=dtype))


def make_deform_sample(b, n, c, dtype, device) -> OpInputs:
    side = max(1, round(math.sqrt(n)))  # a square map of about n tokens; one query per token
    h = w = side
    # The model feeds the sampling float32 in every precision (its autocast rule is float32, like
    # grid_sample's), so a bf16 / fp16 run measures it in float32 too.
    dtype = torch.promote_types(dtype, torch.float32)
    value = torch.randn(b, h * w, DEFORM_HEADS, c, device=device, dtype=dtype)
    shapes = [(h, w)]  # DEFORM_LEVELS = 1 level of h x w tokens
    loc_shape = (b, h * w, DEFORM_HEADS, DEFORM_LEVELS, DEFORM_POINTS)
    locations = (torch.rand(*loc_shape, 2, device=device) * (1 + 2 * LOCATION_MARGIN) - LOCATION_MARGIN).to(dtype)
    weights = torch.randn(*loc_shape, device=device).flatten(-2).softmax(-1).view(loc_shape).to(dtype)
    return OpInputs((value, shapes, locations, weights), [value, locations, weights], [],
                    torch.randn(b, h * w, DEFORM_HEADS * c, device=device, dtype=dtype))


def make_deformable_attention(b, n, c, dtype, device) -> OpInputs:
    """IPMT's query self-attention layer over a square map of about n tokens, a padded bottom band."""
    side = max(1, round(math.sqrt(n)))
    tokens = side * side
    values = torch.randn(b, tokens, c, device=device, dtype=dtype)
    query = values + torch.randn(b, tokens, c, device=device, dtype=dtype)
    padding = torch.zeros(b, side, side, dtype=torch.bool, device=device)
    padding[:, side - max(1, side // 8):] = True
    # Coordinates in at least float32, as the model makes them.
    coordinates = torch.promote_types(dtype, torch.float32)
    reference_points = pixel_centre_points(side, side, coordinates, device)
    normalizer = offset_normalizer([(side, side)], coordinates, device)
    params = [_weight(c, c, dtype, device), torch.zeros(c, device=device, dtype=dtype),
              _weight(DEFORM_HEADS * DEFORM_POINTS * 2, c, dtype, device),
              torch.randn(DEFORM_HEADS * DEFORM_POINTS * 2, device=device, dtype=dtype),
              _weight(DEFORM_HEADS * DEFORM_POINTS, c, dtype, device),
              torch.zeros(DEFORM_HEADS * DEFORM_POINTS, device=device, dtype=dtype),
              _weight(c, c, dtype, device), torch.zeros(c, device=device, dtype=dtype)]
    args = (query, values, padding.flatten(1), reference_points, normalizer, side, side, *params, DEFORM_HEADS,
            DEFORM_POINTS)
    return OpInputs(args, [query, values, *params], params, torch.randn(b, tokens, c, device=device, dtype=dtype))


def make_feed_forward(b, n, c, dtype, device) -> OpInputs:
    """A query-side FFN in training: hidden width 3C, IPMT's dropout mask."""
    x = torch.randn(b, n, c, device=device, dtype=dtype)
    hidden_weight = _weight(FFN_EXPANSION * c, c, dtype, device)
    output_weight = _weight(c, FFN_EXPANSION * c, dtype, device)
    hidden_keep = torch.rand(b, n, FFN_EXPANSION * c, device=device) >= DROPOUT
    return OpInputs((x, hidden_weight, output_weight, hidden_keep, DROPOUT), [x, hidden_weight, output_weight],
                    [hidden_weight, output_weight], torch.randn(b, n, c, device=device, dtype=dtype))


def feed_forward_recomputing(*args):
    """The torch backend keeping only the keep mask and recomputing the hidden activation."""
    return ops.feed_forward(*args, recompute_hidden=True, backend="torch")


def sdpa_attention(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, attn_keep, scale):
    """What one would write with PyTorch's fused attention: project K/V, boolean mask, SDPA.

    (``-inf`` masking instead of the published -10000: equal whenever a row keeps a token.)"""
    q = F.linear(prototype, q_weight)
    k = F.linear(tokens, k_weight)
    v = F.linear(tokens, v_weight)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask[:, None, :], scale=scale)
    return F.linear(out, proj_weight)


@dataclass
class OpCase:
    name: str
    make_inputs: Callable[..., OpInputs]
    reference: Callable
    alternatives: Dict[str, Callable]

    def public(self, backend: str) -> Callable:
        fn = getattr(ops, self.name)
        return lambda *args: fn(*args, backend=backend)


CASES = {
    "masked_prototype_attention": OpCase("masked_prototype_attention", make_attention,
                                         ops.masked_prototype_attention_reference, {SDPA_VARIANT: sdpa_attention}),
    "prototype_mask_logits": OpCase("prototype_mask_logits", make_mask_logits, ops.prototype_mask_logits_reference, {}),
    "prototype_query_update": OpCase("prototype_query_update", make_query_update,
                                     ops.prototype_query_update_reference, {}),
    "ms_deform_sample": OpCase("ms_deform_sample", make_deform_sample, ops.ms_deform_sample_reference, {}),
    "deformable_self_attention": OpCase("deformable_self_attention", make_deformable_attention,
                                        ops.deformable_self_attention_reference, {}),
    "feed_forward": OpCase("feed_forward", make_feed_forward, ops.feed_forward_reference,
                           {RECOMPUTE_VARIANT: feed_forward_recomputing}),
}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def traffic_floor_bytes(case: OpCase, inputs: OpInputs, mode: str) -> int:
    """Bytes the op must move (see module docstring), from the actual tensors."""
    with torch.no_grad():
        outputs = case.reference(*inputs.args)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    forward = inputs.nbytes + _nbytes(outputs)
    if mode == "fwd":
        return forward
    return forward + _nbytes([inputs.grad_output]) + inputs.nbytes + _nbytes(inputs.differentiable)


def run_once(fn: Callable, inputs: OpInputs, mode: str):
    """One call in the given mode; returns the output (fwd) or the gradients (fwdbwd)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs.args)
    out = _first(fn(*inputs.args))
    return torch.autograd.grad(out, inputs.differentiable, inputs.grad_output)


def prepare_inputs(case: OpCase, b, n, c, dtype, device, mode) -> List[OpInputs]:
    first = case.make_inputs(b, n, c, dtype, device)
    sets = [first] + [case.make_inputs(b, n, c, dtype, device)
                      for _ in range(common.input_set_count(first.nbytes, device) - 1)]
    for s in sets:
        for t in s.differentiable:
            t.requires_grad_(mode == "fwdbwd")
    return sets


def _rotating(fn: Callable, sets: Sequence[OpInputs], mode: str) -> Callable[[], object]:
    state = {"i": 0}

    def call():
        inputs = sets[state["i"] % len(sets)]
        state["i"] += 1
        return run_once(fn, inputs, mode)
    return call


def backend_variants(case: OpCase, device: torch.device, log=print) -> Dict[str, Callable]:
    """The registered backends that can run on ``device`` (the others logged with the reason)."""
    found = {}
    for backend in registry.registered_backends(case.name):
        try:
            registry.get_implementation(case.name, backend, device)
        except (RuntimeError, ValueError) as exc:
            log(f"  {case.name}: skipping backend {backend!r}: {exc}")
            continue
        found[backend] = case.public(backend)
    return found


def all_variants(case: OpCase, device: torch.device, use_compile: bool, compiled_cache: dict, log=print
                 ) -> Dict[str, Callable]:
    variants = backend_variants(case, device, log)
    variants.update(case.alternatives)
    if use_compile:
        if case.name not in compiled_cache:
            compiled_cache[case.name] = torch.compile(case.reference)
        variants[COMPILE_VARIANT] = compiled_cache[case.name]
    return variants


def capture_graph(fn: Callable, sets: Sequence[OpInputs], mode: str) -> graphs.CapturedGraph:
    """A CUDA graph that runs ``fn`` once on each input set (so one replay rotates over them all).

    Replaying it times the kernels without Python, autograd and launch overhead: the device time
    the memory-traffic floor is compared with. One warm-up pass suffices: the eager timing before
    it has compiled and tuned everything."""
    return graphs.capture(lambda: [run_once(fn, inputs, mode) for inputs in sets], warmup=1)


def graph_times(variants: Dict[str, Callable], sets: Sequence[OpInputs], mode: str, device: torch.device, args,
                log=print) -> Dict[str, float]:
    """Seconds per call of each variant replayed from a CUDA graph (variants that cannot be
    captured, e.g. ones that read a tensor back to the host, are logged and left out)."""
    graphs = {}
    for name, fn in variants.items():
        try:
            graphs[name] = capture_graph(fn, sets, mode)
        except Exception as exc:  # noqa: BLE001 - not capturable: no graph time for it
            log(f"  no CUDA graph for {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            torch.cuda.synchronize(device)
    stats = common.measure_interleaved({name: g.replay for name, g in graphs.items()}, device, warmup=args.warmup,
                                       repeats=args.repeats, min_sample_s=args.min_sample_ms / 1e3, log=log)
    del graphs
    torch.cuda.empty_cache()
    return {name: st.median / len(sets) for name, st in stats.items()}


def bench_config(case: OpCase, mode: str, dtype_name: str, b: int, n: int, c: int, device: torch.device,
                 args, compiled_cache: dict, bandwidth: Optional[float], log=print) -> List[dict]:
    dtype = common.DTYPES[dtype_name]
    sets = prepare_inputs(case, b, n, c, dtype, device, mode)
    variants = all_variants(case, device, not args.no_compile, compiled_cache, log)
    failures: Dict[str, str] = {}
    stats = common.measure_interleaved({name: _rotating(fn, sets, mode) for name, fn in variants.items()}, device,
                                       warmup=args.warmup, repeats=args.repeats,
                                       min_sample_s=args.min_sample_ms / 1e3, failures=failures, log=log,
                                       quiet_wait_s=args.quiet_wait)
    graphed = {}
    if device.type == "cuda" and not args.no_graphs:
        graphed = graph_times({name: variants[name] for name in stats if name != COMPILE_VARIANT}, sets, mode,
                              device, args, log)
    floor = traffic_floor_bytes(case, sets[0], mode)
    base = dict(op=case.name, mode=mode, dtype=dtype_name, batch=b, tokens=n, width=c, input_sets=len(sets),
                floor_bytes=floor)
    ref = stats.get("reference")
    rows = []
    for name, st in stats.items():
        row = dict(base, variant=name, **common.stats_fields(st))
        row["speedup_vs_reference"] = ref.median / st.median if ref else None
        if name in graphed:
            row["graph_ms"] = graphed[name] * 1e3
        if bandwidth:
            # Against the floor: the graph-replayed device time where there is one, else the eager time.
            device_s = graphed.get(name, st.median)
            row["floor_ms"] = floor / bandwidth * 1e3
            row["floor_fraction"] = floor / bandwidth / device_s
            row["floor_fraction_of"] = "graph" if name in graphed else "eager"
        if not args.no_memory:
            try:
                row.update(common.measure_memory(lambda: run_once(variants[name], sets[0], mode), device,
                                                 excluded=sets[0].parameters))
            except Exception as exc:  # noqa: BLE001 - e.g. compiled code refusing saved-tensor hooks
                row["memory_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        rows.append(row)
    for name, reason in failures.items():
        rows.append(dict(base, variant=name, error=reason))
    return rows


TABLE_COLUMNS = [
    ("op", "op"), ("mode", "mode"), ("dtype", "dtype"), ("B", "batch"), ("N", "tokens"), ("C", "width"),
    ("variant", "variant"),
    ("median ms", lambda r: common.fmt_ms(r.get("median_ms"))),
    ("IQR %", common.fmt_iqr),
    ("vs ref", lambda r: common.fmt_ratio(r.get("speedup_vs_reference"))),
    ("graph ms", lambda r: common.fmt_ms(r.get("graph_ms"))),
    ("floor MiB", lambda r: common.fmt_mib(r["floor_bytes"])),
    ("floor ms", lambda r: common.fmt_ms(r.get("floor_ms"))),
    ("of floor", lambda r: "-" if r.get("floor_fraction") is None else f"{r['floor_fraction']:.2f}"),
    ("saved MiB", lambda r: common.fmt_mib(r.get("saved_bytes"))),
    ("peak MiB", lambda r: common.fmt_mib(r.get("peak_bytes"))),
]


def summary_rows(rows: List[dict], device_label: str) -> List[dict]:
    """Per configuration: the fastest non-reference backend against the reference, compile and SDPA."""
    alternatives = {COMPILE_VARIANT, SDPA_VARIANT, "reference"}
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if "median_ms" in r:
            groups.setdefault((r["op"], r["mode"], r["dtype"], r["batch"], r["tokens"], r["width"]), []).append(r)
    out = []
    for key, members in groups.items():
        by_name = {r["variant"]: r for r in members}
        fused = [r for r in members if r["variant"] not in alternatives]
        if not fused or "reference" not in by_name:
            continue
        best = min(fused, key=lambda r: r["median_ms"])
        summary = dict(machine=device_label, op=key[0], mode=key[1], dtype=key[2],
                       shape=f"B{key[3]} N{key[4]} C{key[5]}", backend=best["variant"],
                       fused_ms=best["median_ms"], vs_reference=by_name["reference"]["median_ms"] / best["median_ms"])
        for alt in (COMPILE_VARIANT, SDPA_VARIANT):
            if alt in by_name:
                summary[f"vs {alt}"] = by_name[alt]["median_ms"] / best["median_ms"]
        ref_saved, best_saved = by_name["reference"].get("saved_bytes"), best.get("saved_bytes")
        if ref_saved and best_saved is not None and key[1] == "fwdbwd":
            summary["saved_vs_reference"] = best_saved / ref_saved
        fractions = [(r["floor_fraction"], r["variant"]) for r in fused if r.get("floor_fraction") is not None]
        if fractions:  # the fused backend closest to the floor
            summary["of_floor"], summary["of_floor_backend"] = max(fractions)
        out.append(summary)
    return out


SUMMARY_COLUMNS = [
    ("machine", "machine"), ("op", "op"), ("mode", "mode"), ("dtype", "dtype"), ("shape", "shape"),
    ("fastest fused", "backend"), ("ms", lambda r: common.fmt_ms(r["fused_ms"])),
    ("ref/fused", lambda r: common.fmt_ratio(r["vs_reference"])),
    ("compile/fused", lambda r: common.fmt_ratio(r.get(f"vs {COMPILE_VARIANT}"))),
    ("sdpa/fused", lambda r: common.fmt_ratio(r.get(f"vs {SDPA_VARIANT}"))),
    ("saved fused/ref", lambda r: "-" if r.get("saved_vs_reference") is None else f"{r['saved_vs_reference']:.2f}"),
    ("best of floor", lambda r: "-" if r.get("of_floor") is None
     else f"{r['of_floor']:.2f} {r.get('of_floor_backend', '')}"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benches.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--ops", default=",".join(OP_NAMES), help="comma-separated op names")
    p.add_argument("--modes", default=",".join(MODES), help="fwd, fwdbwd")
    p.add_argument("--dtypes", help="comma-separated: fp32, bf16, fp16, fp64 (default per device)")
    p.add_argument("--batch", type=int)
    p.add_argument("--tokens", help="comma-separated token counts N (the deformable op uses a square map)")
    p.add_argument("--widths", help="comma-separated channel widths C")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--min-sample-ms", type=float, default=common.DEFAULT_MIN_SAMPLE_S * 1e3,
                   help="each timed sample runs back-to-back calls for at least this long")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="CPU: wait up to this many seconds before each sample for other processes to go quiet, "
                        "and retake samples they disturbed (0 = off)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--no-graphs", action="store_true",
                   help="CUDA: skip the CUDA-graph replay timing (device time without launch overhead)")
    p.add_argument("--out", help="output folder (default benches/results/<device>/)")
    p.add_argument("--tag", default="ops", help="file name stem of the outputs")
    p.add_argument("--no-plot", action="store_true")
    args, device = common.parse_with_device_defaults(p, argv, DEFAULTS)
    return args, device


def main(argv=None) -> List[dict]:
    args, device = parse_args(argv)
    label = common.device_label(device)
    out_dir = common.results_dir(device, args.out)
    names = common.parse_str_list(args.ops)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; known: {list(CASES)}")
    print(f"# ops benchmark on {label}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{common.describe_allocator()}", flush=True)
    bandwidth = None
    if device.type == "cuda":
        bandwidth = common.measure_copy_bandwidth(device)
        print(f"# device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    rows: List[dict] = []
    compiled_cache: dict = {}
    meta = common.run_metadata(device, "benches.ops")
    meta["copy_bandwidth_bytes_per_s"] = bandwidth

    def save(rows):  # after every configuration, so a run cut short keeps what it measured
        summary = summary_rows(rows, label)
        common.write_csv(rows, out_dir / f"{args.tag}.csv")
        common.write_json({"meta": meta, "rows": rows, "summary": summary}, out_dir / f"{args.tag}.json")
        return summary

    # Shapes outermost, ops innermost: a run cut short has every op at the first shapes.
    for dtype_name in common.parse_str_list(args.dtypes):
        for c in common.parse_int_list(args.widths):
            for n in common.parse_int_list(args.tokens):
                for name in names:
                    for mode in common.parse_str_list(args.modes):
                        print(f"# {name} {mode} {dtype_name} B={args.batch} N={n} C={c}", flush=True)
                        new = bench_config(CASES[name], mode, dtype_name, args.batch, n, c, device, args,
                                           compiled_cache, bandwidth)
                        print(common.format_table([r for r in new if "median_ms" in r], TABLE_COLUMNS[6:]),
                              flush=True)
                        rows.extend(new)
                        save(rows)
    print("\n" + common.format_table([r for r in rows if "median_ms" in r], TABLE_COLUMNS))
    summary = save(rows)
    print("\n# fused / reference ratios (time: higher is better; saved bytes: lower is better)")
    print(common.format_table(summary, SUMMARY_COLUMNS))
    plotted = not args.no_plot and common.write_plot(
        lambda plot: plot.plot_ops(rows, out_dir / f"{args.tag}.png", title=label))
    print(f"# wrote {out_dir}/{args.tag}.csv, .json" + (", .png" if plotted else ""))
    return rows


if __name__ == "__main__":
    main()
