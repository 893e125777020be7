"""Triton kernels of multi-scale deformable bilinear sampling, forward and backward.

Inputs are ``value (B, S, heads, D)``, ``spatial_shapes (L, 2)`` (``H, W``), ``level_start_index (L,)``,
``sampling_locations (B, Nq, heads, L, P, 2)`` (``x, y`` in ``[0, 1]``) and ``attention_weights
(B, Nq, heads, L, P)``; the output is ``(B, Nq, heads * D)``. Pixel coordinates follow the
``align_corners=False`` convention (``x = loc_x * W - 0.5``); corners outside the map read zero.

Every program owns a block of queries of one (batch, head) pair and a block of channels. Value rows
are ``D`` contiguous elements, so each corner is a ``(queries, channels)`` gather of whole row
segments. Arithmetic runs in fp32 (fp64 for fp64 inputs) whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Queries per program: enough rows per gather to fill the channel block's loads.
QUERY_BLOCK = 16
# Channels per program: IPMT's D = 384 splits into 3 programs per query block, which keeps the
# fp32 tiles (queries x channels) in registers and gives the GPU more programs than SMs.
MAX_CHANNEL_BLOCK = 128


@triton.jit
def _pixel_coordinates(loc_ptrs, loc_stride_xy, attn_ptrs, height, width, q_mask, ACC_DTYPE: tl.constexpr):
    """Floor corner, fractions and attention weight of one sampling point per query."""
    loc_x = tl.load(loc_ptrs, mask=q_mask, other=0.0).to(ACC_DTYPE)
    loc_y = tl.load(loc_ptrs + loc_stride_xy, mask=q_mask, other=0.0).to(ACC_DTYPE)
    weight = tl.load(attn_ptrs, mask=q_mask, other=0.0).to(ACC_DTYPE)
    x = loc_x * width.to(ACC_DTYPE) - 0.5
    y = loc_y * height.to(ACC_DTYPE) - 0.5
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


@triton.jit
def _ms_deform_sample_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    num_queries, num_heads, channels, num_levels, num_points,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_lb, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
    stride_ab, stride_aq, stride_ah, stride_al, stride_ap,
    stride_ob, stride_oq, stride_oh, stride_od,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
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
    for lvl in range(num_levels):
        height = tl.load(shapes_ptr + 2 * lvl)
        width = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for p in range(num_points):
            x0, y0, fx, fy, weight = _pixel_coordinates(
                loc_base + lvl * stride_ll + p * stride_lp, stride_lc,
                attn_base + lvl * stride_al + p * stride_ap, height, width, q_mask, ACC_DTYPE)
            for corner in tl.static_range(4):
                rows, valid = _corner_rows(x0, y0, corner % 2, corner // 2, height, width, start, q_mask)
                v = tl.load(value_base + rows[:, None] * stride_vs + d_offsets,
                            mask=valid[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
                wx, wy = _corner_weights(fx, fy, corner % 2, corner // 2)
                acc += (weight * wx * wy)[:, None] * v

    out_ptrs = out_ptr + b * stride_ob + q[:, None] * stride_oq + h * stride_oh + d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _ms_deform_sample_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_tokens, num_queries, num_heads, channels, num_levels, num_points,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_lb, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
    stride_ab, stride_aq, stride_ah, stride_al, stride_ap,
    stride_gb, stride_gq, stride_gh, stride_gd,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
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
    point_base = ((b * num_queries + q) * num_heads + h) * num_levels * num_points
    grad_out = tl.load(grad_out_ptr + b * stride_gb + q[:, None] * stride_gq + h * stride_gh + d[None, :] * stride_gd,
                       mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)

    for lvl in range(num_levels):
        height = tl.load(shapes_ptr + 2 * lvl)
        width = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for p in range(num_points):
            x0, y0, fx, fy, weight = _pixel_coordinates(
                loc_base + lvl * stride_ll + p * stride_lp, stride_lc,
                attn_base + lvl * stride_al + p * stride_ap, height, width, q_mask, ACC_DTYPE)
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


def _launch_geometry(value: torch.Tensor, num_queries: int):
    batch, _, heads, channels = value.shape
    block_d = min(triton.next_power_of_2(channels), MAX_CHANNEL_BLOCK)
    grid = (triton.cdiv(num_queries, QUERY_BLOCK), batch * heads, triton.cdiv(channels, block_d))
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    return grid, dict(BLOCK_Q=QUERY_BLOCK, BLOCK_D=block_d, ACC_DTYPE=acc)


def ms_deform_sample_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """``(B, Nq, heads * D)`` weighted bilinear samples; any strides, output in ``value.dtype``."""
    batch, _, heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    out = value.new_empty(batch, num_queries, heads, channels)
    grid, meta = _launch_geometry(value, num_queries)
    _ms_deform_sample_fwd_kernel[grid](
        value, spatial_shapes.contiguous(), level_start_index.contiguous(), sampling_locations, attention_weights, out,
        num_queries, heads, channels, num_levels, num_points,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *out.stride(), **meta)
    return out.view(batch, num_queries, heads * channels)


def ms_deform_sample_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights):
    """Gradients ``(value, sampling_locations, attention_weights)`` of the forward, in their dtypes."""
    batch, num_tokens, heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    acc_dtype = _accumulator_dtype(value.dtype)
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
    grad_loc = torch.zeros(sampling_locations.shape, dtype=acc_dtype, device=value.device)
    grad_attn = torch.zeros(attention_weights.shape, dtype=acc_dtype, device=value.device)
    grad_out = grad_out.reshape(batch, num_queries, heads, channels)
    grid, meta = _launch_geometry(value, num_queries)
    _ms_deform_sample_bwd_kernel[grid](
        value, spatial_shapes.contiguous(), level_start_index.contiguous(), sampling_locations, attention_weights,
        grad_out, grad_value, grad_loc, grad_attn,
        num_tokens, num_queries, heads, channels, num_levels, num_points,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *grad_out.stride(), **meta)
    return (grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype),
            grad_attn.to(attention_weights.dtype))
