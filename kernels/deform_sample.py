"""Triton kernels of multi-scale deformable bilinear sampling, forward and backward.

Inputs are ``value (B, S, heads, D)``, the level shapes ``[(H_0, W_0), ...]`` as host integers
(at most ``MAX_LEVELS``; passed as scalar kernel arguments, so nothing is read from the device),
``sampling_locations (B, Nq, heads, L, P, 2)`` (``x, y`` in ``[0, 1]``) and ``attention_weights
(B, Nq, heads, L, P)``; the output is ``(B, Nq, heads * D)``. Pixel coordinates are
``grid_sample``'s for ``align_corners=False``, with its roundings: from the grid value
``g = 2 * loc - 1``, ``(g + 1) * (size / 2) - 0.5`` as one fused multiply-add when ``FUSED`` (what
grid_sample computes on CUDA and on AVX2/AVX-512 CPUs) or as two roundings otherwise; corners
outside the map read zero.

Every program owns a block of queries of one (batch, head) pair and a block of channels. Value rows
are ``D`` contiguous elements, so each corner is a ``(queries, channels)`` gather of whole row
segments. Arithmetic runs in fp32 (fp64 for fp64 inputs) whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .compile_options import WARP_SIZE, launch_options

# Queries per program: enough rows per gather to fill the channel block's loads.
QUERY_BLOCK = 16
# Bytes of one (queries x channels) tile of the accumulator dtype per thread: the warps of a
# program are as many as spread each tile at this rate (4 fp32 or 2 fp64 elements a thread). The
# backward keeps several such tiles live (the output gradient, a corner's values, the products
# added to the value gradient) plus their 64-bit addresses; at 64 bytes a thread (4 warps for a
# 16 x 128 fp32 tile) it used all 255 registers of sm_80 and spilled. At this rate neither kernel
# spills on sm_80 or sm_90 at any IPMT shape (tests/test_triton_gpu_compile.py).
TILE_BYTES_PER_THREAD = 16
# Threads of 16 warps have at most 128 registers each; more would leave each fewer.
MAX_WARPS = 16
# Levels the kernels take as scalar arguments (Deformable-DETR uses 4, IPMT 1).
MAX_LEVELS = 4


@triton.jit
def _of_level(level: tl.constexpr, v0, v1, v2, v3):
    """The argument of ``level`` among per-level scalar arguments (``level`` is a compile-time index)."""
    if level == 0:
        return v0
    elif level == 1:
        return v1
    elif level == 2:
        return v2
    else:
        return v3


@triton.jit
def _source_coordinate(loc, size, FUSED: tl.constexpr):
    """grid_sample's pixel coordinate of ``loc`` along an axis of ``size`` pixels (module docstring)."""
    half_size = size.to(loc.dtype) / 2
    grid_plus_one = (2 * loc - 1) + 1
    if FUSED:
        return tl.fma(grid_plus_one, half_size, -0.5)
    else:
        return grid_plus_one * half_size - 0.5


@triton.jit
def _pixel_coordinates(loc_ptrs, loc_stride_xy, attn_ptrs, height, width, q_mask, ACC_DTYPE: tl.constexpr,
                       FUSED: tl.constexpr):
    """Floor corner, fractions and attention weight of one sampling point per query."""
    loc_x = tl.load(loc_ptrs, mask=q_mask, other=0.0).to(ACC_DTYPE)
    loc_y = tl.load(loc_ptrs + loc_stride_xy, mask=q_mask, other=0.0).to(ACC_DTYPE)
    weight = tl.load(attn_ptrs, mask=q_mask, other=0.0).to(ACC_DTYPE)
    x = _source_coordinate(loc_x, width, FUSED)
    y = _source_coordinate(loc_y, height, FUSED)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x0, y0, x - x0, y - y0, weight


@triton.jit
def _corner_weights(fx, fy, dx: tl.constexpr, dy: tl.constexpr):
    """Bilinear weight factors (along x, along y) of corner (x0 + dx, y0 + dy)."""
    wx = fx if dx == 1 else 1 - fx
    wy = fy if dy == 1 else 1 - fy
    return wx, wy


@triton.jit
def _corner_rows(x0, y0, dx: tl.constexpr, dy: tl.constexpr, height, width, start, q_mask):
    """Value-row index of one corner and whether it lies on the map (else it reads zero)."""
    cx = x0 + dx
    cy = y0 + dy
    valid = q_mask & (cx >= 0) & (cx <= (width - 1).to(cx.dtype)) & (cy >= 0) & (cy <= (height - 1).to(cy.dtype))
    # Clamp before the integer cast: far-outside locations must not overflow the index.
    col = tl.minimum(tl.maximum(cx, 0), (width - 1).to(cx.dtype)).to(tl.int64)
    row = tl.minimum(tl.maximum(cy, 0), (height - 1).to(cy.dtype)).to(tl.int64)
    return start + row * width + col, valid


