"""The compile options every launcher in this package passes with every launch.

Floating-point contraction is set explicitly: Triton 3.9 contracts a multiply and an add into one
fused multiply-add unless told otherwise and warns that 3.10 will not. Contraction off, a kernel
rounds exactly where its source says: separately written multiplies and adds round twice, as in
Triton's interpreter (what the CPU tests run), and ``tl.fma`` rounds once where a kernel must
reproduce a fused rounding (grid_sample's source coordinate). With contraction on, the deformable
sampling's two-rounding coordinate ``(g + 1) * (size / 2) - 0.5`` compiles to an ``fma.rn``, i.e.
to the other rounding, which moves sampling points that sit on a pixel centre to its other side;
``tests/test_triton_gpu_compile.py`` checks the PTX for that.

A launcher that wants several programs on an SM at once also states the register budget that
allows it (``maxnreg``). Without one, ``ptxas`` as Triton runs it (``--regAllocOptLevel=2``) picks
its own register target and may spill a few bytes to meet it: for the prototype attention's
backward on sm_90 it allocated 128 registers and spilled 4 bytes; with the budget of two programs
per SM (128) it used 128 registers and spilled nothing. A budget is no free hint either: given 255
on sm_90, ptxas used up to 255 registers for query_activation's float32 products (60-111 without
a budget) and spilled 4 bytes in one, so launches without a reason for a budget state none.

The interpreter ignores these options (it has no warps, pipelining, contraction or registers).
"""
from __future__ import annotations

from typing import Optional

ENABLE_FP_FUSION = False
# Software-pipelining depth of loops with loads, Triton's own default (what launches that do not
# choose one get).
DEFAULT_NUM_STAGES = 3
WARP_SIZE = 32
# Registers of one SM, and at most one thread's (sm_80 and sm_90 alike).
REGISTERS_PER_SM = 64 * 1024
MAX_REGISTERS_PER_THREAD = 255


def launch_options(num_warps: int, num_stages: int = DEFAULT_NUM_STAGES,
                   programs_per_sm: Optional[int] = None) -> dict:
    """Keyword arguments that fix how a launch compiles: warps, pipeline stages, contraction and,
    given ``programs_per_sm``, the register budget that lets that many programs share an SM."""
    options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=ENABLE_FP_FUSION)
    if programs_per_sm is not None:
        options["maxnreg"] = min(MAX_REGISTERS_PER_THREAD,
                                 REGISTERS_PER_SM // (programs_per_sm * WARP_SIZE * num_warps))
    return options
