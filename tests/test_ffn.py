"""feed_forward (the FFN without its residual): the fused backends against the reference."""
import pytest
import torch
from compare import assert_close, assert_low_precision_close
from cpu_paths import with_compositions

from ipmt_fast.ops import feed_forward, feed_forward_reference, registry
from ipmt_fast.ops.ffn import OP_NAME

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-5
DROPOUT_P = 0.3
# (B, N, C, hidden, C_out): query tokens with IPMT's 3x hidden width, odd N; one prototype row
# (the support side); mask_embed's square C -> C -> C.
SHAPES = [(2, 37, 16, 48, 16), (3, 1, 8, 24, 8), (1, 29, 12, 12, 12)]
KEEPS = ["none", "random", "all_kept", "all_dropped"]


# The fused form in PyTorch ops and the same form as two C++ ops (forward, backward).
FUSED_BACKENDS = ("torch", "compiled")


def inputs(b, n, c, hidden, c_out, keep, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    hidden_weight = torch.randn(hidden, c, generator=g, dtype=torch.float64) / c ** 0.5
    output_weight = torch.randn(c_out, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    hidden_keep = {"none": None, "random": torch.rand(b, n, hidden, generator=g) >= DROPOUT_P,
                   "all_kept": torch.ones(b, n, hidden, dtype=torch.bool),
                   "all_dropped": torch.zeros(b, n, hidden, dtype=torch.bool)}[keep]
    return [t.to(dtype).requires_grad_() for t in (x, hidden_weight, output_weight)], hidden_keep


def value_and_grads(backend, tensors, hidden_keep, recompute_hidden, seed=1):
    out = feed_forward(*tensors, hidden_keep, DROPOUT_P, recompute_hidden, backend=backend)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [out, *torch.autograd.grad(out, tensors, cotangent.to(out))]


@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FLOAT64_TOL), (torch.float32, FLOAT32_TOL)])
@pytest.mark.parametrize("backend", with_compositions(FUSED_BACKENDS), indirect=True)
def test_fused_matches_reference(backend, shape, keep, recompute_hidden, dtype, tol):
    tensors, hidden_keep = inputs(*shape, keep, dtype)
    expected = value_and_grads("reference", tensors, hidden_keep, False)
    got = value_and_grads(backend, tensors, hidden_keep, recompute_hidden)
    for name, e, o in zip(("out", "dx", "dW1", "dW2"), expected, got):
        assert o.dtype == e.dtype and o.shape == e.shape
        if keep == "all_dropped" and name != "dx":
            assert not e.any() and not o.any(), name  # nothing passes: exact zeros
        else:
            assert_close(o, e, rtol=tol, name=f"{backend} {name}")


