"""The layer benchmark's own plumbing at tiny sizes on any device (quick; not part of the CI suite
in tests/): variant names, the op-count column and its per-layer fit, the summary's tables."""
from __future__ import annotations

import json

import pytest
import torch

import ipmt_fast
from ipmt_fast.ops import extension

from . import layers, summary

TINY = ["--layers", "1,2", "--image-size", "17", "--width", "16", "--warmup", "1", "--repeats", "1",
        "--quiet-wait", "0", "--no-plot", "--no-memory"]


def test_variant_names():
    # (backend, recompute, graphed, channels_last, tuned)
    assert layers.split_variant("auto") == ("auto", False, False, False, False)
    assert layers.split_variant("auto+recompute+graphs") == ("auto", True, True, False, False)
    assert layers.split_variant("reference+graphs") == ("reference", False, True, False, False)
    assert layers.split_variant("auto+recompute+channels_last") == ("auto", True, False, True, False)
    assert layers.split_variant("auto+channels_last+tuned+graphs") == ("auto", False, True, True, True)
    assert layers.split_variant("auto+tuned") == ("auto", False, False, False, True)
    assert layers.parse_compile_variant("compile(reference,max-autotune)") == ("reference", "max-autotune")
    assert layers.parse_compile_variant("compile(auto)") == ("auto", None)
    assert layers.parse_compile_variant("auto") is None
    assert layers.parse_compile_list("compile(reference),compile(reference,max-autotune), compile(auto)") == \
        ["compile(reference)", "compile(reference,max-autotune)", "compile(auto)"]
    with pytest.raises(SystemExit):
        layers.parse_args(["--compile-variants", "compile(reference"])


def test_compile_settings_are_modes_or_boolean_inductor_options(capsys):
    assert layers.compile_settings(None) == {}
    assert layers.compile_settings("reduce-overhead") == {"mode": "reduce-overhead"}
    assert layers.compile_settings("cpp_wrapper") == {"options": {"cpp_wrapper": True}}
    with pytest.raises(ValueError, match="'max_autotune_gemm_backends'.*neither a torch.compile mode"):
        layers.compile_settings("max_autotune_gemm_backends")  # an Inductor option, but not a boolean
    with pytest.raises(ValueError, match="'fast'"):
        layers.compile_settings("fast")
    with pytest.raises(SystemExit):
        layers.parse_args(["--compile-variants", "compile(reference,fast)"])
    assert "compile(reference,fast)" in capsys.readouterr().err
    assert layers.compiled_reference_for("compile(auto,cpp_wrapper)") == "compile(reference,cpp_wrapper)"
    assert layers.compiled_reference_for("compile(auto)") == layers.COMPILE_VARIANT
    assert layers.compiled_reference_for("auto") == layers.COMPILE_VARIANT


def test_graph_variants_only_on_cuda():
    logged = []
    chosen = layers.candidate_backends(torch.device("cpu"), ["reference", "auto+graphs"], log=logged.append)
    assert chosen == ["reference"]
    assert any("'auto+graphs'" in line and "CUDA device" in line for line in logged)
    defaults = layers.candidate_backends(torch.device("cpu"), log=lambda _: None)
    assert not any(v.endswith(layers.GRAPHS_SUFFIX) for v in defaults)


def test_channels_last_variant_configures_the_network_only():
    model = ipmt_fast.IPMT(reduce_dim=16, num_layers=1, backend="reference")
    layers.configure(model, "auto+channels_last")
    assert model.backend == "auto" and model.map_layout == torch.channels_last
    with pytest.raises(ValueError, match=r"\+channels_last applies to the whole network"):
        layers.configure(model.transformer, "auto+channels_last")


