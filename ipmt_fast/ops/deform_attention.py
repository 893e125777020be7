"""Deformable self-attention over one feature map: IPMT's query self-attention (``qry_self_layers``,
Deformable-DETR's ``MSDeformAttn`` with one level), the whole layer as one op::

    value     = (values Wv^T + bv) zeroed at the padded tokens           (B, N, heads, D)
    offsets   = query Wo^T + bo                                          (B, N, heads, P, 2)
    weights   = softmax_P(query Wa^T + ba)                               (B, N, heads, P)
    locations = reference point of each token + offsets / (W, H)
    out       = ms_deform_sample(value, locations, weights) Wout^T + bout

``query`` is the query map plus its positional encoding, ``values`` the map itself (the same
tokens); the reference points (the tokens' pixel centres, :func:`pixel_centre_points`) and the
``(W, H)`` normaliser (:func:`offset_normalizer`) come from the caller, computed once per map.
The offsets, weights, locations and sampling are computed in the reference points' dtype, float32
or float64 (a bf16 location in [0, 1] is good to 1/256, a quarter pixel on a 60-wide map); the
four projections in the inputs' dtype, so under autocast they run in the autocast dtype like
``nn.Linear`` while the reference points and the normaliser keep theirs.

Backends: ``reference`` (the published layer, sampling by ``grid_sample``), ``torch`` and
``triton`` (the same layer with the ``ms_deform_sample`` backend of that name), and ``compiled``
(the layer's forward and backward as one C++ op each, ``csrc/fused_ops.cpp``, with the
``compiled`` sampling kernels inside: a layer that dispatches ~90 ops forward and backward from
Python dispatches 2). Every backend samples at the same locations, computed with the same ops.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import extension, registry
from ._checks import check_tensor
from ._library import contiguous_like, follows_autocast, register_compiled_fakes
from .deform_sample import (grid_sample_rounds_once, ms_deform_sample_reference, ms_deform_sample_torch,
                            ms_deform_sample_triton)

OP_NAME = "deformable_self_attention"
# The dtypes coordinates are computed in.
COORDINATE_DTYPES = (torch.float32, torch.float64)


def offset_normalizer(spatial_shapes, dtype, device) -> torch.Tensor:
    """``(levels, 2)`` tensor of ``(W, H)`` per level, filled on the device (no host-to-device copy)."""
    return torch.stack([torch.stack((torch.full((), w, dtype=dtype, device=device),
                                     torch.full((), h, dtype=dtype, device=device))) for h, w in spatial_shapes])


def pixel_centre_points(h: int, w: int, dtype, device) -> torch.Tensor:
    """Pixel centres normalised to [0, 1], ``(1, h*w, 1, 2)`` as ``(x, y)``."""
    ys = torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device) / h
    xs = torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device) / w
    ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1)[None, :, None, :]


def _layer(sample: Callable, query, values, padding_mask, reference_points, normalizer, height, width, value_weight,
           value_bias, offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads,
           points):
    """The layer with its sampling done by ``sample`` (an ``ms_deform_sample`` backend)."""
    b, n, _ = query.shape
    dtype = reference_points.dtype
    value = F.linear(values, value_weight, value_bias).masked_fill(padding_mask[..., None], 0.0)
    value = value.view(b, n, heads, -1)
    offsets = F.linear(query, offset_weight, offset_bias).to(dtype).view(b, n, heads, 1, points, 2)
    weights = F.linear(query, attention_weight, attention_bias).to(dtype).view(b, n, heads, points)
    weights = weights.softmax(-1).view(b, n, heads, 1, points)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    out = sample(value.to(dtype), [(height, width)], locations, weights)
    return F.linear(out.to(query.dtype), output_weight, output_bias)


def deformable_self_attention_reference(*args):
    """The published layer, sampling with ``grid_sample``."""
    return _layer(ms_deform_sample_reference, *args)


def deformable_self_attention_torch(*args):
    """The published layer with the ``torch`` sampling (one ``embedding_bag``)."""
    return _layer(ms_deform_sample_torch, *args)


def deformable_self_attention_triton(*args):
    """The published layer with the Triton sampling kernels."""
    return _layer(ms_deform_sample_triton, *args)


# ---------------------------------------------------------------------------------------------
# compiled backend: the layer's forward and backward as two C++ ops (csrc/fused_ops.cpp)
# ---------------------------------------------------------------------------------------------

def _compiled_fake(query, values, padding_mask, reference_points, normalizer, height, width, value_weight, value_bias,
                   offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads,
                   points, fused_coordinate):
    b, n, c = query.shape
    dtype = reference_points.dtype
    return (query.new_empty(b, n, output_weight.shape[0]), query.new_empty(b, n, heads, c // heads),
            query.new_empty(b, n, heads, 1, points, 2, dtype=dtype), query.new_empty(b, n, heads, 1, points, dtype=dtype),
            query.new_empty(b, n, c))


def _compiled_backward_fake(grad_out, query, values, padding_mask, normalizer, height, width, value_weight,
                            offset_weight, attention_weight, output_weight, heads, points, fused_coordinate, value,
                            locations, weights, sampled):
    grads = contiguous_like(query, values, value_weight, offset_weight, attention_weight, output_weight)
    bias_grads = tuple(w.new_empty(w.shape[0]) for w in (value_weight, offset_weight, attention_weight, output_weight))
    return (grads[0], grads[1], grads[2], bias_grads[0], grads[3], bias_grads[1], grads[4], bias_grads[2],
            grads[5], bias_grads[3])


# The coordinates keep their dtype under autocast (they address sub-pixel positions).
COORDINATE_ARGUMENTS = ("reference_points", "offset_normalizer")
extension.on_load(lambda: register_compiled_fakes(OP_NAME, _compiled_fake, _compiled_backward_fake))


def deformable_self_attention_compiled(query, values, padding_mask, reference_points, normalizer, height, width,
                                       value_weight, value_bias, offset_weight, offset_bias, attention_weight,
                                       attention_bias, output_weight, output_bias, heads, points):
    """The layer as one C++ op each way, the ``compiled`` sampling kernels inside."""
    rounds_once = grid_sample_rounds_once(query.device.type, reference_points.dtype)
    return torch.ops.ipmt_fast.deformable_self_attention(
        query, values, padding_mask, reference_points, normalizer, height, width, value_weight, value_bias,
        offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads, points,
        rounds_once)[0]


registry.register(OP_NAME, "reference", deformable_self_attention_reference)
registry.register(OP_NAME, "torch", deformable_self_attention_torch)
registry.register(OP_NAME, "triton", deformable_self_attention_triton, availability=registry.triton_availability)
registry.register(OP_NAME, "compiled", deformable_self_attention_compiled, availability=extension.unavailable_reason)


def check_arguments(query, values, padding_mask, reference_points, offset_normalizer, height, width, value_weight,
                    value_bias, offset_weight, offset_bias, attention_weight, attention_bias, output_weight,
                    output_bias, heads, points):
    """Raise if the arguments of :func:`deformable_self_attention` do not fit together."""
    check_tensor("query", query, ("B", "N", "C"))
    b, n, c = query.shape
    device = query.device
    if n != height * width:
        raise ValueError(f"query holds {n} tokens but the map is {height} x {width} = {height * width}")
    if c % heads:
        raise ValueError(f"the width C = {c} must be divisible by heads = {heads}")
    check_tensor("values", values, (b, n, c), dtypes=(query.dtype,), device=device)
    check_tensor("padding_mask", padding_mask, (b, n), dtypes=(torch.bool,), device=device)
    check_tensor("reference_points", reference_points, (1, n, 1, 2), dtypes=COORDINATE_DTYPES, device=device)
    check_tensor("offset_normalizer", offset_normalizer, (1, 2), dtypes=(reference_points.dtype,), device=device)
    for name, tensor, shape in (("value_weight", value_weight, (c, c)), ("value_bias", value_bias, (c,)),
                                ("offset_weight", offset_weight, (heads * points * 2, c)),
                                ("offset_bias", offset_bias, (heads * points * 2,)),
                                ("attention_weight", attention_weight, (heads * points, c)),
                                ("attention_bias", attention_bias, (heads * points,)),
                                ("output_weight", output_weight, (c, c)), ("output_bias", output_bias, (c,))):
        check_tensor(name, tensor, shape, dtypes=(query.dtype,), device=device)


@follows_autocast("lower_precision", exempt=COORDINATE_ARGUMENTS)
def deformable_self_attention(query: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
                              reference_points: torch.Tensor, offset_normalizer: torch.Tensor, height: int,
                              width: int, value_weight: torch.Tensor, value_bias: torch.Tensor,
                              offset_weight: torch.Tensor, offset_bias: torch.Tensor, attention_weight: torch.Tensor,
                              attention_bias: torch.Tensor, output_weight: torch.Tensor, output_bias: torch.Tensor,
                              heads: int = 1, points: int = 9, backend: str = "auto") -> torch.Tensor:
    """One deformable self-attention layer over an ``height x width`` map (module docstring).

    Args:
        query: ``(B, N, C)`` tokens plus their positional encoding, ``N = height * width``.
        values: ``(B, N, C)`` tokens (the map itself).
        padding_mask: ``(B, N)`` bool, True at padded tokens (their values are zeroed).
        reference_points: ``(1, N, 1, 2)`` ``(x, y)`` in [0, 1], float32 or float64 (the dtype
            of the offsets, weights, locations and sampling): :func:`pixel_centre_points`.
        offset_normalizer: ``(1, 2)`` ``(W, H)`` of that dtype: :func:`offset_normalizer`.
        height, width: the map's size (ints).
        value_weight, value_bias: ``(C, C)``, ``(C,)`` value projection.
        offset_weight, offset_bias: ``(heads*points*2, C)``, ``(heads*points*2,)`` sampling offsets.
        attention_weight, attention_bias: ``(heads*points, C)``, ``(heads*points,)`` attention logits.
        output_weight, output_bias: ``(C, C)``, ``(C,)`` output projection.
        heads, points: attention heads (dividing C) and sampling points per head.
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(B, N, C)``, in ``query``'s dtype.
    """
    check_arguments(query, values, padding_mask, reference_points, offset_normalizer, height, width, value_weight,
                    value_bias, offset_weight, offset_bias, attention_weight, attention_bias, output_weight,
                    output_bias, heads, points)
    fn = registry.get_implementation(OP_NAME, backend, query.device)
    return fn(query, values, padding_mask, reference_points, offset_normalizer, height, width, value_weight, value_bias,
              offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads, points)
