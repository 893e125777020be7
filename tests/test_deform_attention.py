"""deformable_self_attention (the whole query self-attention layer): every backend against the
reference layer, outputs and the gradients of both inputs and all eight parameters, at the
published initialisation (every sampling point on a pixel centre) and off it."""
import pytest
import torch
from compare import assert_close, assert_low_precision_close
from cpu_paths import with_compositions

from ipmt_fast.model.transformer import DeformableSelfAttention
from ipmt_fast.ops import deformable_self_attention, registry
from ipmt_fast.ops.deform_attention import OP_NAME, offset_normalizer, pixel_centre_points

FUSED_BACKENDS = ("torch", "compiled", "triton")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# The Triton interpreter is slow: its cases use the small maps.
INTERPRETER_MAX_TOKENS = 100
INPUT_NAMES = ("query", "values")
PARAMETER_NAMES = ("value_weight", "value_bias", "offset_weight", "offset_bias", "attention_weight", "attention_bias",
                   "output_weight", "output_bias")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _skip_unavailable(backend, device_type="cpu"):
    try:
        registry.get_implementation(OP_NAME, backend, torch.device(device_type))
    except RuntimeError as error:
        pytest.skip(str(error))


def make_case(height, width, channels=8, batch=2, heads=1, points=9, init="published", dtype=torch.float64,
              device="cpu", seed=0):
    """``(tensor inputs, sizes)`` of one call: a layer's parameters (``published``: its own
    initialisation, every point on a pixel centre; ``perturbed``: the offset and attention weights
    drawn small), random tokens and positional terms, a padded band at the bottom of the map."""
    torch.manual_seed(seed)
    layer = DeformableSelfAttention(channels, heads, points)
    if init == "perturbed":
        with torch.no_grad():
            layer.sampling_offsets.weight.normal_(0, 0.05)
            layer.attention_weights.weight.normal_(0, 0.05)
    generator = torch.Generator().manual_seed(seed + 1)
    n = height * width
    values = torch.randn(batch, n, channels, generator=generator, dtype=torch.float64)
    query = values + torch.randn(batch, n, channels, generator=generator, dtype=torch.float64)
    padding = torch.zeros(batch, height, width, dtype=torch.bool)
    padding[:, height - max(1, height // 4):] = True
    coordinates = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = dict(query=query, values=values, padding_mask=padding.flatten(1),
                   reference_points=pixel_centre_points(height, width, coordinates, "cpu"),
                   offset_normalizer=offset_normalizer([(height, width)], coordinates, "cpu"),
                   value_weight=layer.value_proj.weight, value_bias=layer.value_proj.bias,
                   offset_weight=layer.sampling_offsets.weight, offset_bias=layer.sampling_offsets.bias,
                   attention_weight=layer.attention_weights.weight, attention_bias=layer.attention_weights.bias,
                   output_weight=layer.output_proj.weight, output_bias=layer.output_proj.bias)
    for name in INPUT_NAMES + PARAMETER_NAMES:
        tensors[name] = tensors[name].detach().to(device, dtype)
    for name in ("padding_mask", "reference_points", "offset_normalizer"):
        tensors[name] = tensors[name].to(device)
    return tensors, dict(height=height, width=width, heads=heads, points=points)


def run(backend, case, grad_seed=2):
    """Output and the gradients of the inputs and parameters (a fixed random output gradient)."""
    tensors, sizes = case
    leaves = {k: (v.clone().requires_grad_() if k in INPUT_NAMES + PARAMETER_NAMES else v) for k, v in tensors.items()}
    out = deformable_self_attention(**leaves, **sizes, backend=backend)
    generator = torch.Generator().manual_seed(grad_seed)
    cotangent = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [leaves[k] for k in INPUT_NAMES + PARAMETER_NAMES], cotangent)
    return [out, *grads]


def assert_matches_reference(backend, case, tolerance):
    names = ("output",) + INPUT_NAMES + PARAMETER_NAMES
    for name, got, want in zip(names, run(backend, case), run("reference", case)):
        assert got.dtype == want.dtype, name
        assert_close(got, want, rtol=tolerance, name=f"{backend} {'gradient of ' if name != 'output' else ''}{name}")


CASES = {"60x60-published": (60, 60, "published"), "7x10-published": (7, 10, "published"),
         "9x9-perturbed": (9, 9, "perturbed"), "5x7-perturbed": (5, 7, "perturbed")}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend", with_compositions(FUSED_BACKENDS), indirect=True)
def test_matches_reference(backend, case, dtype):
    """Values and every gradient, on and off the published initialisation's kinks."""
    _skip_unavailable(backend)
    height, width, init = case
    if backend == "triton" and height * width > INTERPRETER_MAX_TOKENS:
        pytest.skip("the Triton interpreter takes the small maps (the GPU tests run 60 x 60)")
    assert_matches_reference(backend, make_case(height, width, init=init, dtype=dtype), TOLERANCE[dtype])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_several_heads_and_points(backend):
    _skip_unavailable(backend)
    case = make_case(5, 6, channels=12, heads=3, points=4, init="perturbed")
    assert_matches_reference(backend, case, TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", ("torch", "compiled"))
def test_bf16_autocast_within_twice_the_reference_error(backend):
    """Under bf16 autocast the projections run in bf16 and the coordinates in float32: the output,
    the input gradients and the parameters' whole gradient within twice the reference layer's own
    error (under the same autocast) of the float64 oracle. (Single parameter gradients are sums of
    many bf16 terms that largely cancel: rounding noise of 10% and more for the reference itself.)"""
    _skip_unavailable(backend)
    case = make_case(7, 10, init="perturbed", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, reference = run(backend, case), run("reference", case)
    tensors, sizes = case
    oracle_tensors = {k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()}
    oracle = run("reference", (oracle_tensors, sizes))
    assert fused[0].dtype == torch.bfloat16
    for name, f, r, o in zip(("output",) + INPUT_NAMES, fused, reference, oracle):
        assert_low_precision_close(f, r, o, torch.bfloat16, name=f"{backend} {name}")

    def parameter_gradients(results):
        return torch.cat([g.double().flatten() for g in results[1 + len(INPUT_NAMES):]])

    assert_low_precision_close(parameter_gradients(fused), parameter_gradients(reference), parameter_gradients(oracle),
                               torch.bfloat16, name=f"{backend} parameter gradients")


@pytest.mark.parametrize("backend", ("torch", "compiled"))
def test_gradcheck(backend):
    _skip_unavailable(backend)
    tensors, sizes = make_case(3, 4, channels=4, batch=1, points=2, init="perturbed")
    differentiable = INPUT_NAMES + PARAMETER_NAMES

    def layer(*leaves):
        return deformable_self_attention(**dict(tensors, **dict(zip(differentiable, leaves))), **sizes, backend=backend)

    assert torch.autograd.gradcheck(layer, [tensors[k].clone().requires_grad_() for k in differentiable])


def test_compiled_keeps_the_narrow_value_and_samples_under_autocast():
    """Under bf16 autocast the compiled layer keeps for backward the value projection and the
    sampled features as the bf16 projections computed and read them, not widened to the
    coordinates' float32 (half the bytes); its values and gradients are checked above."""
    tensors, sizes = make_case(7, 10, init="perturbed", dtype=torch.float32)
    batch, tokens, channels = tensors["query"].shape
    leaves = {k: (v.clone().requires_grad_() if k in INPUT_NAMES + PARAMETER_NAMES else v) for k, v in tensors.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            deformable_self_attention(**leaves, **sizes, backend="compiled")
    # The value (B, N, heads, C / heads) and the samples (B, N, C): the saved outputs of B*N*C.
    outputs = [t for t in saved if t.numel() == batch * tokens * channels and not t.requires_grad]
    assert len(outputs) == 2 and all(t.dtype == torch.bfloat16 for t in outputs), [t.dtype for t in outputs]


@pytest.mark.parametrize("narrow", [False, True], ids=["", "bf16-query"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_compiled_custom_ops_pass_opcheck(contiguous, narrow, either_cpu_paths):
    """Also with the projections in bf16 and the coordinates in float32, as autocast calls the op:
    the fake's saved value and samples in the query's dtype."""
    tensors, sizes = make_case(5, 6, channels=6, heads=2, points=3, init="perturbed",
                               dtype=torch.float32 if narrow else torch.float64)
    if narrow:
        for name in INPUT_NAMES + PARAMETER_NAMES:
            tensors[name] = tensors[name].to(torch.bfloat16)
    if not contiguous:
        for name in INPUT_NAMES:
            tensors[name] = tensors[name].transpose(0, 1).contiguous().transpose(0, 1)
    args = [tensors[k] for k in ("query", "values", "padding_mask", "reference_points", "offset_normalizer")]
    args += [sizes["height"], sizes["width"], *[tensors[k] for k in PARAMETER_NAMES], sizes["heads"],
             sizes["points"], True]
    differentiable = {id(tensors[k]) for k in INPUT_NAMES + PARAMETER_NAMES}
    with_grad = [a.detach().requires_grad_() if id(a) in differentiable else a for a in args]
    torch.library.opcheck(torch.ops.ipmt_fast.deformable_self_attention.default, with_grad)
    out, *saved = torch.ops.ipmt_fast.deformable_self_attention(*args)
    weights = [tensors[k] for k in ("value_weight", "offset_weight", "attention_weight", "output_weight")]
    torch.library.opcheck(torch.ops.ipmt_fast.deformable_self_attention_backward.default,
                          (torch.randn_like(out), tensors["query"], tensors["values"], tensors["padding_mask"],
                           tensors["offset_normalizer"], sizes["height"], sizes["width"], *weights, sizes["heads"],
                           sizes["points"], True, *saved))


BAD_INPUTS = {
    "query holds 30 tokens but the map is 6 x 6": lambda t, s: (t, dict(s, height=6)),
    "divisible by heads": lambda t, s: (t, dict(s, heads=3)),
    "values": lambda t, s: (dict(t, values=t["values"][:, :-1]), s),
    "padding_mask": lambda t, s: (dict(t, padding_mask=t["padding_mask"].float()), s),
    "reference_points": lambda t, s: (dict(t, reference_points=t["reference_points"].half()), s),
    "offset_weight": lambda t, s: (dict(t, offset_weight=t["offset_weight"][:-1]), s),
}


@pytest.mark.parametrize("message", BAD_INPUTS)
def test_bad_inputs_raise_errors_naming_them(message):
    tensors, sizes = BAD_INPUTS[message](*make_case(5, 6))
    with pytest.raises(ValueError, match=message):
        deformable_self_attention(**tensors, **sizes)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_matches_reference_at_the_published_init(backend, dtype):
    _skip_unavailable(backend, "cuda")
    case = make_case(60, 60, channels=64, init="published", dtype=dtype, device="cuda")
    assert_matches_reference(backend, case, TOLERANCE[dtype])