def test_host_regime_sets_its_shapes_and_explicit_options_win():
    args, _ = layers.parse_args(["--regime", "host", "--device", "cpu"])
    assert (args.bench, args.layers, args.batch, args.image_size, args.width) == ("transformer,step", "1,5", 4, 17, 32)
    assert (args.dtypes, args.threads, args.tag, args.backends) == ("fp32", 1, "layers-host", "reference,auto")
    assert args.compile_layers == "1,5" and args.compile_variants == layers.HOST_COMPILE_VARIANTS["cpu"]
    args, _ = layers.parse_args(["--regime", "host", "--device", "cpu", "--layers", "2", "--compile-layers", "",
                                 "--image-size", "33"])
    assert (args.layers, args.compile_layers, args.image_size, args.batch) == ("2", "", 33, 4)
    args, _ = layers.parse_args(["--device", "cpu"])
    assert (args.image_size, args.width, args.tag, args.threads) == (473, 384, "layers", None)


def test_tuned_variant_is_tuned_before_it_is_timed(tmp_path, capsys):
    """``+tuned``: the variant's model is tuned on its own call before the timed calls, and the
    measurement is printed with the choices (one table per layer count)."""
    rows = layers.main(["--bench", "transformer", "--device", "cpu", "--backends", "reference,auto+tuned",
                        "--out", str(tmp_path), "--no-op-count", *TINY])
    printed = capsys.readouterr().out
    assert printed.count("# auto+tuned, transformer L=") == 2
    assert printed.count("backends by measurement on cpu") == 2
    assert {(r["num_layers"], r["variant"]) for r in rows if r.get("median_ms")} == \
        {(n, v) for n in (1, 2) for v in ("reference", "auto+tuned")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = "reference,auto" + (",auto+graphs" if device == "cuda" else "")
    layers.main(["--bench", "transformer,step", "--device", device, "--backends", variants, "--out", str(out),
                 "--dense-time", "--flop-bound", *TINY])
    return out, json.loads((out / "layers.json").read_text())


def test_every_row_counts_its_ops(tiny_run):
    _, run = tiny_run
    rows = [r for r in run["rows"] if r.get("median_ms") is not None]
    assert {(r["bench"], r["num_layers"]) for r in rows} == {(b, n) for b in ("transformer", "step") for n in (1, 2)}
    for r in rows:
        assert isinstance(r["host_syncs"], int) and r["host_syncs"] >= 0, r
        assert 0 < r["host_median_ms"], r  # the issuing thread's CPU time
        if r["variant"].endswith(layers.GRAPHS_SUFFIX):  # a replay issues a handful of ops, not the model's
            assert r["ops"] < 50 and r["peak_is_graph_pool"], r
        else:
            assert r["ops"] > 100, r
        assert (r["cuda_kernels"] is None) == (not torch.cuda.is_available()), r
    by_key = {(r["bench"], r["num_layers"], r["variant"]): r for r in rows}
    for bench in ("transformer", "step"):
        for variant in ("reference", "auto"):
            assert by_key[(bench, 2, variant)]["ops"] > by_key[(bench, 1, variant)]["ops"]
    slopes = {(s["bench"], s["variant"]): s for s in run["per_layer"]}
    for (bench, variant), s in slopes.items():
        two, one = by_key[(bench, 2, variant)], by_key[(bench, 1, variant)]
        assert s["host_ms_per_layer"] == pytest.approx(two["host_median_ms"] - one["host_median_ms"])
        if not variant.endswith(layers.GRAPHS_SUFFIX):
            assert s["ops_per_layer"] == pytest.approx(two["ops"] - one["ops"])
    ratios = [r for r in run["ratios"] if r["backend"] == "auto"]
    assert ratios and all(r["ops_ratio"] > 0 for r in ratios)


def test_cpu_rows_count_the_compiled_ops_cuda_form(tiny_run):
    """On the CPU the compiled ops' own loops replace ATen compositions that their CUDA form runs
    (residual + dropout + layer norm is one loop here, several calls there): counted both ways."""
    if torch.cuda.is_available() or extension.unavailable_reason("cpu") is not None:
        pytest.skip("the CPU loops' switch needs the compiled extension on a CPU run")
    _, run = tiny_run
    for r in run["rows"]:
        if r.get("median_ms") is None:
            continue
        assert 0 < r["device_ops"] < r["ops"] + r["inner_ops"], r  # views and allocations do no device work
        if r["variant"] == "reference":
            assert r["inner_ops"] == 0 and "inner_ops_cuda_form" not in r, r
        else:
            assert r["inner_ops_cuda_form"] > r["inner_ops"] > 0, r
            assert r["device_ops_cuda_form"] > r["device_ops"], r
    slopes = {(s["bench"], s["variant"]): s for s in run["per_layer"]}
    auto = slopes[("transformer", "auto")]
    assert auto["inner_ops_cuda_form_per_layer"] > auto["inner_ops_per_layer"]
    assert auto["device_ops_cuda_form_per_layer"] > auto["device_ops_per_layer"] > 0
    reference = slopes[("transformer", "reference")]
    assert reference["device_ops_cuda_form_per_layer"] == reference["device_ops_per_layer"] > 0


def test_summary_prints_ops_per_layer_against_the_reference(tiny_run, capsys):
    out, run = tiny_run
    summary.main([str(out)])
    printed = capsys.readouterr().out
    assert "# host work per layer" in printed
    slopes = {(s["bench"], s["variant"]): s["ops_per_layer"] for s in run["per_layer"]}
    ratio = slopes[("transformer", "auto")] / slopes[("transformer", "reference")]
    work = {(r["bench"], r["variant"]): r for r in summary.host_work_rows([dict(run, tag="layers")])}
    assert work[("transformer", "auto")]["ops_ratio"] == pytest.approx(ratio)
    assert f" {ratio:.2f} " in printed


def test_dense_time_and_its_ceiling(tiny_run):
    """On the CPU every call spends some time in convolutions and matrix products; the ratio row's
    ceiling is the reference's time over the variant's dense time."""
    _, run = tiny_run
    rows = [r for r in run["rows"] if r.get("median_ms") is not None]
    if torch.cuda.is_available():  # the tiny run's device
        assert all(r["dense_ms"] is None for r in rows)
        return
    for r in rows:
        assert r["dense_ms"] > 0, r
    refs = {(r["bench"], r["num_layers"]): r for r in rows if r["variant"] == "reference"}
    for ratio in run["ratios"]:
        ref = refs[(ratio["bench"], int(ratio["shape"].rsplit("L", 1)[1]))]
        fused = next(r for r in rows if r["variant"] == ratio["backend"] and r["bench"] == ratio["bench"]
                     and r["median_ms"] == ratio["ms"])
        assert ratio["ceiling"] == pytest.approx(ref["median_ms"] / fused["dense_ms"])



def test_flop_bound_and_its_ceiling(tiny_run):
    """Every eager variant's FLOPs are counted (the fused ones on their torch form, which merges the
    attention's projections: fewer than the reference's), their time at the measured peak follows,
    and the ratio row's flop ceiling is the reference's time over it."""
    _, run = tiny_run
    rows = [r for r in run["rows"] if r.get("median_ms") is not None]
    for r in rows:
        assert r["gflop"] > 0 and r["peak_gflops"] > 0, r
        assert r["flop_bound_ms"] == pytest.approx(r["gflop"] / r["peak_gflops"] * 1e3)
    by_key = {(r["bench"], r["num_layers"], r["variant"]): r for r in rows}
    for layers_count in (1, 2):
        assert by_key[("transformer", layers_count, "auto")]["gflop"] < \
            by_key[("transformer", layers_count, "reference")]["gflop"]
    for ratio in run["ratios"]:
        ref = by_key[(ratio["bench"], int(ratio["shape"].rsplit("L", 1)[1]), "reference")]
        fused = next(r for r in rows if r["variant"] == ratio["backend"] and r["bench"] == ratio["bench"]
                     and r["median_ms"] == ratio["ms"])
        assert ratio["flop_ceiling"] == pytest.approx(ref["median_ms"] / fused["flop_bound_ms"])


def test_arithmetic_twins():
    assert layers.arithmetic_twin("reference+graphs") == "reference"
    assert layers.arithmetic_twin("auto+recompute+graphs") == "torch+recompute"
    assert layers.arithmetic_twin("compiled+channels_last") == "torch+channels_last"
