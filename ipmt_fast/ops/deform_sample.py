"""Multi-scale deformable sampling: the core of Deformable-DETR's ``MSDeformAttn``.

For every query, head, level and point, bilinearly sample the value map of that level at a
location in ``[0, 1]^2`` (``align_corners=False`` pixel convention, zero padding outside the
map) and sum the samples weighted by the attention weights::

    out[b, q, h*D:(h+1)*D] = sum_{l, p} w[b, q, h, l, p] * bilinear(value_l[b, :, h, :], loc[b, q, h, l, p])

IPMT uses it with 1 level, 1 head, 9 points and D = C; the op is general over all four. The level
shapes are host integers (a list of ``(H, W)``), so no backend reads sizes from the device.

Every backend computes the pixel coordinate exactly as ``grid_sample`` does on the device at hand
(:func:`source_coordinate`): at the published initialisation every sampling point lies exactly on
a pixel centre, where bilinear sampling has a kink, and the last bit of the coordinate decides
which one-sided derivative the backward takes. The reference's is ``grid_sample``'s, so the fused
backends' must be too.

Backends (besides the reference, which materialises ``(B*heads, D, Nq, L*P)`` samples and keeps
them for backward):

``torch``
    Corner indices and bilinear weights become the indices and per-sample weights of one
    ``embedding_bag`` sum, so neither direction materialises the samples; autograd saves only
    ``(B*Nq*heads, 4*L*P)`` indices and weights next to ``value``.
``triton``
    ``kernels/deform_sample.py`` as the custom ops ``ipmt_fast::triton_ms_deform_sample(_backward)``
    (``torch.library.triton_op``, so Inductor sees the kernels): gathers value rows per corner,
    accumulates in fp32 (fp64 for fp64 inputs); backward scatters grad_value with atomics.
``compiled``
    ``csrc/``: OpenMP C++ on the CPU, plain CUDA on GPUs, built on first use (``extension.py``), as
    the custom ops ``ipmt_fast::ms_deform_sample(_backward)`` registered with ``TORCH_LIBRARY``.

Under autocast the op runs in float32 (``grid_sample``'s autocast rule): locations address
sub-pixel positions. IPMT's model feeds it float32 in every precision.

Memory-traffic floor (element counts, times the element size): forward reads ``value``
(``B*S*heads*D``), locations (``2*B*Nq*heads*L*P``) and weights (``B*Nq*heads*L*P``) once and
writes the output (``B*Nq*heads*D``); backward reads the same three inputs and ``grad_out``
(``B*Nq*heads*D``) and writes one gradient of each input's size. At IPMT's shape (S = Nq = 3600,
D = 384, L = 1, P = 9, fp32) that is 11.4 MB forward and 17.4 MB backward.
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.library import triton_op

from . import extension, registry
from ._checks import check_tensor
from ._library import contiguous_like, follows_autocast, qualified_name, register_autocast, register_compiled_fakes

OP_NAME = "ms_deform_sample"
TRITON_OP = qualified_name("triton_ms_deform_sample")
TRITON_BACKWARD_OP = qualified_name("triton_ms_deform_sample_backward")
# Levels the kernel-backed backends take (the C++ kMaxLevels, the Triton MAX_LEVELS).
MAX_KERNEL_LEVELS = 4


def ms_deform_sample_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """``grid_sample`` on ``2 * loc - 1`` per level, as the published pure-PyTorch function does."""
    b, _, heads, d = value.shape
    _, nq, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Nq, P, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, nq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, heads * d, nq)
    return out.transpose(1, 2).contiguous()


registry.register(OP_NAME, "reference", ms_deform_sample_reference)


# ----------------------------------------------------------------------------------------------
# grid_sample's rounding of the source coordinate
# ----------------------------------------------------------------------------------------------

# grid_sample (align_corners=False) maps a grid value g to the pixel coordinate
# (g + 1) * (size / 2) - 0.5; its CPU kernels (AVX2 / AVX-512 builds) and its CUDA kernel round
# that once (the compiler contracted it into a fused multiply-add), a build without FMA rounds
# twice. Per dtype, a (size, g, pixel) at which the two roundings fall on either side of a pixel
# centre: rounded twice the coordinate is exactly `pixel`, rounded once it is just below.
_ROUNDING_PROBES = {torch.float32: (10, 0.6999999284744263, 8), torch.float64: (3, 0.6666666666666665, 2)}
# float64 mantissa bits cleared to split a float64 into a 26-bit head and an exact 27-bit tail.
_FLOAT64_TAIL_BITS = 27


def _probe_dtype(dtype: torch.dtype) -> torch.dtype:
    # Coordinates are computed at least in float32 (see _coordinate_dtype).
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _grid_sample_rounds_once(device_type: str, dtype: torch.dtype) -> bool:
    size, grid_x, pixel = _ROUNDING_PROBES[dtype]
    value = torch.zeros(1, 1, 1, size, dtype=dtype, device=device_type)
    # Only the pixel left of `pixel` is non-zero: it is sampled iff the coordinate is below `pixel`.
    value[..., pixel - 1] = 1
    grid = torch.tensor([[[[grid_x, 0.0]]]], dtype=dtype, device=device_type)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return bool(sampled.item() > 0)


@torch.compiler.assume_constant_result
def grid_sample_rounds_once(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``grid_sample`` on ``device_type`` rounds its source coordinate
    ``(g + 1) * (size / 2) - 0.5`` once (a fused multiply-add) for coordinates of ``dtype``.

    Found by one probe ``grid_sample`` per device type and dtype, the first time it is asked (a
    host read, so during warm-up; the answer is cached and is a constant to ``torch.compile``).
    """
    return _grid_sample_rounds_once(device_type, _probe_dtype(dtype))


