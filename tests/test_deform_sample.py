"""ms_deform_sample: every backend against the reference (grid_sample), outputs and all gradients."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ipmt_fast.ops import extension, ms_deform_sample, registry, selected_backend
from ipmt_fast.ops.deform_sample import OP_NAME, ms_deform_sample_reference

CPU_BACKENDS = ("torch", "compiled", "triton")
# Maximum-norm relative error allowed per dtype against the reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Half-precision backends are compared with the fp32 reference on the same (rounded) inputs.
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Locations in [LOC_LOW, LOC_HIGH) reach past every border (x < 0 and x > 1 sample zero padding).
LOC_LOW, LOC_HIGH = -0.3, 1.4
# Positions of the differentiable arguments of ms_deform_sample.
GRAD_INPUT_NAMES = {0: "value", 3: "sampling_locations", 4: "attention_weights"}


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


def _relative_error(actual, expected):
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual.detach() - expected.detach()).abs().max() / scale).item()


def _level_layout(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]), int(areas.sum())


def _make_inputs(shapes, batch, queries, heads, points, channels, dtype, locations=None, seed=0, padding=True):
    """Random inputs; `locations` (B, Nq, heads, L, P, 2) overrides the random ones. With `padding`
    every third token of value is zeroed, as IPMT zeroes the padded tokens of its value map."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start, tokens = _level_layout(shapes)
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=generator, dtype=torch.float64)
    if padding:
        value[:, ::3] = 0
    if locations is None:
        locations = LOC_LOW + (LOC_HIGH - LOC_LOW) * torch.rand(
            batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    weights = torch.rand(locations.shape[:-1], generator=generator, dtype=torch.float64)
    return (value.to(dtype), spatial_shapes, level_start, locations.to(dtype), weights.to(dtype))


def _outputs_and_grads(backend, inputs, grad_seed=1, with_grads=(0, 3, 4)):
    leaves = [t.detach().clone().requires_grad_(i in with_grads) for i, t in enumerate(inputs)]
    out = ms_deform_sample(*leaves, backend=backend)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [leaves[i] for i in with_grads], grad_out)
    return out, grads


