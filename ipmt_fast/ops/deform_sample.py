"""Multi-scale deformable sampling: the core of Deformable-DETR's ``MSDeformAttn``.

For every query, head, level and point, bilinearly sample the value map of that level at a
location in ``[0, 1]^2`` (``align_corners=False`` pixel convention, zero padding outside the
map) and sum the samples weighted by the attention weights::

    out[b, q, h*D:(h+1)*D] = sum_{l, p} w[b, q, h, l, p] * bilinear(value_l[b, :, h, :], loc[b, q, h, l, p])

IPMT uses it with 1 level, 1 head, 9 points and D = C; the op is general over all four.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import registry
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
    check_same_size("value token", value=s, spatial_shapes=int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()))
    fn = registry.get_implementation(OP_NAME, backend, device)
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
