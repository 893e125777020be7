"""Masked softmax pooling of tokens by a few query rows: Triton kernels and their launchers.

For query rows ``q`` (B, M, C), tokens ``T`` (B, N, C), a boolean token mask (B, N) and an
optional multiplier ``keep`` (B, M, N) the kernels compute::

    s[b,m,n]    = scale * q[b,m] . T[b,n] + (0 if mask[b,n] else masked_bias)
    a[b,m,:]    = softmax_n(s[b,m,:])
    pooled[b,m] = sum_n a[b,m,n] keep[b,m,n] T[b,n]

without ever forming an (N, C) intermediate:

``softmax_pool_forward``
    Splits the token axis into spans (so a few long rows still fill the GPU); each program streams
    its span once with an online softmax in fp32 and writes a partial (max, sum, pooled); a
    combine kernel merges the spans into ``pooled`` and the per-row log-sum-exp.
``softmax_pool_backward``
    Recomputes ``a`` from the saved log-sum-exp in one more pass over the tokens and writes
    ``dT`` once plus per-span partials of ``dq`` (summed afterwards)::

        dw_n = dpooled . T_n                       (gradient of the pooling weight a_n keep_n)
        ds_n = a_n (keep_n dw_n - dpooled . pooled) (softmax backward: sum_j a_j keep_j dw_j = dpooled . pooled)
        dT_n = sum_m (a_n keep_n dpooled + scale ds_n q)
        dq   = scale sum_n ds_n T_n

Inputs of any float dtype and any strides are read as they are (a transposed token map is fine);
arithmetic is fp32 (no ``tl.dot``: the row count is tiny and fp32 dots would round to tf32), and
outputs are written in the input dtype. Up to ``MAX_BLOCK_M`` query rows share one read of the
tokens; more rows take more passes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .compile_options import launch_options

# A program holds BLOCK_M x BLOCK_N x BLOCK_C fp32 products in registers. At this many elements
# and warps every kernel fits the register budget of RESIDENT_PROGRAMS programs per SM (128 per
# thread; inputs of up to 32 bits) without spills on sm_80 and sm_90
# (tests/test_triton_gpu_compile.py); twice the tile needs 170-255 registers.
NUM_WARPS = 8
TILE_ELEMENTS = 8192
RESIDENT_PROGRAMS = 2
# Query rows handled per pass over the tokens (registers grow with it).
MAX_BLOCK_M = 4
MAX_BLOCK_N = 128
# Enough spans to give every SM a few programs (hides memory latency); each span costs (C + 2)
# fp32 of partials per row, so a span is never shorter than one block.
PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another: a few spans still exercise the combine step.
INTERPRETER_PROGRAMS = 8
# Spans merged per step of the combine kernel, at most (times BLOCK_C elements in registers).
COMBINE_TILE_ELEMENTS = 8192


@dataclass(frozen=True)
class TokenSplit:
    """How the token axis is cut: rows per pass, tokens per block and per span, span count."""

    block_m: int
    block_n: int
    block_c: int
    tokens_per_split: int
    num_splits: int


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if device_index is None
                                            else device_index).multi_processor_count


def plan_token_split(batch: int, rows: int, tokens: int, channels: int, device: torch.device,
                     row_blocks_in_grid: bool, block_m: Optional[int] = None,
                     block_n: Optional[int] = None, tokens_per_split: Optional[int] = None) -> TokenSplit:
    """Block sizes and span count for ``batch`` x ``rows`` queries over ``tokens`` tokens.

    ``row_blocks_in_grid``: whether each block of rows gets its own programs (forward) or one
    program loops over all rows of its span (backward, which must sum dT over rows).
    ``block_m``, ``block_n`` and ``tokens_per_split`` override the heuristics (tests use them to
    force several passes, blocks and spans on small shapes).
    """
    block_c = triton.next_power_of_2(channels)
    if block_m is None:
        block_m = min(triton.next_power_of_2(rows), MAX_BLOCK_M)
    if block_n is None:
        fit = max(1, TILE_ELEMENTS // (block_m * block_c))
        block_n = min(MAX_BLOCK_N, 1 << (fit.bit_length() - 1))
    if tokens_per_split is None:
        if device.type == "cuda":
            target_programs = _multiprocessor_count(device.index) * PROGRAMS_PER_SM
        else:
            target_programs = INTERPRETER_PROGRAMS
        programs_per_span = batch * (triton.cdiv(rows, block_m) if row_blocks_in_grid else 1)
        splits_wanted = max(1, target_programs // programs_per_span)
        tokens_per_split = triton.cdiv(triton.cdiv(tokens, splits_wanted), block_n) * block_n
    return TokenSplit(block_m, block_n, block_c, tokens_per_split, triton.cdiv(tokens, tokens_per_split))


def _launch_options(tokens: torch.Tensor) -> dict:
    """Compile options of every launch: the register budget of ``RESIDENT_PROGRAMS`` programs per
    SM, except for float64 tokens, whose loads and stores take twice the registers (up to 150
    per thread on sm_80, which a budget of 128 made spill)."""
    return launch_options(NUM_WARPS, programs_per_sm=RESIDENT_PROGRAMS if tokens.element_size() <= 4 else None)


def _rows_with_allowed_tokens(token_mask: torch.Tensor) -> torch.Tensor:
    """(B,) uint8: whether each batch row allows any token.

    A row with no allowed token gets a uniform bias, i.e. a plain softmax, so the kernels drop the
    bias there: same result in exact arithmetic, and fp32 does not round those logits to the
    spacing of floats near ``masked_bias`` (2**-10 near -10000).
    """
    return token_mask.any(dim=1).view(torch.uint8)


@triton.jit
def _row_masked_bias(row_has_allowed_ptr, masked_bias):
    """The bias of masked-out tokens in this batch row: none if the row has no allowed token."""
    return tl.where(tl.load(row_has_allowed_ptr) != 0, masked_bias, 0.0)


@triton.jit
def _load_token_block(tokens_ptr, mask_ptr, offs_n, n_valid, offs_c, c_valid, stride_tn, stride_tc, stride_mn):
    """A (BLOCK_N, BLOCK_C) fp32 token tile (zeros outside) and its (BLOCK_N,) allowed flags."""
    tokens = tl.load(tokens_ptr + offs_n[:, None] * stride_tn + offs_c[None, :] * stride_tc,
                     mask=n_valid[:, None] & c_valid[None, :], other=0.0).to(tl.float32)
    allowed = tl.load(mask_ptr + offs_n * stride_mn, mask=n_valid, other=0) != 0
    return tokens, allowed


# The three contractions of a (BLOCK_M, BLOCK_C) row tile, a (BLOCK_N, BLOCK_C) token tile and a
# (BLOCK_M, BLOCK_N) weight tile. With one row (IPMT's case) they are written as 2-D products so
# the token tile stays in the layout it was loaded in (a 3-D product moves it through shared
# memory); summing over the size-1 row axis just drops that axis.
@triton.jit
def _rows_dot_tokens(rows, tokens, BLOCK_M: tl.constexpr):
    """sum_c rows[m, c] tokens[n, c] -> (BLOCK_M, BLOCK_N)."""
    if BLOCK_M == 1:
        out = tl.sum(tl.sum(rows, axis=0)[None, :] * tokens, axis=1)[None, :]
    else:
        out = tl.sum(rows[:, None, :] * tokens[None, :, :], axis=2)
    return out


@triton.jit
def _weights_times_tokens(weights, tokens, BLOCK_M: tl.constexpr):
    """sum_n weights[m, n] tokens[n, c] -> (BLOCK_M, BLOCK_C)."""
    if BLOCK_M == 1:
        out = tl.sum(tl.sum(weights, axis=0)[:, None] * tokens, axis=0)[None, :]
    else:
        out = tl.sum(weights[:, :, None] * tokens[None, :, :], axis=1)
    return out


@triton.jit
def _weights_times_rows(weights, rows, BLOCK_M: tl.constexpr):
    """sum_m weights[m, n] rows[m, c] -> (BLOCK_N, BLOCK_C)."""
    if BLOCK_M == 1:
        out = tl.sum(weights, axis=0)[:, None] * tl.sum(rows, axis=0)[None, :]
    else:
        out = tl.sum(weights[:, :, None] * rows[:, None, :], axis=0)
    return out


@triton.jit
def _block_logits(query, tokens, allowed, n_valid, scale, masked_bias, BLOCK_M: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits of query rows against a token tile; -inf past the span."""
    dots = _rows_dot_tokens(query, tokens, BLOCK_M)
    logits = dots * scale + tl.where(allowed, 0.0, masked_bias)[None, :]
    return tl.where(n_valid[None, :], logits, float("-inf"))