# Level sizes stay runtime integers (a size of 1 must not become a compile-time constant).
_LEVEL_ARGUMENTS = tuple(f"{kind}{level}" for level in range(MAX_LEVELS) for kind in "hws")


@triton.jit(do_not_specialize=_LEVEL_ARGUMENTS)
def _ms_deform_sample_fwd_kernel(
    value_ptr, loc_ptr, attn_ptr, out_ptr,
    h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3,
    num_queries, num_heads, channels, num_points,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_lb, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
    stride_ab, stride_aq, stride_ah, stride_al, stride_ap,
    stride_ob, stride_oq, stride_oh, stride_od,
    NUM_LEVELS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FUSED: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    q_mask = q < num_queries
    d_mask = d < channels
    value_base = value_ptr + b * stride_vb + h * stride_vh
    d_offsets = d[None, :] * stride_vd
    loc_base = loc_ptr + b * stride_lb + q * stride_lq + h * stride_lh
    attn_base = attn_ptr + b * stride_ab + q * stride_aq + h * stride_ah

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC_DTYPE)
    for lvl in tl.static_range(NUM_LEVELS):
        height = _of_level(lvl, h0, h1, h2, h3)
        width = _of_level(lvl, w0, w1, w2, w3)
        start = _of_level(lvl, s0, s1, s2, s3)
        for p in range(num_points):
            x0, y0, fx, fy, weight = _pixel_coordinates(
                loc_base + lvl * stride_ll + p * stride_lp, stride_lc,
                attn_base + lvl * stride_al + p * stride_ap, height, width, q_mask, ACC_DTYPE, FUSED)
            for corner in tl.static_range(4):
                rows, valid = _corner_rows(x0, y0, corner % 2, corner // 2, height, width, start, q_mask)
                v = tl.load(value_base + rows[:, None] * stride_vs + d_offsets,
                            mask=valid[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
                wx, wy = _corner_weights(fx, fy, corner % 2, corner // 2)
                acc += (weight * wx * wy)[:, None] * v

    out_ptrs = out_ptr + b * stride_ob + q[:, None] * stride_oq + h * stride_oh + d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=_LEVEL_ARGUMENTS)
def _ms_deform_sample_bwd_kernel(
    value_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3,
    num_tokens, num_queries, num_heads, channels, num_points,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_lb, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
    stride_ab, stride_aq, stride_ah, stride_al, stride_ap,
    stride_gb, stride_gq, stride_gh, stride_gd,
    NUM_LEVELS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FUSED: tl.constexpr,
):
    """Adds this program's share into zero-initialised, contiguous ``ACC_DTYPE`` buffers:
    grad_value ``(B, S, heads, D)``, grad_loc ``(B, Nq, heads, L, P, 2)``, grad_attn
    ``(B, Nq, heads, L, P)``. Value rows are shared by many queries and the per-point sums over
    channels are split over channel blocks, so all three are accumulated atomically."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    q_mask = q < num_queries
    d_mask = d < channels
    value_base = value_ptr + b * stride_vb + h * stride_vh
    d_offsets = d[None, :] * stride_vd
    grad_value_base = grad_value_ptr + (b * num_tokens * num_heads + h) * channels
    loc_base = loc_ptr + b * stride_lb + q * stride_lq + h * stride_lh
    attn_base = attn_ptr + b * stride_ab + q * stride_aq + h * stride_ah
    # Offset of (b, q, h, level 0, point 0) in the contiguous grad_attn buffer.
    point_base = ((b * num_queries + q) * num_heads + h) * NUM_LEVELS * num_points
    grad_out = tl.load(grad_out_ptr + b * stride_gb + q[:, None] * stride_gq + h * stride_gh + d[None, :] * stride_gd,
                       mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)

    for lvl in tl.static_range(NUM_LEVELS):
        height = _of_level(lvl, h0, h1, h2, h3)
        width = _of_level(lvl, w0, w1, w2, w3)
        start = _of_level(lvl, s0, s1, s2, s3)
        for p in range(num_points):
            x0, y0, fx, fy, weight = _pixel_coordinates(
                loc_base + lvl * stride_ll + p * stride_lp, stride_lc,
                attn_base + lvl * stride_al + p * stride_ap, height, width, q_mask, ACC_DTYPE, FUSED)
            grad_weight = tl.zeros([BLOCK_Q], dtype=ACC_DTYPE)
            grad_x = tl.zeros([BLOCK_Q], dtype=ACC_DTYPE)
            grad_y = tl.zeros([BLOCK_Q], dtype=ACC_DTYPE)
            for corner in tl.static_range(4):
                rows, valid = _corner_rows(x0, y0, corner % 2, corner // 2, height, width, start, q_mask)
                tile_mask = valid[:, None] & d_mask[None, :]
                v = tl.load(value_base + rows[:, None] * stride_vs + d_offsets, mask=tile_mask, other=0.0).to(ACC_DTYPE)
                wx, wy = _corner_weights(fx, fy, corner % 2, corner // 2)
                tl.atomic_add(grad_value_base + rows[:, None] * (num_heads * channels) + d[None, :],
                              (weight * wx * wy)[:, None] * grad_out, mask=tile_mask)
                # d(out)/d(weight) is the sample; d(sample)/dx is the x-difference of corners.
                dot = tl.sum(grad_out * v, axis=1)
                grad_weight += wx * wy * dot
                grad_x += (wy if corner % 2 == 1 else -wy) * dot
                grad_y += (wx if corner // 2 == 1 else -wx) * dot
            point = point_base + lvl * num_points + p
            tl.atomic_add(grad_attn_ptr + point, grad_weight, mask=q_mask)
            tl.atomic_add(grad_loc_ptr + 2 * point, grad_x * weight * width.to(ACC_DTYPE), mask=q_mask)
            tl.atomic_add(grad_loc_ptr + 2 * point + 1, grad_y * weight * height.to(ACC_DTYPE), mask=q_mask)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _level_arguments(spatial_shapes) -> list:
    """``(H, W, first token)`` of every level, padded to ``MAX_LEVELS`` levels, flattened."""
    if not 1 <= len(spatial_shapes) <= MAX_LEVELS:
        raise ValueError(f"the Triton kernels take 1 to {MAX_LEVELS} levels, got {len(spatial_shapes)}")
    arguments, start = [], 0
    for height, width in spatial_shapes:
        arguments += [height, width, start]
        start += height * width
    return arguments + [1, 1, 0] * (MAX_LEVELS - len(spatial_shapes))


def _channel_block_and_warps(value_dtype: torch.dtype, channels: int):
    """Channel block and warps of both kernels for ``channels`` per head: the largest power-of-two
    channel block, up to the one ``MAX_WARPS`` warps hold at ``TILE_BYTES_PER_THREAD`` (128 fp32
    channels, 64 fp64; IPMT's D = 384 then takes 3 programs per query block), and the warps that
    spread its tile at that rate."""
    accumulator_bytes = _accumulator_dtype(value_dtype).itemsize
    largest_block = MAX_WARPS * WARP_SIZE * TILE_BYTES_PER_THREAD // (QUERY_BLOCK * accumulator_bytes)
    block_d = min(triton.next_power_of_2(channels), largest_block)
    num_warps = max(1, QUERY_BLOCK * block_d * accumulator_bytes // (WARP_SIZE * TILE_BYTES_PER_THREAD))
    return block_d, num_warps


def _launch_geometry(value: torch.Tensor, num_queries: int, num_levels: int, fused_coordinate: bool):
    batch, _, heads, channels = value.shape
    block_d, num_warps = _channel_block_and_warps(value.dtype, channels)
    grid = (triton.cdiv(num_queries, QUERY_BLOCK), batch * heads, triton.cdiv(channels, block_d))
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    return grid, dict(NUM_LEVELS=num_levels, BLOCK_Q=QUERY_BLOCK, BLOCK_D=block_d, ACC_DTYPE=acc,
                      FUSED=fused_coordinate, **launch_options(num_warps))


def ms_deform_sample_forward(value, spatial_shapes, sampling_locations, attention_weights, fused_coordinate):
    """``(B, Nq, heads * D)`` weighted bilinear samples; any strides, output in ``value.dtype``.
    ``spatial_shapes``: ``[(H, W), ...]`` per level; ``fused_coordinate``: see the module docstring."""
    batch, _, heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    out = value.new_empty(batch, num_queries, heads, channels)
    grid, meta = _launch_geometry(value, num_queries, num_levels, fused_coordinate)
    wrap_triton(_ms_deform_sample_fwd_kernel)[grid](
        value, sampling_locations, attention_weights, out, *_level_arguments(spatial_shapes),
        num_queries, heads, channels, num_points,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *out.stride(), **meta)
    return out.view(batch, num_queries, heads * channels)


def ms_deform_sample_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights,
                              fused_coordinate):
    """Gradients ``(value, sampling_locations, attention_weights)`` of the forward, in their dtypes."""
    batch, num_tokens, heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    acc_dtype = _accumulator_dtype(value.dtype)
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
    grad_loc = torch.zeros(sampling_locations.shape, dtype=acc_dtype, device=value.device)
    grad_attn = torch.zeros(attention_weights.shape, dtype=acc_dtype, device=value.device)
    grad_out = grad_out.reshape(batch, num_queries, heads, channels)
    grid, meta = _launch_geometry(value, num_queries, num_levels, fused_coordinate)
    wrap_triton(_ms_deform_sample_bwd_kernel)[grid](
        value, sampling_locations, attention_weights, grad_out, grad_value, grad_loc, grad_attn,
        *_level_arguments(spatial_shapes), num_tokens, num_queries, heads, channels, num_points,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *grad_out.stride(), **meta)
    return (grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype),
            grad_attn.to(attention_weights.dtype))
