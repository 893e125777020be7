"""ms_deform_sample: every backend against the reference (grid_sample), outputs and all gradients,
including at the published initialisation's kinks; the custom ops' registrations (opcheck)."""
import itertools

import pytest
import torch
from compare import assert_close, assert_low_precision_close

from ipmt_fast.model.transformer import DeformableSelfAttention
from ipmt_fast.ops.deform_attention import offset_normalizer, pixel_centre_points
from ipmt_fast.ops import extension, ms_deform_sample, registry, selected_backend
from ipmt_fast.ops.deform_sample import (MAX_KERNEL_LEVELS, OP_NAME, _ROUNDING_PROBES, grid_sample_rounds_once,
                                         ms_deform_sample_reference, source_coordinate)

CPU_BACKENDS = ("torch", "compiled", "triton")
# Relative tolerance (max |error| / max |expected|) per dtype against the reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Locations in [LOC_LOW, LOC_HIGH) reach past every border (x < 0 and x > 1 sample zero padding).
LOC_LOW, LOC_HIGH = -0.3, 1.4
# Positions of the differentiable arguments of ms_deform_sample.
GRAD_INPUT_NAMES = {0: "value", 2: "sampling_locations", 3: "attention_weights"}
ALL_GRADS = tuple(GRAD_INPUT_NAMES)


def _skip_unavailable(backend, device_type="cpu"):
    """Skip when the backend cannot run here for want of a package or tool; fail when the compiled
    backend had everything it needs to build and still is not available (a broken build)."""
    try:
        registry.get_implementation(OP_NAME, backend, torch.device(device_type))
    except RuntimeError as error:
        could_build = extension.build_tools_reason() is None and (
            device_type == "cpu" or extension.cuda_toolkit_reason() is None)
        if backend == "compiled" and could_build:
            pytest.fail(str(error))
        pytest.skip(str(error))


