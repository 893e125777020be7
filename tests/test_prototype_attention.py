"""masked_prototype_attention: every backend against the published reference form.

The truth is the reference evaluated in float64 on the same (already rounded) inputs, so a
backend's error is its own rounding only. Triton runs compiled on CUDA, and on the CPU in
interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from compare import assert_close, assert_low_precision_close
from cpu_paths import with_compositions

from ipmt_fast.ops import registry
from ipmt_fast.ops.prototype_attention import (MASKED_LOGIT_BIAS, OP_NAME, _softmax_pool_torch,
                                               masked_prototype_attention)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
triton_on_cpu = pytest.mark.skipif(registry.triton_availability("cpu") is not None,
                                   reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (and triton)")
TRITON_DEVICES = [pytest.param("cpu", marks=triton_on_cpu), pytest.param("cuda", marks=needs_cuda)]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

TOKENS_PER_SHOT = 23  # odd: never a multiple of a block
CHANNELS = 16
KEEP_PROBABILITY = 0.9  # attention dropout p = 0.1, as in IPMT
MASK_KINDS = ("random", "all_false", "all_true", "one_row_all_false")
GRADIENT_NAMES = ("prototype", "tokens", "q_weight", "k_weight", "v_weight", "proj_weight")

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5


def make_case(batch=2, rows=1, shots=1, mask_kind="random", with_keep=False, transposed_tokens=False,
              channels=CHANNELS, tokens_per_shot=TOKENS_PER_SHOT, seed=0):
    """Float64 CPU inputs of one call plus an upstream gradient for the output."""
    gen = torch.Generator().manual_seed(seed)
    n = shots * tokens_per_shot

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # A transposed (B, C, N) map is how IPMT flattens feature maps into tokens.
    tokens = randn(batch, channels, n).transpose(1, 2) if transposed_tokens else randn(batch, n, channels)
    token_mask = torch.rand(batch, n, generator=gen) < 0.4
    if mask_kind == "all_false":
        token_mask[:] = False
    elif mask_kind == "all_true":
        token_mask[:] = True
    elif mask_kind == "one_row_all_false":
        token_mask[0] = False
    keep = None
    if with_keep:
        keep = (torch.rand(batch, rows, n, generator=gen) < KEEP_PROBABILITY).double() / KEEP_PROBABILITY
    return dict(prototype=randn(batch, rows, channels), tokens=tokens, token_mask=token_mask,
                weights=[randn(channels, channels) / math.sqrt(channels) for _ in range(4)],
                attn_keep=keep, grad_out=randn(batch, rows, channels))


def rounded(case, dtype):
    """The case with its float tensors rounded to ``dtype`` (strides kept)."""
    out = dict(case)
    for key in ("prototype", "tokens", "attn_keep", "grad_out"):
        if case[key] is not None:
            out[key] = case[key].to(dtype)
    out["weights"] = [w.to(dtype) for w in case["weights"]]
    return out


def run(backend, case, dtype=torch.float64, device="cpu", tokens_need_grad=True):
    """Output and gradients (prototype, tokens, q/k/v/proj weights) as float64 CPU tensors."""
    def leaf(t, need_grad=True):
        return t.to(device=device, dtype=dtype).requires_grad_(need_grad)

    prototype = leaf(case["prototype"])
    # .to() keeps the transposed layout of the tokens (it preserves strides of dense tensors).
    tokens = leaf(case["tokens"], tokens_need_grad)
    weights = [leaf(w) for w in case["weights"]]
    keep = None if case["attn_keep"] is None else case["attn_keep"].to(device=device, dtype=dtype)
    out = masked_prototype_attention(prototype, tokens, case["token_mask"].to(device), *weights, attn_keep=keep,
                                     backend=backend)
    assert out.dtype == dtype and out.device.type == device
    out.backward(case["grad_out"].to(device=device, dtype=dtype))
    leaves = [prototype, tokens, *weights]
    grads = [None if t.grad is None else t.grad.double().cpu() for t in leaves]
    return out.detach().double().cpu(), grads


def truth(case, dtype):
    """The reference in float64 on the case's inputs rounded to ``dtype``."""
    return run("reference", rounded(case, dtype), torch.float64, "cpu")


def assert_matches(actual, expected, tolerance, backend=""):
    """Output and every gradient within ``tolerance`` (relative to each tensor's scale)."""
    out, grads = actual
    want_out, want_grads = expected
    assert_close(out, want_out, rtol=tolerance, name=f"{backend} output")
    for name, grad, want in zip(GRADIENT_NAMES, grads, want_grads):
        if grad is not None:  # None: an input that did not ask for a gradient
            assert_close(grad, want, rtol=tolerance, name=f"{backend} gradient of {name}")