@triton.jit
def _load_rows(ptr, offs_m, m_valid, offs_c, c_valid, stride_m, stride_c):
    """A (BLOCK_M, BLOCK_C) fp32 tile of per-row vectors (zeros outside)."""
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c,
                   mask=m_valid[:, None] & c_valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _softmax_pool_partial_kernel(
        query_ptr, tokens_ptr, mask_ptr, keep_ptr, row_has_allowed_ptr, masked_bias,
        part_max_ptr, part_sum_ptr, part_pooled_ptr,
        M, N, C, tokens_per_split, num_splits, scale,
        stride_qb, stride_qm, stride_qc, stride_tb, stride_tn, stride_tc, stride_mb, stride_mn,
        stride_kb, stride_km, stride_kn,
        HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """One span of tokens for BLOCK_M rows: running max, softmax denominator, unnormalised pool."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    query = _load_rows(query_ptr + pid_b * stride_qb, offs_m, m_valid, offs_c, c_valid, stride_qm, stride_qc)
    row_bias = _row_masked_bias(row_has_allowed_ptr + pid_b, masked_bias)
    tokens_ptr += pid_b * stride_tb
    mask_ptr += pid_b * stride_mb
    keep_ptr += pid_b * stride_kb

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    pooled = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        tokens, allowed = _load_token_block(tokens_ptr, mask_ptr, offs_n, n_valid, offs_c, c_valid,
                                            stride_tn, stride_tc, stride_mn)
        logits = _block_logits(query, tokens, allowed, n_valid, scale, row_bias, BLOCK_M)
        # Every block holds at least one token of the span, so new_max is finite.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        if HAS_KEEP:
            probs *= tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_n[None, :] * stride_kn,
                             mask=m_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
        pooled = pooled * rescale[:, None] + _weights_times_tokens(probs, tokens, BLOCK_M)
        row_max = new_max

    part = (pid_b * M + offs_m) * num_splits + pid_s
    tl.store(part_max_ptr + part, row_max, mask=m_valid)
    tl.store(part_sum_ptr + part, row_sum, mask=m_valid)
    tl.store(part_pooled_ptr + part[:, None] * C + offs_c[None, :], pooled, mask=m_valid[:, None] & c_valid[None, :])


@triton.jit
def _softmax_pool_combine_kernel(
        part_max_ptr, part_sum_ptr, part_pooled_ptr, pooled_ptr, lse_ptr,
        M, C, num_splits, stride_pb, stride_pm, stride_pc,
        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge one row's span partials: pooled = sum_s e^(max_s - max) pooled_s / denominator."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    part_max_ptr += row * num_splits
    part_sum_ptr += row * num_splits
    part_pooled_ptr += row * num_splits * C

    running_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_valid = s0 + offs_s < num_splits
        running_max = tl.maximum(running_max, tl.load(part_max_ptr + s0 + offs_s, mask=s_valid,
                                                      other=float("-inf")))
    row_max = tl.max(running_max, axis=0)

    denominator = tl.zeros([BLOCK_S], tl.float32)
    pooled = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_valid = s0 + offs_s < num_splits
        weight = tl.exp(tl.load(part_max_ptr + s0 + offs_s, mask=s_valid, other=float("-inf")) - row_max)
        denominator += weight * tl.load(part_sum_ptr + s0 + offs_s, mask=s_valid, other=0.0)
        partial = tl.load(part_pooled_ptr + (s0 + offs_s)[:, None] * C + offs_c[None, :],
                          mask=s_valid[:, None] & c_valid[None, :], other=0.0)
        pooled += tl.sum(weight[:, None] * partial, axis=0)
    total = tl.sum(denominator, axis=0)

    b = row // M
    m = row % M
    tl.store(pooled_ptr + b * stride_pb + m * stride_pm + offs_c * stride_pc, pooled / total, mask=c_valid)
    tl.store(lse_ptr + row, row_max + tl.log(total))


@triton.jit
def _softmax_pool_backward_kernel(
        query_ptr, tokens_ptr, mask_ptr, keep_ptr, row_has_allowed_ptr, masked_bias, lse_ptr, pooled_ptr,
        grad_pooled_ptr, grad_tokens_ptr, grad_query_part_ptr,
        M, N, C, tokens_per_split, num_splits, scale,
        stride_qb, stride_qm, stride_qc, stride_tb, stride_tn, stride_tc, stride_mb, stride_mn,
        stride_kb, stride_km, stride_kn, stride_pb, stride_pm, stride_pc, stride_gb, stride_gm, stride_gc,
        stride_dtb, stride_dtn, stride_dtc,
        HAS_KEEP: tl.constexpr, STORE_GRAD_TOKENS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """One span of tokens, all rows (BLOCK_M at a time): dT for the span, span partial of dq."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    row_bias = _row_masked_bias(row_has_allowed_ptr + pid_b, masked_bias)
    query_ptr += pid_b * stride_qb
    tokens_ptr += pid_b * stride_tb
    mask_ptr += pid_b * stride_mb
    keep_ptr += pid_b * stride_kb
    pooled_ptr += pid_b * stride_pb
    grad_pooled_ptr += pid_b * stride_gb
    grad_tokens_ptr += pid_b * stride_dtb
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)

    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < M
        query = _load_rows(query_ptr, offs_m, m_valid, offs_c, c_valid, stride_qm, stride_qc)
        grad_pooled = _load_rows(grad_pooled_ptr, offs_m, m_valid, offs_c, c_valid, stride_gm, stride_gc)
        pooled = _load_rows(pooled_ptr, offs_m, m_valid, offs_c, c_valid, stride_pm, stride_pc)
        # sum_j a_j keep_j (dpooled . T_j), the softmax backward's row term.
        grad_dot_pooled = tl.sum(grad_pooled * pooled, axis=1)
        lse = tl.load(lse_ptr + pid_b * M + offs_m, mask=m_valid, other=0.0)
        grad_query = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_valid = offs_n < end
            tokens, allowed = _load_token_block(tokens_ptr, mask_ptr, offs_n, n_valid, offs_c, c_valid,
                                                stride_tn, stride_tc, stride_mn)
            logits = _block_logits(query, tokens, allowed, n_valid, scale, row_bias, BLOCK_M)
            attn = tl.where(m_valid[:, None], tl.exp(logits - lse[:, None]), 0.0)
            grad_weights = _rows_dot_tokens(grad_pooled, tokens, BLOCK_M)
            if HAS_KEEP:
                keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_n[None, :] * stride_kn,
                               mask=m_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
                weights = attn * keep
                grad_attn = keep * grad_weights
            else:
                weights = attn
                grad_attn = grad_weights
            grad_logits_scaled = scale * attn * (grad_attn - grad_dot_pooled[:, None])
            grad_query += _weights_times_tokens(grad_logits_scaled, tokens, BLOCK_M)
            if STORE_GRAD_TOKENS:
                grad_tokens = (_weights_times_rows(weights, grad_pooled, BLOCK_M)
                               + _weights_times_rows(grad_logits_scaled, query, BLOCK_M))
                grad_tokens_ptrs = grad_tokens_ptr + offs_n[:, None] * stride_dtn + offs_c[None, :] * stride_dtc
                tile_valid = n_valid[:, None] & c_valid[None, :]
                # Later passes over rows add to what earlier passes wrote (the launcher gives an
                # fp32 buffer then); the first pass loads nothing.
                grad_tokens += tl.load(grad_tokens_ptrs, mask=tile_valid & (m0 > 0), other=0.0).to(tl.float32)
                tl.store(grad_tokens_ptrs, grad_tokens, mask=tile_valid)
        part = ((pid_b * num_splits + pid_s) * M + offs_m) * C
        tl.store(grad_query_part_ptr + part[:, None] + offs_c[None, :], grad_query,
                 mask=m_valid[:, None] & c_valid[None, :])


