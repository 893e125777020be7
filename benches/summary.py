"""Short summary of a results folder: the fused/reference ratios, the ops dispatched (and CUDA
kernels launched) per layer against the reference's, and where they stand against the project's
targets (measured, not asserted).

    python -m benches.summary benches/results/cpu-2core
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from . import common

COMPILE_VARIANT = "compile(reference)"
MAX_AUTOTUNE_VARIANT = "compile(reference,max-autotune)"
GRAPHS_SUFFIX = "+graphs"
NON_FUSED = ("reference", "sdpa")
TARGET_LAYERS = 5
# Targets from the benchmark issue: (device kind, dtype, batch) -> thresholds.
TRANSFORMER_TARGETS = {
    "cpu": dict(dtype="fp32", batch=1, speedup=1.5, saved_ratio=0.40),
    "cuda": dict(dtype="bf16", batch=4, speedup=2.5, vs_compile=1.5, peak_ratio=0.40),
}
# Targets of the CUDA-graphs issue (11), for the fastest +graphs variant, per bench: eager
# reference time / its time, torch.compile(reference, max-autotune) time / its time, and its peak
# memory (for a graph: its pool) / the eager reference's.
GRAPHS_TARGETS = {
    "transformer": dict(dtype="bf16", batch=4, speedup=10.0, vs_max_autotune=2.0, peak_ratio=0.5),
    "step": dict(dtype="bf16", batch=4, speedup=5.0, peak_ratio=0.5),
}
# Each fused op within 2x of its memory-traffic floor (GPU only: the floor needs a bandwidth).
OP_FLOOR_FRACTION = 0.5
# One 60x60 shot: the op targets are judged at this many tokens and more.
IPMT_TOKENS = 3600


def _load(folder: Path, prefix: str) -> List[dict]:
    runs = []
    for path in sorted(folder.glob(f"{prefix}*.json")):
        run = json.loads(path.read_text())
        run["tag"] = path.stem
        runs.append(run)
    return runs


def is_eager_fused(variant: str) -> bool:
    """A fused backend run eagerly (not the reference, not compiled, not replayed from a graph)."""
    base = variant.removesuffix(GRAPHS_SUFFIX).split("+")[0]
    return base not in NON_FUSED and not variant.startswith("compile(") and not variant.endswith(GRAPHS_SUFFIX)


def _best(rows: List[dict], keep) -> Optional[dict]:
    chosen = [r for r in rows if keep(r["variant"]) and r.get("median_ms") is not None]
    return min(chosen, key=lambda r: r["median_ms"]) if chosen else None


def _best_fused(rows: List[dict]) -> Optional[dict]:
    return _best(rows, is_eager_fused)


def _verdict(value: Optional[float], threshold: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= threshold if higher_is_better else value <= threshold
    return "met" if met else "MISSED"


def transformer_targets(layer_runs: List[dict]) -> List[dict]:
    rows = [r for run in layer_runs for r in run["rows"] if r.get("bench") == "transformer"]
    if not rows:
        return []
    kind = "cuda" if layer_runs[0]["meta"]["machine"]["device"].startswith("cuda") else "cpu"
    target = TRANSFORMER_TARGETS[kind]
    config = [r for r in rows if r["num_layers"] == TARGET_LAYERS and r["dtype"] == target["dtype"]
              and r["batch"] == target["batch"] and r.get("median_ms") is not None]
    out = []
    for tag in sorted({r["_run"] for r in config}):
        run_rows = [r for r in config if r["_run"] == tag]
        shape = f"{tag}: {target['dtype']} B={target['batch']} L={TARGET_LAYERS}"
        ref = next((r for r in run_rows if r["variant"] == "reference"), None)
        best = _best_fused(run_rows)
        if ref is None or best is None:
            continue
        compiled = next((r for r in run_rows if r["variant"] == COMPILE_VARIANT), None)
        speedup = ref["median_ms"] / best["median_ms"]
        out.append(dict(what=f"{shape}: ref/{best['variant']} time", target=f">= {target['speedup']}x",
                        measured=f"{speedup:.2f}x", verdict=_verdict(speedup, target["speedup"], True)))
        if "vs_compile" in target and compiled is not None:
            vs = compiled["median_ms"] / best["median_ms"]
            out.append(dict(what=f"{shape}: compile(ref)/{best['variant']} time", target=f">= {target['vs_compile']}x",
                            measured=f"{vs:.2f}x", verdict=_verdict(vs, target["vs_compile"], True)))
        for field, key in (("saved_bytes", "saved_ratio"), ("peak_bytes", "peak_ratio")):
            if key not in target or not ref.get(field):
                continue
            # The fastest variant, and the leanest one where that is another (e.g. +recompute).
            measured = [r for r in run_rows if is_eager_fused(r["variant"]) and r.get(field) is not None]
            leanest = min(measured, key=lambda r: r[field], default=None)
            for row in {id(r): r for r in (best, leanest) if r is not None and r.get(field) is not None}.values():
                ratio = row[field] / ref[field]
                out.append(dict(what=f"{shape}: {field.replace('_', ' ')} {row['variant']}/ref",
                                target=f"<= {target[key]:.2f}", measured=f"{ratio:.2f}",
                                verdict=_verdict(ratio, target[key], False)))
    return out


def graphs_targets(layer_runs: List[dict]) -> List[dict]:
    """The CUDA-graphs targets (``GRAPHS_TARGETS``), judged on the fastest ``+graphs`` variant at
    L=5 of each run that has one."""
    out = []
    for run in layer_runs:
        for bench, target in GRAPHS_TARGETS.items():
            config = [r for r in run["rows"] if r.get("bench") == bench and r["num_layers"] == TARGET_LAYERS
                      and r["dtype"] == target["dtype"] and r["batch"] == target["batch"]
                      and r.get("median_ms") is not None]
            ref = next((r for r in config if r["variant"] == "reference"), None)
            best = _best(config, lambda v: v.endswith(GRAPHS_SUFFIX))
            if ref is None or best is None:
                continue
            what = f"{run['tag']}: {bench} {target['dtype']} B={target['batch']} L={TARGET_LAYERS}: {best['variant']}"
            speedup = ref["median_ms"] / best["median_ms"]
            out.append(dict(what=f"{what} vs eager reference time", target=f">= {target['speedup']}x",
                            measured=f"{speedup:.2f}x", verdict=_verdict(speedup, target["speedup"], True)))
            autotuned = next((r for r in config if r["variant"] == MAX_AUTOTUNE_VARIANT), None)
            if "vs_max_autotune" in target and autotuned is not None:
                vs = autotuned["median_ms"] / best["median_ms"]
                out.append(dict(what=f"{what} vs {MAX_AUTOTUNE_VARIANT} time", target=f">= {target['vs_max_autotune']}x",
                                measured=f"{vs:.2f}x", verdict=_verdict(vs, target["vs_max_autotune"], True)))
            if best.get("peak_bytes") is not None and ref.get("peak_bytes"):
                ratio = best["peak_bytes"] / ref["peak_bytes"]
                out.append(dict(what=f"{what} graph pool / reference peak memory", target=f"<= {target['peak_ratio']:.2f}",
                                measured=f"{ratio:.2f}", verdict=_verdict(ratio, target["peak_ratio"], False)))
    return out


def host_work_rows(layer_runs: List[dict]) -> List[dict]:
    """Per run, bench, dtype and variant: ops dispatched and CUDA kernels launched per layer (the
    least-squares slopes over the layer counts) and their ratio to the reference's slope."""
    out = []
    for run in layer_runs:
        slopes = run.get("per_layer", [])
        refs = {(s["bench"], s["dtype"]): s for s in slopes if s["variant"] == "reference"}
        for s in slopes:
            if s.get("ops_per_layer") is None and s.get("kernels_per_layer") is None:
                continue
            ref = refs.get((s["bench"], s["dtype"]), {})
            row = dict(run=run["tag"], bench=s["bench"], dtype=s["dtype"], variant=s["variant"],
                       layers=s["layer_counts"])
            for kind in ("ops", "inner_ops", "kernels"):
                value, base = s.get(f"{kind}_per_layer"), ref.get(f"{kind}_per_layer")
                row[f"{kind}_per_layer"] = value
                row[f"{kind}_ratio"] = value / base if value is not None and base else None
            out.append(row)
    return out