# ---------------------------------------------------------------------------------------------
# torch and compiled backends: the fused algebra in plain PyTorch ops, and the same algebra as two
# C++ ops (forward, backward); exact in float64.

ALGEBRA_BACKENDS = ("torch", "compiled")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shots", [1, 3])
@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("backend", with_compositions(ALGEBRA_BACKENDS), indirect=True)
def test_fused_algebra_matches_reference_float64(backend, device, mask_kind, rows, shots, with_keep):
    case = make_case(rows=rows, shots=shots, mask_kind=mask_kind, with_keep=with_keep, seed=rows * 10 + shots)
    assert_matches(run(backend, case, torch.float64, device), truth(case, torch.float64), FLOAT64_TOLERANCE,
                   backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", with_compositions(ALGEBRA_BACKENDS), indirect=True)
def test_fused_algebra_in_float32(backend, device):
    case = make_case(rows=2, shots=3, with_keep=True, mask_kind="one_row_all_false")
    assert_matches(run(backend, case, torch.float32, device), truth(case, torch.float32), FLOAT32_TOLERANCE,
                   backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ALGEBRA_BACKENDS)
def test_fused_algebra_half_inputs(backend, dtype):
    """Within twice the reference form's own error (in the same dtype) of the float64 oracle."""
    case = make_case(rows=2, shots=3, with_keep=True)
    assert_low_precision_matches(run(backend, case, dtype), run("reference", case, dtype), truth(case, dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_non_contiguous_tokens_and_custom_scale(device):
    case = make_case(rows=2, shots=3, with_keep=True, transposed_tokens=True)
    scale = 0.37

    def with_scale(backend, dev):
        prototype = case["prototype"].to(dev)
        return masked_prototype_attention(prototype, case["tokens"].to(dev), case["token_mask"].to(dev),
                                          *[w.to(dev) for w in case["weights"]], attn_keep=case["attn_keep"].to(dev),
                                          scale=scale, backend=backend).cpu()

    for backend in ALGEBRA_BACKENDS:
        assert_close(with_scale(backend, device), with_scale("reference", "cpu"), rtol=FLOAT64_TOLERANCE)
        assert_matches(run(backend, case, torch.float64, device), truth(case, torch.float64), FLOAT64_TOLERANCE)


@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("mask_kind", ["random", "all_false"])
@pytest.mark.parametrize("backend", ALGEBRA_BACKENDS)
def test_fused_algebra_gradcheck(backend, with_keep, mask_kind):
    case = make_case(batch=2, rows=2, shots=1, tokens_per_shot=5, channels=4, mask_kind=mask_kind,
                     with_keep=with_keep)
    inputs = [t.clone().requires_grad_() for t in (case["prototype"], case["tokens"], *case["weights"])]

    def fn(prototype, tokens, *weights):
        return masked_prototype_attention(prototype, tokens, case["token_mask"], *weights,
                                          attn_keep=case["attn_keep"], backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# triton backend: the kernels, compiled on CUDA or interpreted on the CPU.

@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shots", [1, 3])
@pytest.mark.parametrize("with_keep", [False, True])
def test_triton_matches_reference_float32(device, mask_kind, rows, shots, with_keep):
    case = make_case(rows=rows, shots=shots, mask_kind=mask_kind, with_keep=with_keep, seed=rows * 10 + shots)
    assert_matches(run("triton", case, torch.float32, device), truth(case, torch.float32), FLOAT32_TOLERANCE)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_non_contiguous_tokens_without_token_gradient(device):
    case = make_case(rows=2, shots=3, with_keep=True, transposed_tokens=True, mask_kind="one_row_all_false")
    expected = truth(case, torch.float32)
    assert_matches(run("triton", case, torch.float32, device), expected, FLOAT32_TOLERANCE)
    out, grads = run("triton", case, torch.float32, device, tokens_need_grad=False)
    assert grads[1] is None
    assert_matches((out, grads), expected, FLOAT32_TOLERANCE)


ODD_SIZES = [
    dict(batch=1, rows=1, tokens_per_shot=1),  # a single token
    dict(rows=5, tokens_per_shot=40, channels=24, with_keep=True),  # rows > MAX_BLOCK_M, C not a power of 2
    dict(batch=3, tokens_per_shot=7, channels=1),
    dict(rows=9, tokens_per_shot=30, channels=20, mask_kind="one_row_all_false"),
]


@pytest.mark.parametrize("sizes", ODD_SIZES)
@pytest.mark.parametrize("backend, dtype, device", [
    ("torch", torch.float64, "cpu"),
    ("compiled", torch.float64, "cpu"),
    pytest.param("triton", torch.float32, "cpu", marks=triton_on_cpu),
    pytest.param("triton", torch.float32, "cuda", marks=needs_cuda),
])
def test_fused_backends_odd_sizes(backend, dtype, device, sizes):
    case = make_case(**sizes)
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE
    assert_matches(run(backend, case, dtype, device), truth(case, dtype), tolerance)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs(device, dtype):
    """Within twice the reference form's own error (in the same dtype) of the float64 oracle."""
    case = make_case(rows=2, shots=3, with_keep=True)
    assert_low_precision_matches(run("triton", case, dtype, device), run("reference", case, dtype, device),
                                 truth(case, dtype), dtype)


def assert_low_precision_matches(actual, reference, oracle, dtype):
    for name, a, r, o in zip(("output",) + GRADIENT_NAMES, [actual[0], *actual[1]], [reference[0], *reference[1]],
                             [oracle[0], *oracle[1]]):
        if a is not None:
            assert_low_precision_close(a, r, o, dtype, name=name)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("overrides", [
    dict(block_m=1),  # two passes over the tokens for two rows; dT accumulated in fp32
    dict(block_n=4, tokens_per_split=8),  # several blocks per span and several spans
    dict(block_m=1, block_n=4, tokens_per_split=12),
])
def test_triton_launchers_forced_blocks(device, overrides):
    """The kernels' multi-pass, multi-block and multi-span paths against the torch pool."""
    from ipmt_fast.kernels import prototype_attention as kernels

    case = make_case(rows=3, shots=3, with_keep=True, transposed_tokens=True, mask_kind="one_row_all_false")
    query = case["prototype"].to(device=device, dtype=torch.float32)
    tokens = case["tokens"].to(device=device, dtype=torch.float32)
    mask = case["token_mask"].to(device)
    keep = case["attn_keep"].to(device=device, dtype=torch.float32)
    scale = CHANNELS ** -0.5

    pooled, lse = kernels.softmax_pool_forward(query, tokens, mask, keep, scale, MASKED_LOGIT_BIAS, **overrides)
    grad_pooled = case["grad_out"].to(device=device, dtype=torch.float32)
    grad_query, grad_tokens = kernels.softmax_pool_backward(
        query, tokens, mask, keep, scale, MASKED_LOGIT_BIAS, pooled, lse, grad_pooled, **overrides)
    grad_query_only, no_grad_tokens = kernels.softmax_pool_backward(
        query, tokens, mask, keep, scale, MASKED_LOGIT_BIAS, pooled, lse, grad_pooled, need_grad_tokens=False,
        **overrides)

    query64 = query.double().cpu().requires_grad_()
    tokens64 = tokens.double().cpu().requires_grad_()
    expected = _softmax_pool_torch(query64, tokens64, case["token_mask"], keep.double().cpu(), scale)
    expected.backward(grad_pooled.double().cpu())
    bias = (~case["token_mask"]).double() * MASKED_LOGIT_BIAS
    logits = scale * query64.detach() @ tokens64.detach().transpose(1, 2) + bias.unsqueeze(1)
    # The kernels drop the bias of rows with no allowed token (shift invariance); lse follows that.
    expected_lse = torch.logsumexp(logits - bias.amax(dim=1)[:, None, None], dim=-1)

    assert_close(pooled, expected, rtol=FLOAT32_TOLERANCE, name="pooled")
    assert_close(lse, expected_lse, rtol=FLOAT32_TOLERANCE, name="lse")
    assert_close(grad_query, query64.grad, rtol=FLOAT32_TOLERANCE, name="grad query")
    assert_close(grad_tokens, tokens64.grad, rtol=FLOAT32_TOLERANCE, name="grad tokens")
    assert no_grad_tokens is None
    assert torch.equal(grad_query_only, grad_query)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shots", [1, 5])
def test_triton_cuda_ipmt_sizes(dtype, shots):
    """IPMT's sizes (60 x 60 tokens per shot, C = 384, one prototype) with dropout, on the GPU."""
    case = make_case(batch=4, rows=1, shots=shots, tokens_per_shot=3600, channels=384, with_keep=True,
                     transposed_tokens=True, mask_kind="one_row_all_false")
    oracle = run("reference", rounded(case, dtype), torch.float64, "cuda")
    if dtype == torch.float32:
        assert_matches(run("triton", case, dtype, "cuda"), oracle, FLOAT32_TOLERANCE)
    else:
        assert_low_precision_matches(run("triton", case, dtype, "cuda"), run("reference", case, dtype, "cuda"),
                                     oracle, dtype)


# ---------------------------------------------------------------------------------------------
# Argument checks and backend errors.

def _bad(**changes):
    case = make_case(rows=2, with_keep=True)
    args = dict(prototype=case["prototype"], tokens=case["tokens"], token_mask=case["token_mask"],
                q_weight=case["weights"][0], k_weight=case["weights"][1], v_weight=case["weights"][2],
                proj_weight=case["weights"][3], attn_keep=case["attn_keep"])
    args.update(changes)
    return args


@pytest.mark.parametrize("args, name", [
    (_bad(prototype=torch.zeros(2, CHANNELS, dtype=torch.float64)), "prototype"),
    (_bad(tokens=torch.zeros(2, TOKENS_PER_SHOT, CHANNELS, dtype=torch.float32)), "tokens"),
    (_bad(tokens=torch.zeros(2, TOKENS_PER_SHOT, CHANNELS + 1, dtype=torch.float64)), "tokens"),
    (_bad(tokens=torch.zeros(2, 0, CHANNELS, dtype=torch.float64), token_mask=torch.zeros(2, 0, dtype=torch.bool),
          attn_keep=None), "tokens"),
    (_bad(token_mask=torch.ones(2, TOKENS_PER_SHOT)), "token_mask"),
    (_bad(token_mask=torch.ones(2, TOKENS_PER_SHOT + 1, dtype=torch.bool)), "token_mask"),
    (_bad(k_weight=torch.zeros(CHANNELS, CHANNELS + 1, dtype=torch.float64)), "k_weight"),
    (_bad(proj_weight=torch.zeros(CHANNELS, dtype=torch.float64)), "proj_weight"),
    (_bad(attn_keep=torch.ones(2, 2, TOKENS_PER_SHOT + 1, dtype=torch.float64)), "attn_keep"),
])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_arguments_raise_value_error_naming_them(args, name, backend):
    with pytest.raises(ValueError, match=name):
        masked_prototype_attention(**args, backend=backend)


def test_both_fused_backends_registered():
    assert {"reference", "torch", "triton"} <= set(registry.registered_backends(OP_NAME))
    assert registry.selected_backend(OP_NAME, "torch", torch.device("cpu")) == "torch"


def test_named_triton_on_cpu_without_interpreter_fails_clearly():
    """Outside interpreter mode a named triton backend refuses CPU tensors and says what to set."""
    program = (
        "import torch\n"
        "from ipmt_fast.ops import masked_prototype_attention\n"
        "w = torch.eye(4)\n"
        "try:\n"
        "    masked_prototype_attention(torch.ones(1, 1, 4), torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool),"
        " w, w, w, w, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "triton" in result.stdout


# The Triton interpreter cannot run on the functional-tensor wrappers of opcheck's AOT-dispatch
# tests, so under it the schema, autograd registration and fake implementation are checked; on a
# GPU every opcheck test runs.
INTERPRETER_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("with_keep", [False, True], ids=["no-keep", "keep"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_custom_ops_pass_opcheck(device, with_keep):
    checks = {"test_utils": INTERPRETER_OPCHECK_TESTS} if device == "cpu" else {}
    case = make_case(rows=2, shots=2, with_keep=with_keep, transposed_tokens=True)
    query = case["prototype"].to(device, torch.float32).requires_grad_()
    tokens = case["tokens"].to(device, torch.float32).requires_grad_()
    mask = case["token_mask"].to(device)
    keep = None if case["attn_keep"] is None else case["attn_keep"].to(device, torch.float32)
    scale = CHANNELS ** -0.5
    torch.library.opcheck(torch.ops.ipmt_fast.triton_softmax_pool.default, (query, tokens, mask, keep, scale),
                          **checks)
    pooled, lse = torch.ops.ipmt_fast.triton_softmax_pool(query.detach(), tokens.detach(), mask, keep, scale)
    for need_grad_tokens in (True, False):
        torch.library.opcheck(torch.ops.ipmt_fast.triton_softmax_pool_backward.default,
                              (query.detach(), tokens.detach(), mask, keep, scale, pooled, lse,
                               torch.randn_like(pooled), need_grad_tokens), **checks)


@pytest.mark.parametrize("with_keep", [False, True], ids=["no-keep", "keep"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_custom_ops_pass_opcheck(device, with_keep, either_cpu_paths):
    """Transposed tokens (as IPMT flattens its maps): the fakes declare contiguous results."""
    case = make_case(rows=2, shots=2, with_keep=with_keep, transposed_tokens=True)
    leaf = lambda t: t.to(device).requires_grad_()  # noqa: E731
    keep = None if case["attn_keep"] is None else case["attn_keep"].to(device)
    args = (leaf(case["prototype"]), leaf(case["tokens"]), case["token_mask"].to(device),
            *[leaf(w) for w in case["weights"]], keep, CHANNELS ** -0.5, MASKED_LOGIT_BIAS)
    torch.library.opcheck(torch.ops.ipmt_fast.masked_prototype_attention.default, args)
    out, *saved = torch.ops.ipmt_fast.masked_prototype_attention(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                   for a in args])
    detached = [a.detach() for a in args[:2] + args[3:7]]
    torch.library.opcheck(torch.ops.ipmt_fast.masked_prototype_attention_backward.default,
                          (torch.randn_like(out), *detached, keep, CHANNELS ** -0.5, *saved))
