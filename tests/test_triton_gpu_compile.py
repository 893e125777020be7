"""Every Triton kernel, at every configuration its launcher chooses for IPMT's shapes, compiled
for sm_80 (A100) and sm_90 (H100) with Triton's own compiler: no GPU needed (Triton ships
``ptxas``). The interpreter the other tests run accepts programs the GPU compiler rejects and says
nothing of registers or shared memory; this checks what a GPU would get.

The launches are recorded from the launchers themselves (``tests/triton_gpu_compile.py``, which
also prints the table: ``python tests/triton_gpu_compile.py``), so a launcher that starts
choosing other block sizes, warps or dtypes is checked at its new choices.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import triton_gpu_compile
from triton_gpu_compile import ARCHITECTURES


def _nvidia_backend_installed() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend_installed(), reason="needs Triton's NVIDIA backend (ptxas)")

SCRIPT = Path(triton_gpu_compile.__file__)
# Source lines of the deformable sampling's source coordinate (kernels/deform_sample.py): the one
# fused multiply-add it asks for, and the two-rounding form that contraction would fuse.
FUSED_COORDINATE = "return tl.fma(grid_plus_one, half_size, -0.5)"
TWO_ROUNDINGS_COORDINATE = "return grid_plus_one * half_size - 0.5"
DEFORM_KERNELS = ("_ms_deform_sample_fwd_kernel", "_ms_deform_sample_bwd_kernel")


def _compile(capability: int, cache_dir: Path) -> dict:
    # A process of its own: this one imported triton in interpreter mode (tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir / str(capability))
    result = subprocess.run([sys.executable, str(SCRIPT), "--json", "--arch", str(capability)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)[str(capability)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{capability: compile_for(capability)}, both architectures compiled side by side."""
    cache_dir = tmp_path_factory.mktemp("triton-cache")
    with ThreadPoolExecutor(len(ARCHITECTURES)) as pool:
        results = pool.map(lambda capability: _compile(capability, cache_dir), ARCHITECTURES)
        return dict(zip(ARCHITECTURES, results))


def _name(r: dict) -> str:
    return f"{r['kernel']} ({r['config']}, {r['num_warps']} warps; first launched by {r['call_sites'][0]})"


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_every_kernel_compiles_at_every_configuration(compiled, capability):
    result = compiled[capability]
    kernels = {r["kernel"] for r in result["compiled"]}
    assert kernels == set(result["kernels"]), "kernels that IPMT's calls never launch"
    assert result["launches"] > len(result["compiled"]) > len(kernels)


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_shared_memory_within_the_block_limit(compiled, capability):
    limit = ARCHITECTURES[capability].shared_memory_per_block
    over = [f"{_name(r)}: {r['shared_memory']} B" for r in compiled[capability]["compiled"]
            if r["shared_memory"] > limit]
    assert not over, f"more shared memory than sm_{capability}'s {limit} B per block: {over}"


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_registers_fit_a_block(compiled, capability):
    limit = ARCHITECTURES[capability].registers_per_block
    over = [f"{_name(r)}: {r['registers']} x {32 * r['num_warps']} threads"
            for r in compiled[capability]["compiled"] if r["registers"] * 32 * r["num_warps"] > limit]
    assert not over, f"blocks that would not launch (more than {limit} registers): {over}"


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_no_register_spills(compiled, capability):
    spilling = [f"{_name(r)}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
                f"{r['spill_loads']} B spill loads" for r in compiled[capability]["compiled"]
                if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(spilling)


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_every_launch_sets_floating_point_contraction_off(compiled, capability):
    for r in compiled[capability]["compiled"]:
        assert r["launch_options"].get("enable_fp_fusion") is False, _name(r)


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_deformable_sampling_rounds_where_its_source_says(compiled, capability):
    """The PTX of the sampling kernels has a fused multiply-add exactly where the source calls
    ``tl.fma`` (grid_sample's one rounding of the source coordinate), and none in the two-rounding
    variant: the arithmetic the interpreter, and so the CPU tests, verify."""
    for r in compiled[capability]["compiled"]:
        if r["kernel"] not in DEFORM_KERNELS:
            continue
        fmas = r["fused_multiply_adds"]
        if "FUSED=True" in r["config"]:
            assert set(fmas) == {FUSED_COORDINATE}, f"{_name(r)}: {fmas}"
        else:
            assert fmas == {}, f"{_name(r)}: {fmas}"


@pytest.mark.parametrize("capability", ARCHITECTURES)
def test_contraction_would_fuse_the_two_rounding_coordinate(compiled, capability):
    """Why contraction is off: compiled with it on, the two-rounding coordinate becomes an fma."""
    contracted = compiled[capability]["contracted"]
    assert contracted["kernel"] == "_ms_deform_sample_fwd_kernel" and "FUSED=False" in contracted["config"]
    assert contracted["fused_multiply_adds"].get(TWO_ROUNDINGS_COORDINATE, 0) > 0, contracted["fused_multiply_adds"]
