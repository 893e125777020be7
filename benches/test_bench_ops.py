"""Op micro-benchmarks through pytest-benchmark.

    pytest benches/ --benchmark-only                # every op x backend x mode, small shapes
    pytest benches/ --benchmark-only -k attention --benchmark-columns=median,iqr,rounds

Shapes are small on the CPU so the whole file runs in seconds; on CUDA they are IPMT's (B=4,
3600 tokens, C=384). Backends that cannot run here are skipped with the registry's reason. Each
benchmark first checks its forward output against the reference form (the op test files in
``tests/`` are the real equivalence suite; this only guards the benchmark's own inputs).
Without ``--benchmark-only`` the same tests run, benchmarks included.
"""
from __future__ import annotations

import pytest
import torch

from ipmt_fast.ops import registry
from tests.compare import assert_close

from . import ops as bench_ops
from .common import synchronize

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, TOKENS, WIDTH = (4, 3600, 384) if DEVICE.type == "cuda" else (1, 400, 64)
ROUNDS = 50 if DEVICE.type == "cuda" else 5
DTYPE = torch.float32
# fp32 through a fused kernel may use TF32 dots on a GPU; this only guards against wrong inputs.
RTOL = ATOL = 1e-2 if DEVICE.type == "cuda" else 1e-4


def _variants():
    for op, case in bench_ops.CASES.items():
        for variant in (*registry.registered_backends(op), *case.alternatives):
            for mode in bench_ops.MODES:
                yield pytest.param(op, variant, mode, id=f"{op}-{variant}-{mode}")


@pytest.mark.parametrize("op,variant,mode", list(_variants()))
def test_op(benchmark, op, variant, mode):
    case = bench_ops.CASES[op]
    if variant in case.alternatives:
        fn = case.alternatives[variant]
    else:
        try:
            registry.get_implementation(op, variant, DEVICE)
        except (RuntimeError, ValueError) as exc:
            pytest.skip(str(exc))
        fn = case.public(variant)
    torch.manual_seed(0)
    inputs = bench_ops.prepare_inputs(case, BATCH, TOKENS, WIDTH, DTYPE, DEVICE, mode)[0]
    with torch.no_grad():
        expected = bench_ops._first(case.reference(*inputs.args))
        got = bench_ops._first(fn(*inputs.args))
    assert_close(got, expected, rtol=RTOL, atol=ATOL, name=f"{op} {variant}")

    def call():
        bench_ops.run_once(fn, inputs, mode)
        synchronize(DEVICE)

    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, tokens=TOKENS, width=WIDTH, dtype=str(DTYPE),
                                floor_bytes=bench_ops.traffic_floor_bytes(case, inputs, mode))
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
