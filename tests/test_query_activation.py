"""prototype_mask_logits and prototype_query_update: every backend against the reference.

On the CPU the triton backend runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so its shapes stay small; the CUDA tests run compiled kernels at IPMT's size.
"""

import pytest
import torch
from compare import assert_close, assert_low_precision_close
from cpu_paths import with_compositions

from ipmt_fast.ops import prototype_mask_logits, prototype_query_update, registry
from ipmt_fast.ops.query_activation import (MASK_LOGIT_THRESHOLD, MASK_LOGITS_OP, QUERY_UPDATE_OP,
                                            mask_logit_threshold, prototype_mask_logits_reference,
                                            prototype_query_update_reference)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
FUSED_BACKENDS = ("torch", "compiled", "triton")
# The fused algebra in PyTorch ops and the same algebra as C++ ops: exact in float64.
ALGEBRA_BACKENDS = ("torch", "compiled")
# Relative tolerances (max |error| / max |expected|).
FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-5


def strided_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with no unit stride: every other element of a wider tensor, dims reversed."""
    wide = torch.zeros(tuple(reversed(t.shape[:-1])) + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide = wide.permute(*reversed(range(t.dim() - 1)), t.dim() - 1)
    strided = wide[..., ::2]
    strided.copy_(t)
    assert not strided.is_contiguous()
    return strided


def leaves(*tensors, contiguous=True):
    return [(t if contiguous else strided_like(t)).detach().requires_grad_() for t in tensors]


def mask_logits_inputs(b, m, n, c, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(b, m, c, generator=gen, dtype=torch.float64) / c ** 0.5
    tokens = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    return embedding.to(device, dtype), tokens.to(device, dtype)


def query_update_inputs(b, n, c, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    prototype = torch.randn(b, 1, c, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, 2 * c, 1, 1, generator=gen, dtype=torch.float64) / (2 * c) ** 0.5
    return query.to(device, dtype), prototype.to(device, dtype), weight.to(device, dtype)


def random_cotangent(shape, dtype, device, seed=1) -> torch.Tensor:
    """An output gradient drawn the same way for every backend, rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def outputs_and_grads(fn, inputs, cotangent_dtype):
    """``fn(*inputs)`` and the input gradients of its (first) output for ``random_cotangent``
    (drawn in ``cotangent_dtype``, so a wider reference sees the very values a backend sees)."""
    out = fn(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    cotangent = random_cotangent(first.shape, cotangent_dtype, first.device).to(first.dtype)
    return out, torch.autograd.grad(first, inputs, cotangent)


def check_mask_logits(backend, shape, dtype, tol=None, device="cpu", contiguous=True):
    """Logits and gradients against the reference in ``dtype`` (relative ``tol``), or for half
    precision (``tol`` None) within twice the reference form's own error against the float64
    oracle; the mask exactly the published rule on the returned logits."""
    raw = mask_logits_inputs(*shape, dtype, device)
    inputs = leaves(*raw, contiguous=contiguous)
    (logits, mask), grads = outputs_and_grads(lambda e, t: prototype_mask_logits(e, t, backend=backend),
                                              inputs, dtype)
    (ref_logits, ref_mask), ref_grads = outputs_and_grads(prototype_mask_logits_reference, leaves(*raw), dtype)
    assert logits.dtype == dtype and logits.shape == ref_logits.shape
    assert mask.dtype == torch.bool and not mask.requires_grad
    assert all(grad.dtype == dtype for grad in grads)
    assert torch.equal(mask, logits.sigmoid() >= 0.5)
    names = ("logits", "grad embedding", "grad tokens")
    if tol is not None:
        for name, a, e in zip(names, (logits, *grads), (ref_logits, *ref_grads)):
            assert_close(a, e, rtol=tol, name=f"{backend} {name}")
        assert torch.equal(mask, ref_mask)
        return
    (oracle_logits, _), oracle_grads = outputs_and_grads(
        prototype_mask_logits_reference, leaves(*(t.double() for t in raw)), dtype)
    for name, a, r, o in zip(names, (logits, *grads), (ref_logits, *ref_grads), (oracle_logits, *oracle_grads)):
        assert_low_precision_close(a, r, o, dtype, name=f"{backend} {name}")


def published_pre_activation(query, prototype, weight):
    """The published update before its ReLU: the 1x1 conv of the concat, as ``(B, N, C)``."""
    stacked = torch.cat((query, prototype.expand_as(query)), dim=-1)
    return torch.nn.functional.conv2d(stacked.transpose(1, 2)[..., None], weight)[..., 0].transpose(1, 2)


def check_query_update(backend, shape, dtype, tol=None, device="cpu", contiguous=True):
    """Output and the gradients of query, prototype and weight against the reference in ``dtype``
    (relative ``tol``), or for half precision (``tol`` None) within twice the reference form's own
    error against the float64 oracle.

    In half precision a pre-activation within rounding of zero may be clamped by one and not the
    other, and ReLU's gradient jumps there; so the oracle's gradients are the float64 conv
    differentiated through the backend's own ReLU pattern (which must match the oracle's wherever
    the pre-activation is clearly nonzero).
    """
    raw = query_update_inputs(*shape, dtype, device)
    inputs = leaves(*raw, contiguous=contiguous)
    out, grads = outputs_and_grads(lambda q, p, w: prototype_query_update(q, p, w, backend=backend), inputs,
                                   dtype)
    ref_out, ref_grads = outputs_and_grads(prototype_query_update_reference, leaves(*raw), dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert all(grad.dtype == dtype for grad in grads)
    names = ("output", "grad query", "grad prototype", "grad weight")
    if tol is not None:
        for name, a, e in zip(names, (out, *grads), (ref_out, *ref_grads)):
            assert_close(a, e, rtol=tol, name=f"{backend} {name}")
        return
    oracle_inputs = leaves(*(t.double() for t in raw))
    oracle_out = prototype_query_update_reference(*oracle_inputs)
    pre_activation = published_pre_activation(*oracle_inputs)
    active = out > 0
    clear = pre_activation.abs() > 4 * torch.finfo(dtype).eps * pre_activation.abs().max()
    assert torch.equal(active[clear], pre_activation[clear] > 0)
    cotangent = random_cotangent(out.shape, dtype, device).to(pre_activation.dtype)
    oracle_grads = torch.autograd.grad(pre_activation, oracle_inputs, cotangent * active)
    for name, a, r, o in zip(names, (out, *grads), (ref_out, *ref_grads), (oracle_out, *oracle_grads)):
        assert_low_precision_close(a, r, o, dtype, name=f"{backend} {name}")


# (B, M, N, C): M in {1, 2}, odd N, B in {1, 2}; the last shape spans several token, channel
# and prototype blocks of the Triton kernels (64 tokens, 64 channels, 16 prototypes).
MASK_SHAPES = [(1, 1, 37, 24), (2, 2, 37, 24), (2, 17, 67, 72)]
# (B, N, C): the last spans several token, output-channel and reduction blocks.
UPDATE_SHAPES = [(1, 37, 24), (2, 37, 24), (2, 67, 72)]


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("backend", with_compositions(ALGEBRA_BACKENDS), indirect=True)
def test_mask_logits_fused_algebra_float64(backend, shape, contiguous):
    check_mask_logits(backend, shape, torch.float64, FLOAT64_TOL, contiguous=contiguous)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=str)
@pytest.mark.parametrize("backend", with_compositions(ALGEBRA_BACKENDS), indirect=True)
def test_query_update_fused_algebra_float64(backend, shape, contiguous):
    check_query_update(backend, shape, torch.float64, FLOAT64_TOL, contiguous=contiguous)


@pytest.mark.parametrize("backend", with_compositions(ALGEBRA_BACKENDS), indirect=True)
def test_fused_algebra_float32(backend):
    check_mask_logits(backend, (2, 2, 67, 72), torch.float32, FLOAT32_TOL)
    check_query_update(backend, (2, 67, 72), torch.float32, FLOAT32_TOL)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_mask_logits_triton_float32(shape, contiguous):
    check_mask_logits("triton", shape, torch.float32, FLOAT32_TOL, contiguous=contiguous)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=str)