def _assert_matches_reference(backend, inputs, tolerance, with_grads=(0, 3, 4)):
    expected = _outputs_and_grads("reference", inputs, with_grads=with_grads)
    actual = _outputs_and_grads(backend, inputs, with_grads=with_grads)
    names = ["output"] + [GRAD_INPUT_NAMES[i] for i in with_grads]
    for name, a, e in zip(names, [actual[0], *actual[1]], [expected[0], *expected[1]]):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        error = _relative_error(a, e)
        assert error <= tolerance, f"{backend} {name}: relative error {error:.2e} > {tolerance:.0e}"


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
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_border_and_pixel_grid_locations_match_reference(backend, dtype):
    # Power-of-two map sizes make every coordinate above exact in binary, so this backend and
    # grid_sample see the same pixel coordinate and pick the same side at integer positions, where
    # the location gradient is one-sided (floor convention).
    _skip_unavailable(backend)
    width, height = 4, 2
    locations = _grid_locations(_border_coordinates(width), _border_coordinates(height), 1, 2, 1)
    inputs = _make_inputs([(height, width), (height, width)], batch=1, queries=locations.shape[1], heads=1,
                          points=1, channels=4, dtype=dtype, locations=locations)
    _assert_matches_reference(backend, inputs, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pixel_centres_of_odd_maps_match_reference(backend):
    # On a 5 x 7 or 1 x 4 map the pixel centres (k + 0.5) / W are not exact in binary: the pixel
    # coordinate lands an ulp to either side of an integer, where the location gradient jumps, and
    # which side depends on the rounding of each formula. Output and the value / weight gradients
    # are continuous there and are compared; location gradients are covered by the test above.
    _skip_unavailable(backend)
    shapes = [(5, 7), (1, 4)]
    xs = [(k + 0.5) / 7 for k in range(7)]
    ys = [(k + 0.5) / 5 for k in range(5)]
    locations = _grid_locations(xs, ys, 1, 2, 1)
    inputs = _make_inputs(shapes, batch=1, queries=locations.shape[1], heads=1, points=1, channels=3,
                          dtype=torch.float64, locations=locations)
    _assert_matches_reference(backend, inputs, TOLERANCE[torch.float64], with_grads=(0, 4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    _skip_unavailable(backend)
    value, shapes, start, locations, weights = _make_inputs([(5, 7), (3, 3)], 2, 6, 2, 3, 4, torch.float64)
    # Same values, permuted storage: every tensor is a strided view.
    strided = (value.transpose(0, 1).contiguous().transpose(0, 1), shapes, start,
               locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0),
               weights.transpose(1, 2).contiguous().transpose(1, 2))
    assert not any(t.is_contiguous() for t in (strided[0], strided[3], strided[4]))
    _assert_matches_reference(backend, strided, TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_half_precision_close_to_fp32_reference(backend, dtype):
    _skip_unavailable(backend)
    inputs = _make_inputs([(5, 7), (3, 3)], 1, 9, 1, 9, 8, dtype)
    out, grads = _outputs_and_grads(backend, inputs)
    upcast = [t.float() if t.is_floating_point() else t for t in inputs]
    expected_out, expected_grads = _outputs_and_grads("reference", upcast)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Location gradients are left out: a half-precision location moves by up to 1/256 of the map.
    for name, a, e in [("output", out, expected_out), ("value", grads[0], expected_grads[0]),
                       ("attention_weights", grads[2], expected_grads[2])]:
        assert _relative_error(a.float(), e) <= HALF_TOLERANCE[dtype], name


def test_compiled_gradcheck():
    _skip_unavailable("compiled")
    value, shapes, start, locations, weights = _make_inputs([(3, 3), (1, 4)], 1, 4, 2, 2, 3, torch.float64,
                                                            padding=False)
    # Keep clear of pixel-grid kinks (finite differences straddling one would not match).
    locations = 0.05 + 0.9 * torch.rand(locations.shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    args = (value.requires_grad_(), shapes, start, locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_sample(v, shapes, start, l, w, backend="compiled"),
                                    (args[0], args[3], args[4]))


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


def test_auto_prefers_compiled_on_cpu():
    _skip_unavailable("compiled")
    assert selected_backend(OP_NAME, "auto", torch.device("cpu")) == "compiled"


def test_reference_is_registered_form():
    inputs = _make_inputs([(3, 3)], 1, 2, 1, 1, 2, torch.float64)
    assert torch.equal(ms_deform_sample(*inputs, backend="reference"), ms_deform_sample_reference(*inputs))


BAD_INPUTS = {
    "value": lambda v, s, i, l, w: (v[0], s, i, l, w),
    "spatial_shapes": lambda v, s, i, l, w: (v, s.float(), i, l, w),
    "level_start_index": lambda v, s, i, l, w: (v, s, i[:1], l, w),
    "sampling_locations": lambda v, s, i, l, w: (v, s, i, l[..., :1], w),
    "attention_weights": lambda v, s, i, l, w: (v, s, i, l, w.float()),
    "value token": lambda v, s, i, l, w: (v[:, 1:], s, i, l, w),
}


@pytest.mark.parametrize("argument", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_argument(argument):
    inputs = _make_inputs([(3, 3), (1, 4)], 1, 2, 1, 1, 2, torch.float64)
    with pytest.raises(ValueError, match=argument):
        ms_deform_sample(*BAD_INPUTS[argument](*inputs))


# Compiles (not runs) both Triton kernels for a GPU: the interpreter accepts code that the compiler
# rejects (e.g. a constexpr reassigned in an unrolled loop), so this runs without TRITON_INTERPRET.
TRITON_COMPILE_SCRIPT = textwrap.dedent("""
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ipmt_fast.kernels import deform_sample as kernels

    storage, arch = sys.argv[1], int(sys.argv[2])
    accumulator = tl.float64 if storage == "fp64" else tl.float32
    for fn in (kernels._ms_deform_sample_fwd_kernel, kernels._ms_deform_sample_bwd_kernel):
        constexprs = {"BLOCK_Q": kernels.QUERY_BLOCK, "BLOCK_D": kernels.MAX_CHANNEL_BLOCK, "ACC_DTYPE": accumulator}
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("shapes_ptr", "starts_ptr"):
                signature[name] = "*i64"
            elif name in ("grad_value_ptr", "grad_loc_ptr", "grad_attn_ptr"):
                signature[name] = "*" + ("fp64" if storage == "fp64" else "fp32")
            elif name.endswith("_ptr"):
                signature[name] = "*" + storage
            else:
                signature[name] = "i32"
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        assert "cubin" in triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm
""")


@pytest.mark.parametrize("storage", ["fp32", "fp64", "bf16"])
def test_triton_kernels_compile_for_sm90(storage):
    pytest.importorskip("triton.backends.nvidia")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", TRITON_COMPILE_SCRIPT, storage, "90"], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# --- GPU: run by the lead's GPU session; skipped here. -------------------------------------------

CUDA_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", CUDA_TOLERANCE, ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("layout", [([(60, 60)], 1, 9, 384), ([(5, 7), (3, 3), (1, 4)], 2, 9, 40)],
                         ids=["ipmt", "3levels-2heads"])
@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_cuda_backends_match_reference(backend, layout, dtype):
    _skip_unavailable(backend, "cuda")
    shapes, heads, points, channels = layout
    inputs = _make_inputs(shapes, 2, 300, heads, points, channels, dtype)
    inputs = [t.cuda() for t in inputs]
    out, grads = _outputs_and_grads(backend, inputs)
    # bf16 is compared with the fp32 reference of the same rounded inputs.
    reference_inputs = [t.float() if dtype == torch.bfloat16 and t.is_floating_point() else t for t in inputs]
    expected_out, expected_grads = _outputs_and_grads("reference", reference_inputs)
    checked = [("output", out, expected_out), ("value", grads[0], expected_grads[0]),
               ("attention_weights", grads[2], expected_grads[2])]
    if dtype != torch.bfloat16:
        checked.append(("sampling_locations", grads[1], expected_grads[1]))
    for name, a, e in checked:
        assert a.dtype == dtype, name
        error = _relative_error(a.to(e.dtype), e)
        assert error <= CUDA_TOLERANCE[dtype], f"{backend} {name} {dtype}: relative error {error:.2e}"