def _fused_multiply_add(a: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """``a * b + c`` rounded once, exactly, in plain PyTorch ops (any device), for ``b`` a multiple
    of 1/2 below 2**20 (half a map size) and ``c = -0.5``.

    float32 and narrower: the float64 product and sum are exact, so one rounding remains. float64:
    ``a`` splits into a 26-bit head and its exact tail; both products with ``b`` are exact, and
    ``head * b + c`` is exact wherever ``|a * b|`` exceeds 2**-6 (elsewhere the coordinate is far
    off the map's pixel centres), so the final sum is the only rounding.
    """
    if a.dtype != torch.float64:
        return (a.double() * b + c).to(a.dtype)
    head = (a.view(torch.int64) & -(1 << _FLOAT64_TAIL_BITS)).view(torch.float64)
    tail = a - head
    return (head * b + c) + tail * b


def source_coordinate(locations: torch.Tensor, size: int, rounds_once: bool) -> torch.Tensor:
    """``grid_sample``'s pixel coordinate (``align_corners=False``) of ``locations`` in [0, 1] along
    an axis of ``size`` pixels, with its roundings: the grid value ``g = 2 * loc - 1``, then
    ``(g + 1) * (size / 2) - 0.5`` rounded once or twice (see :func:`grid_sample_rounds_once`).
    Differentiable: the derivative is ``size``."""
    grid_plus_one = (2 * locations - 1) + 1
    half_size = size / 2
    if rounds_once:
        return _fused_multiply_add(grid_plus_one, half_size, -0.5)
    return grid_plus_one * half_size - 0.5


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------

# The four bilinear corners as (dx, dy) offsets from the floor corner.
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def _coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pixel coordinates are computed at least in fp32 (half precision cannot address a 60-wide map
    to sub-pixel accuracy)."""
    return dtype if dtype == torch.float64 else torch.float32


def ms_deform_sample_torch(value, spatial_shapes, sampling_locations, attention_weights):
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
    rounds_once = grid_sample_rounds_once(device.type, coords.dtype)
    weights = attention_weights.to(coords.dtype)
    indices, corner_weights = [], []
    start = 0
    for lvl, (height, width) in enumerate(spatial_shapes):
        x = source_coordinate(coords[:, :, :, lvl, :, 0], width, rounds_once)
        y = source_coordinate(coords[:, :, :, lvl, :, 1], height, rounds_once)
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
        start += height * width
    indices = torch.stack(indices, dim=-1).reshape(b * nq * heads, -1)
    corner_weights = torch.stack(corner_weights, dim=-1).reshape(b * nq * heads, -1).to(value.dtype)
    out = F.embedding_bag(indices, rows, per_sample_weights=corner_weights, mode="sum")
    return out.view(b, nq, heads * d)


registry.register(OP_NAME, "torch", ms_deform_sample_torch)


# ----------------------------------------------------------------------------------------------
# Kernel-backed backends: custom ops with fake implementations, autograd and autocast
# ----------------------------------------------------------------------------------------------

def _flat_shapes(spatial_shapes: Sequence[Tuple[int, int]]) -> List[int]:
    return [int(size) for shape in spatial_shapes for size in shape]


def _pairs(flat_shapes: Sequence[int]) -> List[Tuple[int, int]]:
    return [(flat_shapes[i], flat_shapes[i + 1]) for i in range(0, len(flat_shapes), 2)]


def _sample_shape(value, sampling_locations):
    b, _, heads, d = value.shape
    return b, sampling_locations.shape[1], heads * d


def _fake_forward(value, spatial_shapes, sampling_locations, attention_weights, fused_coordinate):
    return value.new_empty(_sample_shape(value, sampling_locations))


def _fake_backward(grad_output, value, spatial_shapes, sampling_locations, attention_weights, fused_coordinate):
    return contiguous_like(value, sampling_locations, attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights, fused_coordinate = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes, ctx.fused_coordinate = spatial_shapes, fused_coordinate


def _autograd_backward(backward_op):
    """The registered backward of a forward op whose backward op is ``backward_op``."""

    def backward(ctx, grad_output):
        value, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = backward_op(
            grad_output.contiguous(), value, ctx.spatial_shapes, sampling_locations, attention_weights,
            ctx.fused_coordinate)
        return grad_value, None, grad_locations, grad_weights, None

    return backward


@triton_op(TRITON_OP, mutates_args=())
def triton_ms_deform_sample(value: torch.Tensor, spatial_shapes: List[int], sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor, fused_coordinate: bool) -> torch.Tensor:
    """Triton forward (``kernels/deform_sample.py``); ``spatial_shapes`` flattened ``(H, W)`` pairs."""
    from ipmt_fast.kernels import deform_sample as kernels

    return kernels.ms_deform_sample_forward(value, _pairs(spatial_shapes), sampling_locations, attention_weights,
                                            fused_coordinate)


@triton_op(TRITON_BACKWARD_OP, mutates_args=())
def triton_ms_deform_sample_backward(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: List[int],
                                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                                     fused_coordinate: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of value, locations and weights."""
    from ipmt_fast.kernels import deform_sample as kernels

    return kernels.ms_deform_sample_backward(grad_output, value, _pairs(spatial_shapes), sampling_locations,
                                             attention_weights, fused_coordinate)


triton_ms_deform_sample.register_fake(_fake_forward)
triton_ms_deform_sample_backward.register_fake(_fake_backward)
triton_ms_deform_sample.register_autograd(_autograd_backward(triton_ms_deform_sample_backward),
                                          setup_context=_setup_context)
register_autocast(TRITON_OP, "float32")


extension.on_load(lambda: register_compiled_fakes(OP_NAME, _fake_forward, _fake_backward))


def _kernel_backend(custom_op):
    def run(value, spatial_shapes, sampling_locations, attention_weights):
        if len(spatial_shapes) > MAX_KERNEL_LEVELS:
            raise ValueError(f"the kernel-backed backends take at most {MAX_KERNEL_LEVELS} levels, got "
                             f"{len(spatial_shapes)}; use backend='torch'")
        rounds_once = grid_sample_rounds_once(value.device.type, value.dtype)
        return custom_op(value, _flat_shapes(spatial_shapes), sampling_locations, attention_weights, rounds_once)

    return run


def ms_deform_sample_triton(value, spatial_shapes, sampling_locations, attention_weights):
    """Triton kernels (``kernels/deform_sample.py``) through ``ipmt_fast::triton_ms_deform_sample``."""
    return _kernel_backend(triton_ms_deform_sample)(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_sample_compiled(value, spatial_shapes, sampling_locations, attention_weights):
    """C++ (CPU, OpenMP) / CUDA kernels of ``csrc/`` through ``ipmt_fast::ms_deform_sample``."""
    return _kernel_backend(torch.ops.ipmt_fast.ms_deform_sample)(value, spatial_shapes, sampling_locations,
                                                                  attention_weights)


registry.register(OP_NAME, "triton", ms_deform_sample_triton, availability=registry.triton_availability)
registry.register(OP_NAME, "compiled", ms_deform_sample_compiled, availability=extension.unavailable_reason)


def _check_spatial_shapes(spatial_shapes) -> List[Tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        raise TypeError("spatial_shapes must be a sequence of (H, W) Python ints, not a tensor (reading a "
                        "device tensor's values would stall the host): e.g. [(60, 60)]")
    try:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    except (TypeError, ValueError):
        raise TypeError(f"spatial_shapes must be a sequence of (H, W) pairs of ints, got {spatial_shapes!r}") \
            from None
    if not shapes or any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes must hold at least one level, each (H, W) >= 1, got {shapes}")
    return shapes


@follows_autocast("float32")
def ms_deform_sample(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]],
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     backend: str = "auto") -> torch.Tensor:
    """Deformable bilinear sampling summed over levels and points.

    Args:
        value: ``(B, S, heads, D)`` values of all levels, flattened and concatenated along S.
        spatial_shapes: ``[(H_0, W_0), (H_1, W_1), ...]`` per level, Python ints;
            ``sum H_l * W_l == S``. (The kernel-backed backends take at most 4 levels.)
        sampling_locations: ``(B, Nq, heads, levels, points, 2)`` ``(x, y)`` in ``[0, 1]``
            (values outside sample the zero padding).
        attention_weights: ``(B, Nq, heads, levels, points)``.
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(B, Nq, heads * D)``. Under autocast it runs in float32.
    """
    check_tensor("value", value, ("B", "S", "heads", "D"))
    device = value.device
    b, s, heads, _ = value.shape
    shapes = _check_spatial_shapes(spatial_shapes)
    levels = len(shapes)
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} hold {sum(h * w for h, w in shapes)} tokens but value has "
                         f"S = {s}")
    check_tensor("sampling_locations", sampling_locations, (b, "Nq", heads, levels, "points", 2),
                 dtypes=(value.dtype,), device=device)
    nq, points = sampling_locations.shape[1], sampling_locations.shape[4]
    check_tensor("attention_weights", attention_weights, (b, nq, heads, levels, points),
                 dtypes=(value.dtype,), device=device)
    fn = registry.get_implementation(OP_NAME, backend, device)
    return fn(value, shapes, sampling_locations, attention_weights)
