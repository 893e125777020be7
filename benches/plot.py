"""Plots of benchmark results (PNG): latency and memory vs layer count, op time vs token count.

    python -m benches.plot benches/results/cpu-2core/layers.json     # re-plot a saved run
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2 ** 20
DTYPE_STYLES = {"fp32": "-", "bf16": "--", "fp16": ":", "fp64": "-."}


def _colours(variants) -> dict:
    """One colour per variant, the same in every panel."""
    palette = plt.get_cmap("tab10").colors
    return {v: palette[i % len(palette)] for i, v in enumerate(sorted(set(variants)))}


def _memory_key(rows: List[dict]) -> str:
    """CUDA runs plot peak allocated memory, CPU runs the bytes saved for backward."""
    return "peak_bytes" if any(r.get("peak_bytes") is not None for r in rows) else "saved_bytes"


def plot_layers(rows: List[dict], path: Path, title: str = "") -> None:
    """Latency (top) and memory (bottom) vs layer count, one column per benchmark, one line per
    backend and dtype."""
    rows = [r for r in rows if r.get("median_ms") is not None]
    if not rows:
        return
    order = ("transformer", "step")
    benches = sorted({r["bench"] for r in rows}, key=lambda b: (order.index(b) if b in order else len(order), b))
    mem_key = _memory_key(rows)
    colour = _colours(r["variant"] for r in rows)
    fig, axes = plt.subplots(2, len(benches), figsize=(6 * len(benches), 8), squeeze=False)
    for col, bench in enumerate(benches):
        sub = [r for r in rows if r["bench"] == bench]
        for (variant, dtype) in sorted({(r["variant"], r["dtype"]) for r in sub}):
            line = sorted((r for r in sub if r["variant"] == variant and r["dtype"] == dtype),
                          key=lambda r: r["num_layers"])
            xs = [r["num_layers"] for r in line]
            style = DTYPE_STYLES.get(dtype, "-")
            label = f"{variant} {dtype}"
            axes[0, col].plot(xs, [r["median_ms"] for r in line], style, marker="o", label=label,
                              color=colour[variant])
            mem = [(x, r.get(mem_key)) for x, r in zip(xs, line) if r.get(mem_key) is not None]
            if mem:
                axes[1, col].plot([x for x, _ in mem], [m / MIB for _, m in mem], style, marker="o", label=label,
                                  color=colour[variant])
        axes[0, col].set(title=f"{bench}: median time per call", xlabel="layers L", ylabel="ms")
        axes[1, col].set(title=f"{bench}: {mem_key.replace('_', ' ')}", xlabel="layers L", ylabel="MiB")
        for ax in axes[:, col]:
            ax.set_xticks(sorted({r["num_layers"] for r in sub}))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ops(rows: List[dict], path: Path, title: str = "") -> None:
    """Time vs token count, one panel per op and mode, one line per variant (first dtype, widest C)."""
    rows = [r for r in rows if r.get("median_ms") is not None]
    if not rows:
        return
    panels = sorted({(r["op"], r["mode"]) for r in rows})
    colour = _colours(r["variant"] for r in rows)
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4 * nrows), squeeze=False)
    for ax, (op, mode) in zip(axes.flat, panels):
        sub = [r for r in rows if r["op"] == op and r["mode"] == mode]
        dtype = sub[0]["dtype"]
        width = max(r["width"] for r in sub)
        sub = [r for r in sub if r["dtype"] == dtype and r["width"] == width]
        for variant in sorted({r["variant"] for r in sub}):
            line = sorted((r for r in sub if r["variant"] == variant), key=lambda r: r["tokens"])
            ax.plot([r["tokens"] for r in line], [r["median_ms"] for r in line], marker="o", label=variant,
                    color=colour[variant])
        floors = sorted({(r["tokens"], r["floor_ms"]) for r in sub if r.get("floor_ms") is not None})
        if floors:
            ax.plot([t for t, _ in floors], [f for _, f in floors], "k:", label="memory-traffic floor")
        ax.set(title=f"{op} {mode} {dtype} C={width}", xlabel="tokens N", ylabel="ms", xscale="log", yscale="log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    for name in (argv if argv is not None else sys.argv[1:]):
        path = Path(name)
        payload = json.loads(path.read_text())
        rows, label = payload["rows"], payload["meta"]["machine"]["device"]
        plotter = plot_layers if rows and "num_layers" in rows[0] else plot_ops
        plotter(rows, path.with_suffix(".png"), title=label)
        print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
