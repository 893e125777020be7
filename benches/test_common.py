"""Checks of the benchmark helpers themselves (quick; not part of the CI suite in tests/)."""
from __future__ import annotations

import pytest
import torch

from ipmt_fast.model.backbone import FrozenBatchNorm2d

from . import common


def test_stats_quartiles():
    stats = common.Stats.of([4.0, 1.0, 3.0, 2.0, 5.0], calls_per_sample=1)
    assert (stats.median, stats.p25, stats.p75, stats.min, stats.max, stats.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)


def test_paired_ratio_cancels_drift_between_rounds():
    # The machine slows down 3x over the run; b is always twice as fast as a within a round.
    a = common.Stats.of([2.0, 4.0, 6.0], calls_per_sample=1)
    b = common.Stats.of([1.0, 2.0, 3.0], calls_per_sample=1)
    assert common.paired_ratio(a, b) == 2.0
    assert common.paired_ratio(common.Stats.of([1.0, 30.0, 1.0], 1), b) == 1.0  # one disturbed round
    assert common.paired_ratio(a, common.Stats.of([1.0, 2.0], 1)) is None  # not the same rounds
    assert "in_round_order_ms" not in common.stats_fields(a)


def test_saved_bytes_counts_unique_activation_storages():
    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)
    with common.SavedTensorBytes(excluded=[weight]) as saved:
        h = x @ weight  # saves x (counted) and weight (excluded)
        y = h.sin()  # saves h
        (y * h).sum()  # saves y and h again (h counted once)
    element = x.element_size()
    assert saved.nbytes == (x.numel() + h.numel() + y.numel()) * element


def test_cpu_peak_is_measured_from_the_live_bytes_at_the_call_s_start():
    """As CUDA's peak above the allocation before the call: blocks the call frees, allocated by its
    previous call, lower what is live (3.5 MiB kept from call to call, freed, then 4 MiB allocated
    and freed before the next 3.5 MiB: 0.5 MiB above what was live at the start)."""
    kept = {}

    def call():
        kept.clear()  # last call's block
        temporary = torch.empty(4 * common.MIB, dtype=torch.uint8)
        del temporary
        kept["blocks"] = (torch.empty(2 * common.MIB, dtype=torch.uint8),
                          torch.empty(common.MIB // 2, dtype=torch.uint8))
        kept["carried"] = torch.empty(common.MIB, dtype=torch.uint8)

    assert common.cpu_peak_bytes(call) == 4 * common.MIB - (2 * common.MIB + common.MIB // 2 + common.MIB)
    assert common.cpu_peak_bytes(lambda: None) == 0
    x = torch.randn(256, 256, requires_grad=True)
    memory = common.measure_memory(lambda: (x * 2).relu().sum().backward(), torch.device("cpu"), excluded=[x])
    # The product and the ReLU's output beside it; in backward the ReLU's output (saved), its
    # gradient and the product's: never more than three maps of x's size at once.
    nbytes = x.numel() * x.element_size()
    assert 2 * nbytes <= memory["peak_bytes"] < 4 * nbytes
    assert memory["saved_bytes"] == x.numel() * x.element_size()


def test_measure_interleaved_reports_failures():
    failures = {}

    def broken():
        raise RuntimeError("no such kernel")

    stats = common.measure_interleaved({"ok": lambda: torch.ones(8).sum(), "broken": broken}, torch.device("cpu"),
                                       warmup=1, repeats=3, failures=failures, log=lambda _: None)
    assert set(stats) == {"ok"} and stats["ok"].n == 3
    assert failures == {"broken": "RuntimeError: no such kernel"}


def test_linear_slope():
    assert common.linear_slope([1, 3, 5], [10, 30, 50]) == 10
    assert common.linear_slope([5], [1]) is None


def test_device_label_cpu():
    assert common.device_label(torch.device("cpu")) == f"cpu-{common.cpu_core_count()}core"


def test_quiet_gate_keeps_every_sample():
    if not common.OtherProcessesClock.available():
        pytest.skip("no /proc here: the quiet gate is off")
    stats = common.measure_interleaved({"ok": lambda: torch.ones(64).sum()}, torch.device("cpu"), warmup=1,
                                       repeats=2, quiet_wait_s=0.6, log=lambda _: None)
    assert stats["ok"].n == 2 and stats["ok"].retaken >= 0 and stats["ok"].disturbed >= 0
    assert common.OtherProcessesClock().start().seconds() >= 0


def test_dense_time_counts_matrix_products_only():
    a = torch.randn(256, 256)
    only_pointwise = common.dense_time_ms(lambda: (a + 1).relu_().exp_(), torch.device("cpu"))
    with_products = common.dense_time_ms(lambda: ((a @ a) + 1).relu_(), torch.device("cpu"))
    assert only_pointwise == 0.0
    assert with_products > 0.0
    if torch.backends.mkldnn.is_available():  # the backbone's convolutions with post-ops
        x, w = torch.randn(1, 8, 16, 16), torch.randn(8, 8, 3, 3)
        fused = common.dense_time_ms(lambda: torch.ops.mkldnn._convolution_pointwise(
            x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], None), torch.device("cpu"))
        assert fused > 0.0
    assert common.dense_time_ms(lambda: a @ a, torch.device("meta")) is None


def test_count_flops_sees_products_and_the_backbones_fused_convolutions():
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    assert common.count_flops(lambda: a @ b) == 2 * 6 * 5 * 4
    assert common.count_flops(lambda: (a + 1).relu_()) == 0
    # A folded frozen convolution takes oneDNN's post-op path in float32 on the CPU, which
    # FlopCounterMode cannot see: count_flops turns oneDNN off for the call, and back on after.
    conv, norm = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16)
    norm.fold = True
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert common.count_flops(lambda: norm.after(conv, x, relu=True)) == 2 * 2 * 16 * 5 * 5 * 8 * 9
    assert torch.backends.mkldnn.enabled


def test_dense_peak_is_the_fastest_probe(monkeypatch):
    """Known answer: the probes' FLOPs over their fastest samples, the larger of the two."""
    fastest = {"mm": 0.5, "conv": 0.25}

    def fake_measure(variants, device, **kwargs):
        for fn in variants.values():
            fn()  # the probes run
        return {name: common.Stats.of([2 * fastest[name], fastest[name]], 1) for name in variants}

    monkeypatch.setitem(common.PEAK_PROBE_MM_SIDE, "cpu", 4)
    monkeypatch.setitem(common.PEAK_PROBE_CONV, "cpu", (1, 2, 3))
    monkeypatch.setattr(common, "measure_interleaved", fake_measure)
    mm_flops, conv_flops = 2 * 4 ** 3, 2 * 1 * 2 * 3 * 3 * 2 * 9
    assert common.dense_peak_flops(torch.device("cpu"), torch.float32) == max(mm_flops / 0.5, conv_flops / 0.25)
    fastest["conv"] = 1e3
    assert common.dense_peak_flops(torch.device("cpu"), torch.float32) == mm_flops / 0.5


def test_machine_info_records_the_allocator_settings(monkeypatch):
    for name in common.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    assert common.machine_info(torch.device("cpu"))["allocator_env"] == {}
    assert common.describe_allocator() == "default host allocator"
    tunables = "glibc.malloc.mmap_threshold=4294967296"
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "")  # set but empty: no setting
    assert common.machine_info(torch.device("cpu"))["allocator_env"] == {"GLIBC_TUNABLES": tunables}
    assert common.describe_allocator() == f"GLIBC_TUNABLES={tunables}"