def _make_inputs(shapes, batch, queries, heads, points, channels, dtype, locations=None, seed=0, padding=True):
    """Random ``(value, spatial_shapes, locations, weights)``; ``locations`` (B, Nq, heads, L, P, 2)
    overrides the random ones. With ``padding`` every third token of value is zeroed, as IPMT zeroes
    the padded tokens of its value map."""
    generator = torch.Generator().manual_seed(seed)
    tokens, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=generator, dtype=torch.float64)
    if padding:
        value[:, ::3] = 0
    if locations is None:
        locations = LOC_LOW + (LOC_HIGH - LOC_LOW) * torch.rand(
            batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    weights = torch.rand(locations.shape[:-1], generator=generator, dtype=torch.float64)
    return value.to(dtype), list(shapes), locations.to(dtype), weights.to(dtype)


def _outputs_and_grads(backend, inputs, grad_seed=1, with_grads=ALL_GRADS):
    leaves = [t.detach().clone().requires_grad_(i in with_grads) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
    out = ms_deform_sample(*leaves, backend=backend)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [leaves[i] for i in with_grads], grad_out)
    return out, grads


def _assert_matches_reference(backend, inputs, tolerance, with_grads=ALL_GRADS):
    expected = _outputs_and_grads("reference", inputs, with_grads=with_grads)
    actual = _outputs_and_grads(backend, inputs, with_grads=with_grads)
    names = ["output"] + [GRAD_INPUT_NAMES[i] for i in with_grads]
    for name, a, e in zip(names, [actual[0], *actual[1]], [expected[0], *expected[1]]):
        assert a.dtype == e.dtype, name
        assert_close(a, e, rtol=tolerance, name=f"{backend} {name}")


# (level shapes (H, W), heads, points, channels): levels in {1, 3}, heads in {1, 2}, points in {1, 9},
# odd map sizes.
LAYOUTS = {
    "1level-1head-9points": ([(5, 7)], 1, 9, 8),
    "3levels-2heads-1point": ([(5, 7), (3, 3), (1, 4)], 2, 1, 6),
    "3levels-2heads-9points": ([(5, 7), (3, 3), (1, 4)], 2, 9, 5),
    "1level-2heads-1point": ([(3, 3)], 2, 1, 3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_locations_match_reference(backend, layout, dtype):
    _skip_unavailable(backend)
    shapes, heads, points, channels = layout
    inputs = _make_inputs(shapes, batch=2, queries=11, heads=heads, points=points, channels=channels, dtype=dtype)
    _assert_matches_reference(backend, inputs, TOLERANCE[dtype])


def _grid_locations(xs, ys, heads, levels, points):
    """All (x, y) pairs of the given coordinates as queries of one batch element."""
    pairs = torch.tensor(list(itertools.product(xs, ys)), dtype=torch.float64)
    return pairs.view(1, -1, 1, 1, 1, 2).expand(1, -1, heads, levels, points, 2).contiguous()


def _border_coordinates(size):
    """Normalised coordinates on and around the border and pixel grid of a map of `size` pixels:
    0 and 1 (outer edges), -0.5/size and 1 + 0.5/size (last pixel centre beyond the edge, weight
    exactly zero), every pixel centre and every pixel corner, and far outside."""
    centres = [(k + 0.5) / size for k in range(size)]
    corners = [k / size for k in range(size + 1)]
    return sorted(set([0.0, 1.0, -0.5 / size, 1 + 0.5 / size, LOC_LOW, LOC_HIGH] + centres + corners))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shapes", [[(2, 4), (2, 4)], [(5, 7), (1, 4)]], ids=["power-of-two", "odd"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_border_and_pixel_grid_locations_match_reference(backend, shapes, dtype):
    # Pixel centres and corners are integer pixel coordinates (exact in binary for power-of-two
    # sizes, an ulp to either side of an integer for odd ones), where the location gradient is
    # one-sided: every backend takes the same side as grid_sample, because it rounds the
    # coordinate as grid_sample does.
    _skip_unavailable(backend)
    (h0, w0), (h1, w1) = shapes
    xs = sorted(set(_border_coordinates(w0) + _border_coordinates(w1)))
    ys = sorted(set(_border_coordinates(h0) + _border_coordinates(h1)))
    locations = _grid_locations(xs, ys, 1, 2, 1)
    inputs = _make_inputs(shapes, batch=1, queries=locations.shape[1], heads=1, points=1, channels=4, dtype=dtype,
                          locations=locations)
    _assert_matches_reference(backend, inputs, TOLERANCE[dtype])


def _published_init_inputs(height, width, dtype, channels=8, seed=0):
    """Locations exactly as IPMT computes them at the published initialisation (reference points
    plus the ring biases of the offset layer, whose weight is zero): every point on a pixel centre."""
    torch.manual_seed(seed)
    layer = DeformableSelfAttention(channels)
    ring = layer.sampling_offsets.bias.detach().to(dtype).view(1, 1, 1, 1, -1, 2)
    reference = pixel_centre_points(height, width, dtype, "cpu")
    normalizer = offset_normalizer([(height, width)], dtype, "cpu")
    locations = reference[:, :, None, :, None, :] + ring / normalizer[None, None, None, :, None, :]
    return _make_inputs([(height, width)], 1, height * width, 1, ring.shape[4], channels, dtype,
                        locations=locations.double(), seed=seed)


# (map size, dtype) at which the two roundings of the source coordinate put some points of the
# published initialisation on different sides of a pixel centre (so a backend rounding differently
# from grid_sample takes the other one-sided derivative there).
KINK_CASES = {"60x60-fp64": ((60, 60), torch.float64), "7x10-fp64": ((7, 10), torch.float64),
              "7x10-fp32": ((7, 10), torch.float32), "9x9-fp32": ((9, 9), torch.float32)}
# The Triton interpreter is slow: it takes the small maps only.
INTERPRETER_MAX_TOKENS = 100


@pytest.mark.parametrize("case", KINK_CASES.values(), ids=KINK_CASES.keys())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_published_initialisation_kinks_match_reference(backend, case):
    """At the published initialisation every point is on a pixel centre: a kink. Outputs and all
    gradients, location gradients included, match grid_sample's one-sided derivatives."""
    _skip_unavailable(backend)
    (height, width), dtype = case
    if backend == "triton" and height * width > INTERPRETER_MAX_TOKENS:
        pytest.skip("the Triton interpreter takes the small maps (the GPU tests run 60 x 60)")
    inputs = _published_init_inputs(height, width, dtype)
    _assert_matches_reference(backend, inputs, 1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("case", KINK_CASES.values(), ids=KINK_CASES.keys())
def test_kink_cases_have_points_where_the_rounding_decides_the_side(case):
    """The kink test above bites: in each case the two roundings of the source coordinate put some
    published-initialisation points on different sides of a pixel centre."""
    (height, width), dtype = case
    _, _, locations, _ = _published_init_inputs(height, width, dtype)
    once, twice = source_coordinate(locations[..., 0], width, True), source_coordinate(locations[..., 0], width, False)
    assert (once.floor() != twice.floor()).sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_rounding_probe_values_straddle_a_pixel_centre(dtype):
    size, grid_x, pixel = _ROUNDING_PROBES[dtype]
    location = torch.tensor([(grid_x + 1) / 2], dtype=dtype)
    assert 2 * location - 1 == torch.tensor([grid_x], dtype=dtype)
    assert source_coordinate(location, size, False).item() == pixel
    assert source_coordinate(location, size, True).item() < pixel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_source_coordinate_reproduces_grid_sample_everywhere(dtype):
    """On random locations the coordinate (as the rounding probe found it) gives grid_sample's
    interpolation of a ramp bit for bit; the other rounding does not."""
    size = 60
    locations = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ramp = torch.arange(size, dtype=dtype).view(1, 1, 1, size)
    grid = torch.stack([2 * locations - 1, torch.zeros_like(locations)], -1).view(1, 1, -1, 2)
    sampled = torch.nn.functional.grid_sample(ramp, grid, align_corners=False).view(-1)
    rounds_once = grid_sample_rounds_once("cpu", dtype)

    def interpolated(x):
        x0 = x.floor()
        inside = (x0 >= 0) & (x0 + 1 <= size - 1)
        return inside, (1 - (x - x0)) * x0 + (x - x0) * (x0 + 1)

    inside, ours = interpolated(source_coordinate(locations, size, rounds_once))
    assert torch.equal(ours[inside], sampled[inside])
    inside, other = interpolated(source_coordinate(locations, size, not rounds_once))
    assert not torch.equal(other[inside], sampled[inside])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    _skip_unavailable(backend)
    value, shapes, locations, weights = _make_inputs([(5, 7), (3, 3)], 2, 6, 2, 3, 4, torch.float64)
    # Same values, permuted storage: every tensor is a strided view.
    strided = (value.transpose(0, 1).contiguous().transpose(0, 1), shapes,
               locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0),
               weights.transpose(1, 2).contiguous().transpose(1, 2))
    assert not any(t.is_contiguous() for t in (strided[0], strided[2], strided[3]))
    _assert_matches_reference(backend, strided, TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_half_precision_within_twice_the_reference_error(backend, dtype):
    """Half-precision inputs: the fused result's error against the float64 oracle is at most twice
    that of the reference form computed in the same dtype (plus a floor)."""
    _skip_unavailable(backend)
    inputs = _make_inputs([(5, 7), (3, 3)], 1, 9, 1, 9, 8, dtype)
    out, grads = _outputs_and_grads(backend, inputs)
    reference_out, reference_grads = _outputs_and_grads("reference", inputs)
    oracle_inputs = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    oracle_out, oracle_grads = _outputs_and_grads("reference", oracle_inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_low_precision_close(out, reference_out, oracle_out, dtype, name=f"{backend} output")
    # Location gradients are left out: a half-precision location moves by up to 1/256 of the map.
    for i in (0, 2):
        assert_low_precision_close(grads[i], reference_grads[i], oracle_grads[i], dtype,
                                   name=f"{backend} grad {GRAD_INPUT_NAMES[(0, 2, 3)[i]]}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_runs_in_float32(backend):
    """Under bf16 autocast the op runs in float32 (grid_sample's autocast rule), any backend."""
    _skip_unavailable(backend)
    inputs = _make_inputs([(5, 7)], 1, 4, 1, 3, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_sample(*inputs, backend=backend)
    assert out.dtype == torch.float32
    assert_close(out, ms_deform_sample(*inputs, backend="reference"), rtol=TOLERANCE[torch.float32])


def test_compiled_gradcheck():
    _skip_unavailable("compiled")
    value, shapes, locations, weights = _make_inputs([(3, 3), (1, 4)], 1, 4, 2, 2, 3, torch.float64, padding=False)
    # Keep clear of pixel-grid kinks (finite differences straddling one would not match).
    locations = 0.05 + 0.9 * torch.rand(locations.shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_sample(v, shapes, l, w, backend="compiled"),
                                    (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_compiled_backward_split_over_channel_chunks(dtype):
    # The CPU backward splits D into chunks over threads (uneven last chunk here: 70 = 32 + 32 + 6)
    # and sums the per-chunk partial gradients; small-D tests above use a single chunk.
    _skip_unavailable("compiled")
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        inputs = _make_inputs([(5, 7), (3, 3)], 1, 13, 1, 4, 70, dtype)
        _assert_matches_reference("compiled", inputs, TOLERANCE[dtype])
    finally:
        torch.set_num_threads(threads)


def _custom_op_arguments(dtype=torch.float64):
    value, shapes, locations, weights = _make_inputs([(3, 4), (2, 2)], 1, 3, 2, 2, 3, dtype)
    flat = [size for shape in shapes for size in shape]
    rounds_once = grid_sample_rounds_once("cpu", dtype)
    return (value.requires_grad_(), flat, locations.requires_grad_(), weights.requires_grad_(), rounds_once)


# The Triton interpreter cannot run on the functional-tensor wrappers of opcheck's AOT-dispatch
# tests, so under it the schema, autograd registration and fake implementation are checked; on a
# GPU every opcheck test runs.
INTERPRETER_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_compiled_custom_ops_pass_opcheck():
    _skip_unavailable("compiled")
    args = _custom_op_arguments()
    torch.library.opcheck(torch.ops.ipmt_fast.ms_deform_sample.default, args)
    grad = torch.randn(1, 3, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ipmt_fast.ms_deform_sample_backward.default,
                          (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))


def test_triton_custom_ops_pass_opcheck():
    _skip_unavailable("triton")
    args = _custom_op_arguments(torch.float32)
    torch.library.opcheck(torch.ops.ipmt_fast.triton_ms_deform_sample.default, args,
                          test_utils=INTERPRETER_OPCHECK_TESTS)
    grad = torch.randn(1, 3, 6)
    torch.library.opcheck(torch.ops.ipmt_fast.triton_ms_deform_sample_backward.default,
                          (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]),
                          test_utils=INTERPRETER_OPCHECK_TESTS)


def test_auto_prefers_compiled_on_cpu():
    _skip_unavailable("compiled")
    assert selected_backend(OP_NAME, "auto", torch.device("cpu")) == "compiled"


def test_reference_is_registered_form():
    inputs = _make_inputs([(3, 3)], 1, 2, 1, 1, 2, torch.float64)
    assert torch.equal(ms_deform_sample(*inputs, backend="reference"), ms_deform_sample_reference(*inputs))


BAD_INPUTS = {
    "value": (ValueError, lambda v, s, l, w: (v[0], s, l, w)),
    "spatial_shapes must be a sequence of \\(H, W\\) Python ints": (TypeError, lambda v, s, l, w: (
        v, torch.tensor(s), l, w)),
    "spatial_shapes must hold at least one level": (ValueError, lambda v, s, l, w: (v, [], l, w)),
    "sampling_locations": (ValueError, lambda v, s, l, w: (v, s, l[..., :1], w)),
    "attention_weights": (ValueError, lambda v, s, l, w: (v, s, l, w.float())),
    "hold 16 tokens but value has S = 15": (ValueError, lambda v, s, l, w: (v[:, 1:], s, l, w)),
}


@pytest.mark.parametrize("message", BAD_INPUTS)
def test_bad_inputs_raise_errors_naming_the_argument(message):
    inputs = _make_inputs([(3, 4), (1, 4)], 1, 2, 1, 1, 2, torch.float64)
    error, mutate = BAD_INPUTS[message]
    with pytest.raises(error, match=message):
        ms_deform_sample(*mutate(*inputs))


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_kernel_backends_refuse_too_many_levels(backend):
    _skip_unavailable(backend)
    inputs = _make_inputs([(1, 2)] * (MAX_KERNEL_LEVELS + 1), 1, 2, 1, 1, 2, torch.float64)
    with pytest.raises(ValueError, match=f"at most {MAX_KERNEL_LEVELS} levels"):
        ms_deform_sample(*inputs, backend=backend)


# --- GPU: run where a CUDA device is present; skipped here. ----------------------------------------

CUDA_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("layout", [([(60, 60)], 1, 9, 384), ([(5, 7), (3, 3), (1, 4)], 2, 9, 40)],
                         ids=["ipmt", "3levels-2heads"])
@pytest.mark.parametrize("backend", ["torch", "compiled", "triton"])
def test_cuda_backends_match_reference(backend, layout, dtype):
    _skip_unavailable(backend, "cuda")
    shapes, heads, points, channels = layout
    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t
              for t in _make_inputs(shapes, 2, 300, heads, points, channels, dtype)]
    out, grads = _outputs_and_grads(backend, inputs)
    if dtype == torch.bfloat16:
        reference_out, reference_grads = _outputs_and_grads("reference", inputs)
        oracle = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
        oracle_out, oracle_grads = _outputs_and_grads("reference", oracle)
        assert_low_precision_close(out, reference_out, oracle_out, dtype, name=f"{backend} output")
        for i in (0, 2):  # value and weight gradients (a bf16 location moves by 1/256 of the map)
            assert_low_precision_close(grads[i], reference_grads[i], oracle_grads[i], dtype, name=f"{backend} grad")
        return
    expected_out, expected_grads = _outputs_and_grads("reference", inputs)
    for name, a, e in zip(["output", "value", "sampling_locations", "attention_weights"], [out, *grads],
                          [expected_out, *expected_grads]):
        assert_close(a, e, rtol=CUDA_TOLERANCE[dtype], name=f"{backend} {name}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", ["torch", "compiled", "triton"])
def test_cuda_published_initialisation_kinks_match_reference(backend, dtype):
    _skip_unavailable(backend, "cuda")
    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in _published_init_inputs(60, 60, dtype)]
    _assert_matches_reference(backend, inputs, 1e-12 if dtype == torch.float64 else 2e-6)


@needs_cuda
def test_cuda_compiled_custom_ops_pass_opcheck():
    _skip_unavailable("compiled", "cuda")
    value, flat, locations, weights, _ = _custom_op_arguments()
    args = (value.detach().cuda().requires_grad_(), flat, locations.detach().cuda().requires_grad_(),
            weights.detach().cuda().requires_grad_(), grid_sample_rounds_once("cuda", torch.float64))
    torch.library.opcheck(torch.ops.ipmt_fast.ms_deform_sample.default, args)


@needs_cuda
def test_cuda_triton_custom_ops_pass_opcheck():
    _skip_unavailable("triton", "cuda")
    value, flat, locations, weights, _ = _custom_op_arguments(torch.float32)
    args = (value.detach().cuda().requires_grad_(), flat, locations.detach().cuda().requires_grad_(),
            weights.detach().cuda().requires_grad_(), grid_sample_rounds_once("cuda", torch.float32))
    torch.library.opcheck(torch.ops.ipmt_fast.triton_ms_deform_sample.default, args)