def _keep_args(keep: Optional[torch.Tensor], fallback: torch.Tensor):
    """Pointer and strides for the optional keep multiplier (any tensor stands in when absent)."""
    if keep is None:
        return fallback, (0, 0, 0)
    return keep, keep.stride()


def softmax_pool_forward(query: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                         keep: Optional[torch.Tensor], scale: float, masked_bias: float,
                         block_m: Optional[int] = None, block_n: Optional[int] = None,
                         tokens_per_split: Optional[int] = None):
    """``pooled`` (B, M, C) in ``tokens.dtype`` and the fp32 log-sum-exp (B, M) of the logits.

    Args:
        query: (B, M, C) query rows.  tokens: (B, N, C), N >= 1.  token_mask: (B, N) bool.
        keep: optional (B, M, N) multiplier of the softmax weights (not of its denominator).
        scale: logit scale.  masked_bias: additive logit bias of masked-out tokens.
        block_m, block_n, tokens_per_split: optional overrides of :func:`plan_token_split`.
    """
    batch, rows, channels = query.shape
    n = tokens.shape[1]
    split = plan_token_split(batch, rows, n, channels, tokens.device, True,
                             block_m, block_n, tokens_per_split)
    f32 = dict(device=tokens.device, dtype=torch.float32)
    part_max = torch.empty(batch, rows, split.num_splits, **f32)
    part_sum = torch.empty(batch, rows, split.num_splits, **f32)
    part_pooled = torch.empty(batch, rows, split.num_splits, channels, **f32)
    pooled = torch.empty(batch, rows, channels, device=tokens.device, dtype=tokens.dtype)
    lse = torch.empty(batch, rows, **f32)
    mask = token_mask.view(torch.uint8)
    keep_tensor, keep_strides = _keep_args(keep, part_max)

    grid = (batch, triton.cdiv(rows, split.block_m), split.num_splits)
    wrap_triton(_softmax_pool_partial_kernel)[grid](
        query, tokens, mask, keep_tensor, _rows_with_allowed_tokens(token_mask), float(masked_bias),
        part_max, part_sum, part_pooled,
        rows, n, channels, split.tokens_per_split, split.num_splits, float(scale),
        *query.stride(), *tokens.stride(), *mask.stride(), *keep_strides,
        HAS_KEEP=keep is not None, BLOCK_M=split.block_m, BLOCK_N=split.block_n, BLOCK_C=split.block_c,
        **_launch_options(tokens))
    block_s = min(triton.next_power_of_2(split.num_splits), max(1, COMBINE_TILE_ELEMENTS // split.block_c))
    wrap_triton(_softmax_pool_combine_kernel)[(batch * rows,)](
        part_max, part_sum, part_pooled, pooled, lse, rows, channels, split.num_splits, *pooled.stride(),
        BLOCK_S=block_s, BLOCK_C=split.block_c, **_launch_options(tokens))
    return pooled, lse


def softmax_pool_backward(query: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                          keep: Optional[torch.Tensor], scale: float, masked_bias: float,
                          pooled: torch.Tensor, lse: torch.Tensor, grad_pooled: torch.Tensor,
                          need_grad_tokens: bool = True, block_m: Optional[int] = None,
                          block_n: Optional[int] = None, tokens_per_split: Optional[int] = None):
    """Gradients ``(grad_query, grad_tokens)`` of :func:`softmax_pool_forward`'s ``pooled``.

    ``pooled`` and ``lse`` are that function's outputs for the same inputs; ``grad_tokens`` is
    None when ``need_grad_tokens`` is False (the kernel then writes nothing of size N x C).
    """
    batch, rows, channels = query.shape
    n = tokens.shape[1]
    split = plan_token_split(batch, rows, n, channels, tokens.device, False,
                             block_m, block_n, tokens_per_split)
    several_row_passes = rows > split.block_m
    grad_tokens = None
    if need_grad_tokens:
        # Row passes after the first accumulate into dT: keep that sum in fp32. Contiguous either
        # way (whatever the tokens' strides), as the op's fake implementation declares.
        grad_tokens = torch.empty(tokens.shape, device=tokens.device,
                                  dtype=torch.float32 if several_row_passes else tokens.dtype)
    grad_query_part = torch.empty(batch, split.num_splits, rows, channels, device=tokens.device,
                                  dtype=torch.float32)
    mask = token_mask.view(torch.uint8)
    keep_tensor, keep_strides = _keep_args(keep, lse)
    grad_tokens_arg = grad_tokens if need_grad_tokens else grad_query_part
    grad_tokens_strides = grad_tokens.stride() if need_grad_tokens else (0, 0, 0)

    wrap_triton(_softmax_pool_backward_kernel)[(batch, split.num_splits)](
        query, tokens, mask, keep_tensor, _rows_with_allowed_tokens(token_mask), float(masked_bias), lse, pooled,
        grad_pooled, grad_tokens_arg, grad_query_part,
        rows, n, channels, split.tokens_per_split, split.num_splits, float(scale),
        *query.stride(), *tokens.stride(), *mask.stride(), *keep_strides, *pooled.stride(),
        *grad_pooled.stride(), *grad_tokens_strides,
        HAS_KEEP=keep is not None, STORE_GRAD_TOKENS=need_grad_tokens,
        BLOCK_M=split.block_m, BLOCK_N=split.block_n, BLOCK_C=split.block_c,
        **_launch_options(tokens))
    grad_query = grad_query_part.sum(dim=1).to(query.dtype)
    if need_grad_tokens and several_row_passes:
        grad_tokens = grad_tokens.to(tokens.dtype)
    return grad_query, grad_tokens
