"""Multi-scale deformable sampling: the core of Deformable-DETR's ``MSDeformAttn``.

For every query, head, level and point, bilinearly sample the value map of that level at a
location in ``[0, 1]^2`` (``align_corners=False`` pixel convention, zero padding outside the
map) and sum the samples weighted by the attention weights::

    out[b, q, h*D:(h+1)*D] = sum_{l, p} w[b, q, h, l, p] * bilinear(value_l[b, :, h, :], loc[b, q, h, l, p])

IPMT uses it with 1 level, 1 head, 9 points and D = C; the op is general over all four.

Backends (besides the reference, which materialises ``(B*heads, D, Nq, L*P)`` samples and keeps
them for backward):

``torch``
    Corner indices and bilinear weights become the indices and per-sample weights of one
    ``embedding_bag`` sum, so neither direction materialises the samples; autograd saves only
    ``(B*Nq*heads, 4*L*P)`` indices and weights next to ``value``.
``triton``
    ``kernels/deform_sample.py``: gathers value rows per corner, accumulates in fp32 (fp64 for
    fp64 inputs); backward scatters grad_value with atomics.
``compiled``
    ``csrc/``: OpenMP C++ on the CPU, plain CUDA on GPUs, built on first use (``extension.py``).

Memory-traffic floor (element counts, times the element size): forward reads ``value``
(``B*S*heads*D``), locations (``2*B*Nq*heads*L*P``) and weights (``B*Nq*heads*L*P``) once and
writes the output (``B*Nq*heads*D``); backward reads the same three inputs and ``grad_out``
(``B*Nq*heads*D``) and writes one gradient of each input's size. At IPMT's shape (S = Nq = 3600,
D = 384, L = 1, P = 9, fp32) that is 11.4 MB forward and 17.4 MB backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import extension, registry
from ._checks import check_same_size, check_tensor

OP_NAME = "ms_deform_sample"


def ms_deform_sample_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """``grid_sample`` on ``2 * loc - 1`` per level, as the published pure-PyTorch function does."""
    b, _, heads, d = value.shape
    _, nq, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Nq, P, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, nq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, heads * d, nq)
    return out.transpose(1, 2).contiguous()


registry.register(OP_NAME, "reference", ms_deform_sample_reference)

# The four bilinear corners as (dx, dy) offsets from the floor corner.
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def _coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pixel coordinates are computed at least in fp32 (half precision cannot address a 60-wide map
    to sub-pixel accuracy)."""
    return dtype if dtype == torch.float64 else torch.float32


def ms_deform_sample_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """One ``embedding_bag`` over value rows: each (query, head) bag holds its 4*L*P corners.

    Corners off the map keep a clamped (valid) row index with weight zero, so they add nothing to
    the output nor to any gradient (a non-finite value in that row would still leak through 0 * inf).
    """
    b, s, heads, d = value.shape
    _, nq, _, levels, points, _ = sampling_locations.shape
    rows = value.reshape(b * s * heads, d)
    device = value.device
    # Row of (b, token 0, h) in `rows`; token t of that (b, h) is `base + t * heads`.
    base = (torch.arange(b, device=device).view(b, 1, 1, 1) * (s * heads)
            + torch.arange(heads, device=device).view(1, 1, heads, 1))
    coords = sampling_locations.to(_coordinate_dtype(value.dtype))
    weights = attention_weights.to(coords.dtype)
    indices, corner_weights = [], []
    for lvl, ((height, width), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        x = coords[:, :, :, lvl, :, 0] * width - 0.5
        y = coords[:, :, :, lvl, :, 1] * height - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()
        fx, fy = x - x0, y - y0
        for dx, dy in _CORNERS:
            cx, cy = x0 + dx, y0 + dy
            on_map = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
            bilinear = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            corner_weights.append(torch.where(on_map, bilinear * weights[:, :, :, lvl], 0))
            # nan_to_num: a NaN location must not become an out-of-range index (its weight is
            # already zero: NaN fails every on_map comparison).
            row = cy.nan_to_num(0.0).clamp(0, height - 1).long()
            col = cx.nan_to_num(0.0).clamp(0, width - 1).long()
            token = start + row * width + col
            indices.append(base + token * heads)
    indices = torch.stack(indices, dim=-1).reshape(b * nq * heads, -1)
    corner_weights = torch.stack(corner_weights, dim=-1).reshape(b * nq * heads, -1).to(value.dtype)
    out = F.embedding_bag(indices, rows, per_sample_weights=corner_weights, mode="sum")
    return out.view(b, nq, heads * d)


registry.register(OP_NAME, "torch", ms_deform_sample_torch)


class _TritonMsDeformSample(torch.autograd.Function):
    """Autograd entry point of the Triton kernels."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        from ipmt_fast.kernels import deform_sample as kernels

        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return kernels.ms_deform_sample_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                                attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        from ipmt_fast.kernels import deform_sample as kernels

        grad_value, grad_loc, grad_attn = kernels.ms_deform_sample_backward(grad_out, *ctx.saved_tensors)
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_sample_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Triton kernels (``kernels/deform_sample.py``)."""
    return _TritonMsDeformSample.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights)