@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("keep", ["none", "random"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_gradcheck(backend, keep, recompute_hidden):
    tensors, hidden_keep = inputs(2, 5, 4, 12, 3, keep)
    assert torch.autograd.gradcheck(
        lambda *t: feed_forward(*t, hidden_keep, DROPOUT_P, recompute_hidden, backend=backend), tensors)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_non_contiguous_input(backend):
    tensors, hidden_keep = inputs(2, 9, 6, 18, 6, "random")
    x = tensors[0].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not x.is_contiguous()
    expected = value_and_grads("reference", [x, *tensors[1:]], hidden_keep, False)
    got = value_and_grads(backend, [x, *tensors[1:]], hidden_keep, True)
    for e, o in zip(expected, got):
        assert_close(o, e, rtol=FLOAT64_TOL)


def test_keep_scale_is_dropouts():
    """A unit kept with probability 1 - p is scaled by 1 / (1 - p), as nn.Dropout does."""
    x = torch.ones(1, 1, 1, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    keep = torch.ones(1, 1, 1, dtype=torch.bool)
    for backend in ("reference",) + FUSED_BACKENDS:
        out = feed_forward(x, one, one, keep, 0.2, backend=backend)
        assert out.item() == pytest.approx(1 / 0.8, rel=1e-15)


@pytest.mark.parametrize("backend", ("reference",) + FUSED_BACKENDS)
def test_bf16_autocast_follows_linear(backend):
    """Under autocast the op runs in bf16 like nn.Linear: within twice the reference form's own
    bf16 error against the float64 oracle."""
    tensors, hidden_keep = inputs(2, 7, 8, 24, 8, "random", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = feed_forward(*tensors, hidden_keep, DROPOUT_P, backend=backend)
    assert out.dtype == torch.bfloat16
    reference_bf16 = feed_forward_reference(*(t.detach().bfloat16() for t in tensors), hidden_keep, DROPOUT_P)
    oracle = feed_forward_reference(*(t.detach().bfloat16().double() for t in tensors), hidden_keep, DROPOUT_P)
    assert_low_precision_close(out, reference_bf16, oracle, torch.bfloat16)
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in tensors)


def saved_storage_bytes(fn, excluded):
    """Bytes of the distinct storages autograd saves inside ``fn``, except those of ``excluded``."""
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saved_bytes():
    """Training mode: the reference keeps several hidden-size tensors besides its inputs, the torch
    backend one (``h``) or, recomputing, none (it keeps the inputs and the bool keep mask)."""
    b, n, c, hidden = 1, 50, 8, 24
    tensors, hidden_keep = inputs(b, n, c, hidden, c, "random", torch.float32)
    hidden_bytes = b * n * hidden * 4

    def saved(backend, recompute_hidden):
        return saved_storage_bytes(lambda: feed_forward(*tensors, hidden_keep, DROPOUT_P, recompute_hidden,
                                                        backend=backend), excluded=[*tensors, hidden_keep])

    assert saved("reference", False) >= 2 * hidden_bytes
    for backend in FUSED_BACKENDS:
        assert saved(backend, False) == hidden_bytes
        assert saved(backend, True) == 0


BAD_INPUTS = [
    ("x", lambda x, w1, w2, k: (x[0], w1, w2, k)),
    ("x", lambda x, w1, w2, k: (x.long(), w1, w2, k)),
    ("hidden_weight", lambda x, w1, w2, k: (x, w1[:, :-1], w2, k)),
    ("hidden_weight", lambda x, w1, w2, k: (x, w1.float(), w2, k)),
    ("output_weight", lambda x, w1, w2, k: (x, w1, w2[:, :-1], k)),
    ("output_weight", lambda x, w1, w2, k: (x, w1, w2[0], k)),
    ("hidden_keep", lambda x, w1, w2, k: (x, w1, w2, k.double())),
    ("hidden_keep", lambda x, w1, w2, k: (x, w1, w2, k[:, :-1])),
]


@pytest.mark.parametrize("name,corrupt", BAD_INPUTS)
@pytest.mark.parametrize("backend", ("reference",) + FUSED_BACKENDS)
def test_rejects_bad_inputs(backend, name, corrupt):
    (x, w1, w2), keep = inputs(2, 5, 4, 12, 4, "random")
    with pytest.raises(ValueError, match=name):
        feed_forward(*corrupt(x, w1, w2, keep), DROPOUT_P, backend=backend)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_rejects_bad_dropout_probability(p):
    (x, w1, w2), keep = inputs(2, 5, 4, 12, 4, "random")
    with pytest.raises(ValueError, match="dropout_p"):
        feed_forward(x, w1, w2, keep, p)


def test_registration():
    assert set(registry.registered_backends(OP_NAME)) == {"reference", "torch", "compiled"}
    assert registry.selected_backend(OP_NAME, "auto", torch.device("cpu")) == "compiled"
    # A model-wide triton backend runs this op's torch form (two dense matmuls: cuBLAS's work).
    assert registry.resolve_backend_name(OP_NAME, "triton") == "torch"


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_compiled_custom_ops_pass_opcheck(contiguous, either_cpu_paths):
    (x, w1, w2), keep = inputs(2, 5, 4, 12, 4, "random")
    if not contiguous:
        x = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    for recompute_hidden in (False, True):
        args = (x, w1, w2, keep, 1 / (1 - DROPOUT_P), recompute_hidden)
        torch.library.opcheck(torch.ops.ipmt_fast.feed_forward.default, args)
        out, hidden = torch.ops.ipmt_fast.feed_forward(x.detach(), w1.detach(), w2.detach(), *args[3:])
        torch.library.opcheck(torch.ops.ipmt_fast.feed_forward_backward.default,
                              (torch.randn_like(out), x.detach(), w1.detach(), w2.detach(), keep, args[4], hidden))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_matches_cpu_reference(backend, recompute_hidden):
    tensors, hidden_keep = inputs(2, 37, 16, 48, 16, "random")
    expected = value_and_grads("reference", tensors, hidden_keep, False)
    on_cuda = [t.detach().cuda().requires_grad_() for t in tensors]
    got = value_and_grads(backend, on_cuda, hidden_keep.cuda(), recompute_hidden)
    for e, o in zip(expected, got):
        assert o.device.type == "cuda"
        assert_close(o, e, rtol=FLOAT64_TOL)