def op_targets(op_runs: List[dict]) -> List[dict]:
    """Per op, mode and dtype: the best fused backend's fraction of the floor at each token count;
    judged at IPMT's token counts (one shot and more), the smaller ones shown for context."""
    groups: Dict[tuple, List[dict]] = {}
    for run in op_runs:
        for s in run.get("summary", []):
            if s.get("of_floor") is not None:
                groups.setdefault((run["tag"], s["op"], s["mode"], s["dtype"]), []).append(s)
    out = []
    for (tag, op, mode, dtype), members in groups.items():
        members.sort(key=lambda s: int(s["shape"].split("N")[1].split()[0]))
        measured = ", ".join(f"{s['shape'].split()[1]} {s['of_floor']:.2f} {s.get('of_floor_backend', '')}".strip()
                             for s in members)
        judged = [s["of_floor"] for s in members if int(s["shape"].split("N")[1].split()[0]) >= IPMT_TOKENS]
        out.append(dict(what=f"{tag}: {op} {mode} {dtype} {members[0]['shape'].split()[0]}: of floor",
                        target=f">= {OP_FLOOR_FRACTION:.2f}", measured=measured,
                        verdict=_verdict(min(judged) if judged else None, OP_FLOOR_FRACTION, True)))
    return out


def main(argv=None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    folder = Path(args[0]) if args else common.RESULTS_ROOT
    layer_runs, op_runs = _load(folder, "layers"), _load(folder, "ops")
    for run in layer_runs:  # several runs can hold the target configuration: each is judged apart
        for r in run["rows"]:
            r["_run"] = run["tag"]
    ratios = [r for run in layer_runs for r in run.get("ratios", [])]
    if ratios:
        print("# layer benches: fused / reference")
        print(common.format_table(ratios, [
            ("machine", "machine"), ("bench", "bench"), ("dtype", "dtype"), ("shape", "shape"), ("backend", "backend"),
            ("ms", lambda r: common.fmt_ms(r["ms"])), ("ref/fused", lambda r: common.fmt_ratio(r["speedup"])),
            ("compile/fused", lambda r: common.fmt_ratio(r.get("vs_compile"))),
            ("max-autotune/fused", lambda r: common.fmt_ratio(r.get("vs_compile_max_autotune"))),
            ("saved f/r", lambda r: "-" if r.get("saved_bytes_ratio") is None else f"{r['saved_bytes_ratio']:.2f}"),
            ("peak f/r", lambda r: "-" if r.get("peak_bytes_ratio") is None else f"{r['peak_bytes_ratio']:.2f}")]))
    work = host_work_rows(layer_runs)
    if work:
        print("\n# host work per layer (slope over L): ops dispatched from Python and autograd (an ipmt_fast "
              "custom op once), the ATen calls made inside those custom ops, CUDA kernels launched; /ref = the "
              "variant's slope over the reference's")
        print(common.format_table(work, [
            ("run", "run"), ("bench", "bench"), ("dtype", "dtype"), ("variant", "variant"), ("L", "layers"),
            ("ops/layer", lambda r: common.fmt_count(r["ops_per_layer"])),
            ("ops /ref", lambda r: common.fmt_fraction(r["ops_ratio"])),
            ("+ in custom ops/layer", lambda r: common.fmt_count(r["inner_ops_per_layer"])),
            ("kernels/layer", lambda r: common.fmt_count(r["kernels_per_layer"])),
            ("kernels /ref", lambda r: common.fmt_fraction(r["kernels_ratio"]))]))
    op_summary = [s for run in op_runs for s in run.get("summary", [])]
    if op_summary:
        print("\n# op benches: fastest fused backend per configuration")
        print(common.format_table(op_summary, [
            ("op", "op"), ("mode", "mode"), ("dtype", "dtype"), ("shape", "shape"), ("backend", "backend"),
            ("ms", lambda r: common.fmt_ms(r["fused_ms"])),
            ("ref/fused", lambda r: common.fmt_ratio(r["vs_reference"])),
            ("compile/fused", lambda r: common.fmt_ratio(r.get(f"vs {COMPILE_VARIANT}"))),
            ("sdpa/fused", lambda r: common.fmt_ratio(r.get("vs sdpa"))),
            ("best of floor", lambda r: "-" if r.get("of_floor") is None
             else f"{r['of_floor']:.2f} {r.get('of_floor_backend', '')}")]))
    targets = transformer_targets(layer_runs) + graphs_targets(layer_runs) + op_targets(op_runs)
    print("\n# targets (measured, not asserted)")
    print(common.format_table(targets, [("what", "what"), ("target", "target"), ("measured", "measured"),
                                        ("", "verdict")]) if targets else "(no result matches a target configuration)")


if __name__ == "__main__":
    main()