registry.register(OP_NAME, "triton", ms_deform_sample_triton, availability=registry.triton_availability)


def _stream_handle(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer (0 on the CPU) for the C++ launchers."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _CompiledMsDeformSample(torch.autograd.Function):
    """Autograd entry point of the C++ / CUDA kernels in ``csrc/``."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        module = extension.load_extension()
        with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
            return module.ms_deform_sample_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                                   attention_weights, _stream_handle(value.device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value = ctx.saved_tensors[0]
        module = extension.load_extension()
        with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
            grad_value, grad_loc, grad_attn = module.ms_deform_sample_backward(
                grad_out, *ctx.saved_tensors, _stream_handle(value.device))
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_sample_compiled(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """C++ (CPU, OpenMP) / CUDA kernels of ``csrc/``."""
    return _CompiledMsDeformSample.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)


registry.register(OP_NAME, "compiled", ms_deform_sample_compiled, availability=extension.unavailable_reason)


def ms_deform_sample(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     backend: str = "auto") -> torch.Tensor:
    """Deformable bilinear sampling summed over levels and points.

    Args:
        value: ``(B, S, heads, D)`` values of all levels, flattened and concatenated along S.
        spatial_shapes: ``(levels, 2)`` int64 ``(H_l, W_l)`` per level; ``sum H_l * W_l == S``.
        level_start_index: ``(levels,)`` int64 offset of each level in S.
        sampling_locations: ``(B, Nq, heads, levels, points, 2)`` ``(x, y)`` in ``[0, 1]``
            (values outside sample the zero padding).
        attention_weights: ``(B, Nq, heads, levels, points)``.
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(B, Nq, heads * D)``.
    """
    check_tensor("value", value, ("B", "S", "heads", "D"))
    device = value.device
    b, s, heads, _ = value.shape
    check_tensor("spatial_shapes", spatial_shapes, ("levels", 2), dtypes=(torch.int64,), device=device)
    levels = spatial_shapes.shape[0]
    check_tensor("level_start_index", level_start_index, (levels,), dtypes=(torch.int64,), device=device)
    check_tensor("sampling_locations", sampling_locations, (b, "Nq", heads, levels, "points", 2),
                 dtypes=(value.dtype,), device=device)
    nq, points = sampling_locations.shape[1], sampling_locations.shape[4]
    check_tensor("attention_weights", attention_weights, (b, nq, heads, levels, points),
                 dtypes=(value.dtype,), device=device)
    if spatial_shapes.device.type == "cpu":
        # On a GPU this check would stall the host once per call; the kernels read the shapes on the device.
        check_same_size("value token", value=s, spatial_shapes=int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()))
    fn = registry.get_implementation(OP_NAME, backend, device)
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