def test_query_update_triton_float32(shape, contiguous):
    check_query_update("triton", shape, torch.float32, FLOAT32_TOL, contiguous=contiguous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_half_precision(backend, dtype):
    """Half-precision inputs, float32 sums: within twice the reference form's own error against the
    float64 oracle (on the CPU the Triton interpreter converts the operands to float32; compiled
    half products run on CUDA below)."""
    check_mask_logits(backend, (2, 2, 67, 72), dtype)
    check_query_update(backend, (2, 67, 72), dtype)


def test_triton_float64():
    """The kernels' float64 path (float64 sums) agrees with the reference like the torch backend."""
    check_mask_logits("triton", (2, 2, 37, 24), torch.float64, FLOAT64_TOL, contiguous=False)
    check_query_update("triton", (2, 37, 24), torch.float64, FLOAT64_TOL, contiguous=False)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gradcheck(backend):
    embedding, tokens = leaves(*mask_logits_inputs(2, 2, 5, 3, torch.float64))
    assert torch.autograd.gradcheck(lambda e, t: prototype_mask_logits(e, t, backend=backend)[0],
                                    (embedding, tokens))
    query, prototype, weight = leaves(*query_update_inputs(2, 5, 3, torch.float64))
    # Finite differences are meaningful only away from ReLU's kink.
    assert published_pre_activation(query, prototype, weight).abs().min() > 1e-4
    assert torch.autograd.gradcheck(lambda q, p, w: prototype_query_update(q, p, w, backend=backend),
                                    (query, prototype, weight))


SWEEP_ULPS = 3  # values swept on each side of the threshold
EDGE_VALUES = [-1e-9, -1e-8, -1e-7, -1e-6, -1e-4, -1e-3, -0.0, 0.0, 1e-9, 1.0, -1.0,
               float("inf"), float("-inf"), float("nan")]


def edge_logit_values(dtype, device):
    """Logits at and around the rounded-sigmoid threshold, then ``EDGE_VALUES``."""
    threshold = torch.tensor([mask_logit_threshold(dtype)], dtype=dtype)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[threshold.element_size()]
    magnitudes = (-threshold).view(as_int) + torch.arange(-SWEEP_ULPS, SWEEP_ULPS + 1, dtype=as_int)
    sweep = -magnitudes.view(dtype)
    return torch.cat([sweep, torch.tensor(EDGE_VALUES, dtype=torch.float64).to(dtype)]).to(device)


# Triton's interpreter multiplies the zero padding of the tile by the infinite logits.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_mask_rounding_edge(backend, dtype, device="cpu"):
    """Tiny negative logits whose sigmoid rounds to 0.5 are kept, exactly as in the published mask."""
    values = edge_logit_values(dtype, device)
    # embedding = [1, 0] and tokens = [value, 1] make the logits exactly the chosen values.
    embedding = torch.tensor([[[1.0, 0.0]]], dtype=dtype, device=device)
    tokens = torch.stack([values, torch.ones_like(values)], dim=-1)[None]
    logits, mask = prototype_mask_logits(embedding, tokens, backend=backend)
    ref_logits, ref_mask = prototype_mask_logits_reference(embedding, tokens)
    assert torch.equal(logits.isnan(), ref_logits.isnan())
    assert torch.equal(logits.nan_to_num(), ref_logits.nan_to_num())
    assert torch.equal(mask, ref_mask)
    sweep = 2 * SWEEP_ULPS + 1
    # The sweep straddles the threshold: the threshold and the values above it are kept.
    assert mask[0, 0, :SWEEP_ULPS + 1].all() and not mask[0, 0, SWEEP_ULPS + 1:sweep].any()
    if dtype == torch.float32:  # sigmoid(-1e-9) rounds to 0.5 in float32: kept
        assert mask[0, 0, sweep + EDGE_VALUES.index(-1e-9)]


# Values swept on each side of the threshold by the proof below (every value in between for the
# 16-bit dtypes, which have few).
THRESHOLD_SWEEP_ULPS = 1 << 14


@pytest.mark.parametrize("dtype", list(MASK_LOGIT_THRESHOLD), ids=str)
def test_mask_threshold_constant_is_torch_sigmoids_boundary(dtype, device="cpu"):
    """The constant keeps exactly what torch's own sigmoid >= 0.5 keeps, over a dense sweep of the
    values of ``dtype`` around it, and it is kept while the next value below is not."""
    threshold = torch.tensor([mask_logit_threshold(dtype)], dtype=dtype)
    assert threshold.item() == mask_logit_threshold(dtype)  # exactly representable
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[threshold.element_size()]
    magnitudes = (-threshold).view(as_int) + torch.arange(-THRESHOLD_SWEEP_ULPS, THRESHOLD_SWEEP_ULPS, dtype=as_int)
    values = (-magnitudes[magnitudes >= 0].view(dtype)).to(device)
    assert torch.equal(values >= mask_logit_threshold(dtype), values.sigmoid() >= 0.5)
    below = torch.nextafter(threshold.double(), torch.tensor(-1.0, dtype=torch.float64)).to(dtype)
    below = below if below < threshold else (-(-threshold).view(as_int).add(1)).view(dtype)
    assert bool(threshold.to(device).sigmoid() >= 0.5) and not bool(below.to(device).sigmoid() >= 0.5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_query_update_weight_in_another_dtype(backend):
    """A weight in another dtype (as under autocast) is used in the query's dtype; its gradient
    comes back in its own dtype."""
    query, prototype, weight = query_update_inputs(2, 9, 8, torch.float32)
    weight = weight.double().requires_grad_()
    out = prototype_query_update(query, prototype, weight, backend=backend)
    expected = prototype_query_update_reference(query, prototype, weight.detach().float())
    assert out.dtype == torch.float32
    assert_close(out, expected, rtol=FLOAT32_TOL)
    out.sum().backward()
    assert weight.grad.dtype == torch.float64


BAD_MASK_INPUTS = [
    ("embedding", lambda e, t: (e[0], t)),
    ("embedding", lambda e, t: (e.long(), t)),
    ("tokens", lambda e, t: (e, t[..., None])),
    ("tokens", lambda e, t: (e, t.double())),
    ("tokens", lambda e, t: (e, t[:1])),
    ("tokens", lambda e, t: (e, t[..., :-1])),
]
BAD_UPDATE_INPUTS = [
    ("query", lambda q, p, w: (q[0], p, w)),
    ("query", lambda q, p, w: (q.long(), p, w)),
    ("prototype", lambda q, p, w: (q, p.expand(-1, 2, -1), w)),
    ("prototype", lambda q, p, w: (q, p[:1], w)),
    ("prototype", lambda q, p, w: (q, p.double(), w)),
    ("weight", lambda q, p, w: (q, p, w[:, :-1])),
    ("weight", lambda q, p, w: (q, p, w[..., 0])),
]


@pytest.mark.parametrize("name,corrupt", BAD_MASK_INPUTS)
@pytest.mark.parametrize("backend", ("reference",) + FUSED_BACKENDS)
def test_mask_logits_rejects_bad_inputs(backend, name, corrupt):
    with pytest.raises(ValueError, match=name):
        prototype_mask_logits(*corrupt(*mask_logits_inputs(2, 1, 5, 4, torch.float32)), backend=backend)


@pytest.mark.parametrize("name,corrupt", BAD_UPDATE_INPUTS)
@pytest.mark.parametrize("backend", ("reference",) + FUSED_BACKENDS)
def test_query_update_rejects_bad_inputs(backend, name, corrupt):
    with pytest.raises(ValueError, match=name):
        prototype_query_update(*corrupt(*query_update_inputs(2, 5, 4, torch.float32)), backend=backend)


def test_registration():
    for op in (MASK_LOGITS_OP, QUERY_UPDATE_OP):
        assert set(FUSED_BACKENDS) <= set(registry.registered_backends(op))
        assert registry.selected_backend(op, "auto", torch.device("cpu")) == "compiled"


# ------------------------------------------------------------------------------------------------
# CUDA: compiled Triton at IPMT's size (C = 384, N = 3600 per image), including half precision
# ------------------------------------------------------------------------------------------------

CUDA_MASK_SHAPES = [(2, 1, 3600, 384), (1, 2, 3601, 384), (2, 17, 1001, 96)]
CUDA_UPDATE_SHAPES = [(2, 3600, 384), (1, 3601, 384), (2, 1001, 96)]


@needs_cuda
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FLOAT32_TOL), (torch.float16, None),
                                       (torch.bfloat16, None)], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_mask_logits(backend, dtype, tol, contiguous):
    for shape in CUDA_MASK_SHAPES:
        check_mask_logits(backend, shape, dtype, tol, device="cuda", contiguous=contiguous)


