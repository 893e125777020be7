"""The compile options every launcher in this package passes with every launch.

Floating-point contraction is set explicitly: Triton 3.9 contracts a multiply and an add into one
fused multiply-add unless told otherwise and warns that 3.10 will not. Contraction off, a kernel
rounds exactly where its source says: separately written multiplies and adds round twice, as in
Triton's interpreter (what the CPU tests run), and ``tl.fma`` rounds once where a kernel must
reproduce a fused rounding (grid_sample's source coordinate). With contraction on, the deformable
sampling's two-rounding coordinate ``(g + 1) * (size / 2) - 0.5`` compiles to an ``fma.rn``, i.e.
to the other rounding, which moves sampling points that sit on a pixel centre to its other side;
``tests/test_triton_gpu_compile.py`` checks the PTX for that.

The interpreter ignores these options (it has no warps, pipelining or contraction).
"""
from __future__ import annotations

ENABLE_FP_FUSION = False
# Software-pipelining depth of loops with loads, Triton's own default (what launches that do not
# choose one get).
DEFAULT_NUM_STAGES = 3
# Warps of a program, Triton's own default.
DEFAULT_NUM_WARPS = 4


def launch_options(num_warps: int, num_stages: int = DEFAULT_NUM_STAGES) -> dict:
    """Keyword arguments that fix how a launch compiles: warps, pipeline stages, contraction."""
    return dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=ENABLE_FP_FUSION)
