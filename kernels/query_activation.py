"""Triton kernels for two token-wise products with a prototype: thresholded logits and a
matrix product with a per-batch bias and a ReLU epilogue, forward and backward.

Everything here is shape-generic: tensors and strides in, tensors out. Products accumulate in
float32 (float64 for float64 inputs). Half-precision operands go to ``tl.dot`` as they are on a
GPU; on the CPU (Triton's interpreter, whose ``tl.dot`` is wrong on bfloat16) and for float32 /
float64 they are converted to the accumulator type first, and float32 products use IEEE float32
rather than TF32 so that results match a float32 matmul.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .compile_options import launch_options

# Tile sizes. 16 is the smallest row count `tl.dot` accepts on a GPU, so the (usually tiny)
# prototype dimension is padded to it.
PROTOTYPE_BLOCK = 16
TOKEN_BLOCK = 64
CHANNEL_BLOCK = 64
REDUCTION_BLOCK = 32
# At 4 warps the float32 and float64 products (IEEE, so FMA loops rather than tensor cores) of
# the 64 x 64 tiles took all 255 registers and spilled, and ptxas for sm_90 spilled the bf16 /
# fp16 logits kernel at 72 registers; at 8 warps every kernel and dtype compiles for sm_80 and
# sm_90 without spills (tests/test_triton_gpu_compile.py).
NUM_WARPS = 8
NUM_STAGES = 3

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are carried in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_operand_dtype(t: torch.Tensor):
    """The Triton dtype ``tl.dot`` operands are converted to for inputs like ``t``."""
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cuda":
        return _TL_DTYPES[t.dtype]
    return _TL_DTYPES[accumulator_dtype(t.dtype)]


# acc + a @ b with the operands in DOT_DTYPE; float32 operands multiply in IEEE float32.
@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")


# A[rows, :] @ B[cols, :]^T for one output tile, reducing over K in BLOCK_K steps; both operands
# are read straight from their strides (B transposed on load), out-of-range rows/cols/K as zeros.
@triton.jit
def _tile_matmul_nt(a_base, stride_a_row, stride_a_k, b_base, stride_b_row, stride_b_k, rows, cols, ROWS, COLS, K,
                    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=ACC_DTYPE)
    k_range = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + k_range
        a = tl.load(a_base + rows[:, None] * stride_a_row + k[None, :] * stride_a_k,
                    mask=(rows[:, None] < ROWS) & (k[None, :] < K), other=0.0)
        bt = tl.load(b_base + k[:, None] * stride_b_k + cols[None, :] * stride_b_row,
                     mask=(k[:, None] < K) & (cols[None, :] < COLS), other=0.0)
        acc = _dot(a, bt, acc, DOT_DTYPE)
    return acc


# --------------------------------------------------------------------------------------------
# logits[b, m, n] = sum_c A[b, m, c] * B[b, n, c];  keep[b, m, n] = logits[b, m, n] >= threshold
# --------------------------------------------------------------------------------------------

@triton.jit
def _thresholded_logits_kernel(
    a_ptr, b_ptr, logits_ptr, keep_ptr,
    M, N, C,
    stride_ab, stride_am, stride_ac,
    stride_bb, stride_bn, stride_bc,
    stride_lb, stride_lm, stride_ln,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, THRESHOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _tile_matmul_nt(a_ptr + batch * stride_ab, stride_am, stride_ac, b_ptr + batch * stride_bb, stride_bn,
                          stride_bc, rows, cols, M, N, C, ACC_DTYPE, DOT_DTYPE, BLOCK_M, BLOCK_N, BLOCK_C)

    # The threshold applies to the logits as stored (rounded to their dtype), like a test on the
    # returned tensor would; compared in the accumulator type (exact, and the interpreter cannot
    # compare bfloat16). THRESHOLD is a compile-time float (one per dtype), exact in ACC_DTYPE.
    logits = acc.to(logits_ptr.dtype.element_ty)
    keep = logits.to(ACC_DTYPE) >= THRESHOLD
    out = batch * stride_lb + rows[:, None] * stride_lm + cols[None, :] * stride_ln
    in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(logits_ptr + out, logits, mask=in_bounds)
    tl.store(keep_ptr + out, keep.to(tl.uint8), mask=in_bounds)


def thresholded_logits(a: torch.Tensor, b: torch.Tensor, threshold: float):
    """``logits = a @ b^T`` per batch and ``logits >= threshold``, in one pass over ``b``.

    Args:
        a: ``(B, M, C)``; b: ``(B, N, C)``, same dtype, any strides.
        threshold: a float exactly representable in ``a``'s dtype (it becomes a kernel constant).

    Returns:
        ``(logits (B, M, N) of a's dtype, keep (B, M, N) bool)``, both contiguous.
    """
    batch, m, c = a.shape
    n = b.shape[1]
    logits = torch.empty((batch, m, n), dtype=a.dtype, device=a.device)
    keep = torch.empty((batch, m, n), dtype=torch.bool, device=a.device)
    grid = (triton.cdiv(n, TOKEN_BLOCK), triton.cdiv(m, PROTOTYPE_BLOCK), batch)
    wrap_triton(_thresholded_logits_kernel)[grid](
        a, b, logits, keep.view(torch.uint8),
        m, n, c,
        *a.stride(), *b.stride(), *logits.stride(),
        ACC_DTYPE=_TL_DTYPES[accumulator_dtype(a.dtype)], DOT_DTYPE=_dot_operand_dtype(a), THRESHOLD=threshold,
        BLOCK_M=PROTOTYPE_BLOCK, BLOCK_N=TOKEN_BLOCK, BLOCK_C=CHANNEL_BLOCK, **launch_options(NUM_WARPS, NUM_STAGES),
    )
    return logits, keep


@triton.jit
def _logits_backward_kernel(
    grad_ptr, a_ptr, b_ptr, grad_b_ptr, grad_a_partial_ptr,
    M, N, C,
    stride_gb, stride_gm, stride_gn,
    stride_ab, stride_am, stride_ac,
    stride_bb, stride_bn, stride_bc,
    stride_db, stride_dn, stride_dc,
    stride_pb, stride_pt, stride_pm, stride_pc,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    protos = tl.arange(0, BLOCK_M)
    token_chan_mask = (tokens[:, None] < N) & (chans[None, :] < C)

    b_tile = tl.load(b_ptr + batch * stride_bb + tokens[:, None] * stride_bn + chans[None, :] * stride_bc,
                     mask=token_chan_mask, other=0.0)
    grad_b = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + protos
        grad = tl.load(grad_ptr + batch * stride_gb + m[:, None] * stride_gm + tokens[None, :] * stride_gn,
                       mask=(m[:, None] < M) & (tokens[None, :] < N), other=0.0)
        a = tl.load(a_ptr + batch * stride_ab + m[:, None] * stride_am + chans[None, :] * stride_ac,
                    mask=(m[:, None] < M) & (chans[None, :] < C), other=0.0)
        grad_b = _dot(tl.trans(grad), a, grad_b, DOT_DTYPE)
        # This token block's share of grad_a; the blocks are summed by the launcher.
        grad_a = _dot(grad, b_tile, tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE), DOT_DTYPE)
        tl.store(grad_a_partial_ptr + batch * stride_pb + pid_n * stride_pt + m[:, None] * stride_pm
                 + chans[None, :] * stride_pc, grad_a, mask=(m[:, None] < M) & (chans[None, :] < C))
    tl.store(grad_b_ptr + batch * stride_db + tokens[:, None] * stride_dn + chans[None, :] * stride_dc,
             grad_b.to(grad_b_ptr.dtype.element_ty), mask=token_chan_mask)


def logits_backward(grad_logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Gradients of ``logits = a @ b^T`` (per batch): ``(grad_logits @ b, grad_logits^T @ a)``.

    One kernel reads ``grad_logits`` and ``b`` once: each program owns a (tokens x channels) tile
    of ``grad_b`` and writes its token block's contribution to ``grad_a`` into a small
    ``(B, N / TOKEN_BLOCK, M, C)`` buffer, summed afterwards (deterministic, unlike atomics).
    """
    batch, m, c = a.shape
    n = b.shape[1]
    token_blocks = triton.cdiv(n, TOKEN_BLOCK)
    acc_dtype = accumulator_dtype(a.dtype)
    grad_b = torch.empty((batch, n, c), dtype=b.dtype, device=b.device)
    grad_a_partial = torch.empty((batch, token_blocks, m, c), dtype=acc_dtype, device=a.device)
    grid = (token_blocks, triton.cdiv(c, CHANNEL_BLOCK), batch)
    wrap_triton(_logits_backward_kernel)[grid](
        grad_logits, a, b, grad_b, grad_a_partial,
        m, n, c,
        *grad_logits.stride(), *a.stride(), *b.stride(), *grad_b.stride(), *grad_a_partial.stride(),
        ACC_DTYPE=_TL_DTYPES[acc_dtype], DOT_DTYPE=_dot_operand_dtype(a),
        BLOCK_M=PROTOTYPE_BLOCK, BLOCK_N=TOKEN_BLOCK, BLOCK_C=CHANNEL_BLOCK, **launch_options(NUM_WARPS, NUM_STAGES),
    )
    return grad_a_partial.sum(dim=1).to(a.dtype), grad_b


# --------------------------------------------------------------------------------------------
# Y[b, n, o] = ReLU(sum_k X[b, n, k] * W[o, k] + bias[b, o])
# --------------------------------------------------------------------------------------------

@triton.jit
def _bias_relu_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    N, K, O,
    stride_xb, stride_xn, stride_xk,
    stride_wo, stride_wk,
    stride_biasb, stride_biaso,
    stride_yb, stride_yn, stride_yo,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = _tile_matmul_nt(x_ptr + batch * stride_xb, stride_xn, stride_xk, w_ptr, stride_wo, stride_wk,
                          rows, outs, N, O, K, ACC_DTYPE, DOT_DTYPE, BLOCK_N, BLOCK_O, BLOCK_K)

    bias = tl.load(bias_ptr + batch * stride_biasb + outs * stride_biaso, mask=outs < O, other=0.0)
    y = tl.maximum(acc + bias.to(ACC_DTYPE)[None, :], 0.0)
    tl.store(y_ptr + batch * stride_yb + rows[:, None] * stride_yn + outs[None, :] * stride_yo,
             y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (outs[None, :] < O))


def bias_relu_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``ReLU(x @ weight^T + bias[:, None, :])`` with the bias and ReLU applied in the epilogue.

    Args:
        x: ``(B, N, K)``; weight: ``(O, K)`` (x's dtype); bias: ``(B, O)`` (any float dtype; added
            in the accumulator type). Any strides.

    Returns:
        ``(B, N, O)`` contiguous, x's dtype.
    """
    batch, n, k = x.shape
    o = weight.shape[0]
    y = torch.empty((batch, n, o), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, TOKEN_BLOCK), triton.cdiv(o, CHANNEL_BLOCK), batch)
    wrap_triton(_bias_relu_matmul_kernel)[grid](
        x, weight, bias, y,
        n, k, o,
        *x.stride(), *weight.stride(), *bias.stride(), *y.stride(),
        ACC_DTYPE=_TL_DTYPES[accumulator_dtype(x.dtype)], DOT_DTYPE=_dot_operand_dtype(x),
        BLOCK_N=TOKEN_BLOCK, BLOCK_O=CHANNEL_BLOCK, BLOCK_K=REDUCTION_BLOCK, **launch_options(NUM_WARPS, NUM_STAGES),
    )
    return y


@triton.jit
def _relu_grad_matmul_kernel(
    grad_y_ptr, y_ptr, w_ptr, grad_x_ptr, grad_pre_ptr, bias_grad_partial_ptr,
    N, K, O,
    stride_gb, stride_gn, stride_go,
    stride_yb, stride_yn, stride_yo,
    stride_wo, stride_wk,
    stride_xb, stride_xn, stride_xk,
    stride_zb, stride_zn, stride_zo,
    stride_pb, stride_pt, stride_po,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_range = tl.arange(0, BLOCK_O)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for o0 in range(0, O, BLOCK_O):
        o = o0 + o_range
        tile_mask = (rows[:, None] < N) & (o[None, :] < O)
        grad_y = tl.load(grad_y_ptr + batch * stride_gb + rows[:, None] * stride_gn + o[None, :] * stride_go,
                         mask=tile_mask, other=0.0)
        y = tl.load(y_ptr + batch * stride_yb + rows[:, None] * stride_yn + o[None, :] * stride_yo,
                    mask=tile_mask, other=0.0)
        # ReLU's gradient from its output: zero where the output was clamped (exact, no rounding).
        grad_pre = tl.where(y.to(ACC_DTYPE) > 0, grad_y, tl.zeros_like(grad_y))
        w = tl.load(w_ptr + o[:, None] * stride_wo + ks[None, :] * stride_wk,
                    mask=(o[:, None] < O) & (ks[None, :] < K), other=0.0)
        acc = _dot(grad_pre, w, acc, DOT_DTYPE)
        # Every program of a token block derives the same grad_pre tiles; the first publishes them.
        if pid_k == 0:
            tl.store(grad_pre_ptr + batch * stride_zb + rows[:, None] * stride_zn + o[None, :] * stride_zo,
                     grad_pre, mask=tile_mask)
            tl.store(bias_grad_partial_ptr + batch * stride_pb + pid_n * stride_pt + o * stride_po,
                     tl.sum(grad_pre.to(ACC_DTYPE), axis=0), mask=o < O)
    tl.store(grad_x_ptr + batch * stride_xb + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
             acc.to(grad_x_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (ks[None, :] < K))


def relu_grad_matmul(grad_y: torch.Tensor, y: torch.Tensor, weight: torch.Tensor):
    """Backward of ``y = ReLU(x @ weight^T + bias)`` from its output ``y``.

    Returns ``(grad_x, grad_pre, grad_bias)``: ``grad_pre = grad_y * (y > 0)`` ``(B, N, O)`` in
    grad_y's dtype (exact), ``grad_x = grad_pre @ weight`` ``(B, N, K)`` and ``grad_bias =
    grad_pre.sum(1)`` ``(B, O)`` in the accumulator dtype, all from one kernel. The per-token-block
    column sums go to a small ``(B, N / TOKEN_BLOCK, O)`` buffer, summed afterwards.
    """
    batch, n, o = y.shape
    k = weight.shape[1]
    token_blocks = triton.cdiv(n, TOKEN_BLOCK)
    acc_dtype = accumulator_dtype(y.dtype)
    grad_x = torch.empty((batch, n, k), dtype=y.dtype, device=y.device)
    grad_pre = torch.empty((batch, n, o), dtype=grad_y.dtype, device=y.device)
    bias_grad_partial = torch.empty((batch, token_blocks, o), dtype=acc_dtype, device=y.device)
    grid = (token_blocks, triton.cdiv(k, CHANNEL_BLOCK), batch)
    wrap_triton(_relu_grad_matmul_kernel)[grid](
        grad_y, y, weight, grad_x, grad_pre, bias_grad_partial,
        n, k, o,
        *grad_y.stride(), *y.stride(), *weight.stride(), *grad_x.stride(), *grad_pre.stride(),
        *bias_grad_partial.stride(),
        ACC_DTYPE=_TL_DTYPES[acc_dtype], DOT_DTYPE=_dot_operand_dtype(y),
        BLOCK_N=TOKEN_BLOCK, BLOCK_K=CHANNEL_BLOCK, BLOCK_O=REDUCTION_BLOCK, **launch_options(NUM_WARPS, NUM_STAGES),
    )
    return grad_x, grad_pre, bias_grad_partial.sum(dim=1)