@needs_cuda
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FLOAT32_TOL), (torch.float16, None),
                                       (torch.bfloat16, None)], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_query_update(backend, dtype, tol, contiguous):
    for shape in CUDA_UPDATE_SHAPES:
        check_query_update(backend, shape, dtype, tol, device="cuda", contiguous=contiguous)


@needs_cuda
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_float64(backend):
    check_mask_logits(backend, (2, 2, 1001, 96), torch.float64, FLOAT64_TOL, device="cuda")
    check_query_update(backend, (2, 1001, 96), torch.float64, FLOAT64_TOL, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_mask_rounding_edge(backend, dtype):
    test_mask_rounding_edge(backend, dtype, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", list(MASK_LOGIT_THRESHOLD), ids=str)
def test_cuda_mask_threshold_constant_is_torch_sigmoids_boundary(dtype):
    test_mask_threshold_constant_is_torch_sigmoids_boundary(dtype, device="cuda")


# The Triton interpreter cannot run on the functional-tensor wrappers of opcheck's AOT-dispatch
# tests, so under it the schema, autograd registration and fake implementation are checked; on a
# GPU every opcheck test runs.
INTERPRETER_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_triton_custom_ops_pass_opcheck(device, contiguous):
    test_utils = INTERPRETER_OPCHECK_TESTS if device == "cpu" else None
    checks = {} if test_utils is None else {"test_utils": test_utils}
    embedding, tokens = leaves(*mask_logits_inputs(2, 2, 37, 24, torch.float32, device), contiguous=contiguous)
    torch.library.opcheck(torch.ops.ipmt_fast.triton_mask_logits.default, (embedding, tokens), **checks)
    grad = torch.randn(2, 2, 37, device=device)
    torch.library.opcheck(torch.ops.ipmt_fast.triton_mask_logits_backward.default,
                          (grad, embedding.detach(), tokens.detach()), **checks)
    query, prototype, weight = query_update_inputs(2, 37, 24, torch.float32, device)
    bias = torch.randn(2, 24, device=device)
    args = (query.requires_grad_(), weight[:, :24, 0, 0].contiguous().requires_grad_(), bias.requires_grad_())
    torch.library.opcheck(torch.ops.ipmt_fast.triton_bias_relu_matmul.default, args, **checks)
    out = torch.ops.ipmt_fast.triton_bias_relu_matmul(*[a.detach() for a in args])
    torch.library.opcheck(torch.ops.ipmt_fast.triton_relu_grad_matmul.default,
                          (torch.randn_like(out), out, args[1].detach()), **checks)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_compiled_custom_ops_pass_opcheck(contiguous, compiled_extension):
    """Schema, fake implementations (strides included: strided inputs give contiguous results),
    autograd registration and the AOT-dispatch checks."""
    embedding, tokens = leaves(*mask_logits_inputs(2, 2, 37, 24, torch.float64), contiguous=contiguous)
    threshold = mask_logit_threshold(torch.float64)
    torch.library.opcheck(torch.ops.ipmt_fast.prototype_mask_logits.default, (embedding, tokens, threshold))
    torch.library.opcheck(torch.ops.ipmt_fast.prototype_mask_logits_backward.default,
                          (torch.randn(2, 2, 37, dtype=torch.float64), embedding.detach(), tokens.detach()))
    query, prototype, weight = leaves(*query_update_inputs(2, 37, 24, torch.float64), contiguous=contiguous)
    torch.library.opcheck(torch.ops.ipmt_fast.prototype_query_update.default, (query, prototype, weight))
    out = torch.ops.ipmt_fast.prototype_query_update(query.detach(), prototype.detach(), weight.detach())
    torch.library.opcheck(torch.ops.ipmt_fast.prototype_query_update_backward.default,
                          (torch.randn_like(out), out, query.detach(), prototype.detach(), weight.detach()))
