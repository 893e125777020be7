"""Query activation: IPMT's prediction head over tokens and the prototype-conditioned query update.

Two ops that read the query tokens once per transformer layer:

``prototype_mask_logits(embedding, tokens)``
    The prediction head ``logits = E . T`` (``einsum('bmc,bnc->bmn')``) and the next attention
    mask ``sigmoid(logits) >= 0.5`` (detached).
``prototype_query_update(query, prototype, weight)``
    ``ReLU(Conv1x1_{2C->C}(cat(Q, P broadcast over tokens)))`` (``update_q[l]``). With the conv
    weight split as ``[Wq | Wp]`` this is ``ReLU(Q Wq^T + P Wp^T)``: a fused backend never builds
    the ``(B, 2C, h, w)`` concat nor the broadcast prototype.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.library import triton_op

from . import extension, registry
from ._checks import check_same_size, check_tensor
from ._library import contiguous_like, follows_autocast, qualified_name, register_autocast, register_compiled_fakes

MASK_LOGITS_OP = "prototype_mask_logits"
QUERY_UPDATE_OP = "prototype_query_update"

# The head's mask keeps tokens whose foreground probability reaches one half.
MASK_PROBABILITY_THRESHOLD = 0.5


def prototype_mask_logits_reference(embedding, tokens):
    """The published head: einsum, then sigmoid and threshold."""
    logits = torch.einsum("bqc,bkc->bqk", embedding, tokens)
    next_mask = (logits.sigmoid() >= MASK_PROBABILITY_THRESHOLD).detach()
    return logits, next_mask


def prototype_query_update_reference(query, prototype, weight):
    """The published update: broadcast, concat, 1x1 conv on the token map, ReLU."""
    b, n, c = query.shape
    expanded = prototype.expand(b, n, c)
    stacked = torch.cat((query, expanded), dim=-1)  # (B, N, 2C)
    as_map = stacked.transpose(1, 2).unsqueeze(-1)  # (B, 2C, N, 1): the flattened h x w map
    return F.relu(F.conv2d(as_map, weight)).squeeze(-1).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Shared by the fused backends
# ----------------------------------------------------------------------------------------------

# The least logit t of each dtype whose sigmoid, as torch rounds it, is still >= 0.5. The
# published mask is sigmoid(logit) >= 0.5; mathematically that is logit >= 0, but the rounded
# sigmoid is exactly 0.5 for small negative logits too, so the published mask keeps them, and
# `logit >= t` reproduces it without a sigmoid pass. float32 / float64: 1 + exp(-x) rounds to 2
# until exp(-x) reaches 1 + 1.5 units in the last place; float16 / bfloat16 (computed in float32,
# rounded once): 0.5 - |x| / 4 rounds to 0.5 until half a unit below 0.5. Proven against torch's
# own sigmoid on every device the tests run on (tests/test_query_activation.py).
MASK_LOGIT_THRESHOLD = {
    torch.float16: -2.0 ** -11,
    torch.bfloat16: -2.0 ** -8,
    torch.float32: float.fromhex("-0x1.7ffffcp-23"),
    torch.float64: float.fromhex("-0x1.7fffffffffffep-52"),
}


def mask_logit_threshold(dtype: torch.dtype) -> float:
    """The least logit of ``dtype`` the published head's mask keeps (see ``MASK_LOGIT_THRESHOLD``)."""
    return MASK_LOGIT_THRESHOLD[dtype]


def _split_update_weight(weight: torch.Tensor, dtype: torch.dtype):
    """``(Wq, Wp)``: the query and prototype halves of the ``(C, 2C, 1, 1)`` conv weight, as
    ``(C, C)`` views in ``dtype`` (the query's; autocast would cast the conv weight the same way)."""
    channels = weight.shape[0]
    matrix = weight[:, :, 0, 0].to(dtype)
    return matrix[:, :channels], matrix[:, channels:]


# ----------------------------------------------------------------------------------------------
# torch backend: the algebraic fused forms in PyTorch ops, differentiated by autograd
# ----------------------------------------------------------------------------------------------

def prototype_mask_logits_torch(embedding, tokens):
    """One batched matmul, then the exact threshold on the logits (no sigmoid pass)."""
    logits = torch.bmm(embedding, tokens.transpose(1, 2))
    return logits, logits.detach() >= mask_logit_threshold(logits.dtype)


def prototype_query_update_torch(query, prototype, weight):
    """``ReLU(Q Wq^T + P Wp^T)``: the prototype half is a per-batch bias of one batched matmul."""
    query_weight, prototype_weight = _split_update_weight(weight, query.dtype)
    bias = F.linear(prototype, prototype_weight)  # (B, 1, C), broadcast over the tokens by baddbmm
    b, _, c = query.shape
    # In-place ReLU is safe: baddbmm's backward needs its inputs, not its output.
    return torch.baddbmm(bias, query, query_weight.t().expand(b, c, c)).relu_()


# ----------------------------------------------------------------------------------------------
# triton backend: kernels in ipmt_fast.kernels.query_activation as custom ops (torch.library.triton_op)
# ----------------------------------------------------------------------------------------------

def _kernels():
    # Imported on first use: importing triton fixes whether it interprets (CPU) or compiles.
    from ipmt_fast.kernels import query_activation
    return query_activation


@triton_op(qualified_name("triton_mask_logits"), mutates_args=())
def triton_mask_logits(embedding: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits ``E T^T`` and the published mask, written by one kernel."""
    return _kernels().thresholded_logits(embedding, tokens, mask_logit_threshold(embedding.dtype))


@triton_op(qualified_name("triton_mask_logits_backward"), mutates_args=())
def triton_mask_logits_backward(grad_logits: torch.Tensor, embedding: torch.Tensor,
                                tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of embedding and tokens, from one kernel."""
    return _kernels().logits_backward(grad_logits, embedding, tokens)


@triton_mask_logits.register_fake
def _mask_logits_fake(embedding, tokens):
    shape = (embedding.shape[0], embedding.shape[1], tokens.shape[1])
    return embedding.new_empty(shape), embedding.new_empty(shape, dtype=torch.bool)


@triton_mask_logits_backward.register_fake
def _mask_logits_backward_fake(grad_logits, embedding, tokens):
    return contiguous_like(embedding, tokens)


def _mask_logits_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mask_logits_backward(ctx, grad_logits, _grad_next_mask):
    embedding, tokens = ctx.saved_tensors
    return triton_mask_logits_backward(grad_logits.contiguous(), embedding, tokens)


triton_mask_logits.register_autograd(_mask_logits_backward, setup_context=_mask_logits_setup)


@triton_op(qualified_name("triton_bias_relu_matmul"), mutates_args=())
def triton_bias_relu_matmul(query: torch.Tensor, query_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``ReLU(Q Wq^T + bias_b)``: a matmul with a per-batch bias + ReLU epilogue."""
    return _kernels().bias_relu_matmul(query, query_weight, bias)


@triton_op(qualified_name("triton_relu_grad_matmul"), mutates_args=())
def triton_relu_grad_matmul(grad_out: torch.Tensor, out: torch.Tensor,
                            query_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dQ, dZ, dbias)`` of the update from its output, from one kernel."""
    return _kernels().relu_grad_matmul(grad_out, out, query_weight)


@triton_bias_relu_matmul.register_fake
def _query_update_fake(query, query_weight, bias):
    return query.new_empty(query.shape[0], query.shape[1], query_weight.shape[0])


@triton_relu_grad_matmul.register_fake
def _query_update_backward_fake(grad_out, out, query_weight):
    b, n, _ = out.shape
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    return (out.new_empty(b, n, query_weight.shape[1]), contiguous_like(grad_out),
            out.new_empty(b, out.shape[2], dtype=acc_dtype))


def _query_update_setup(ctx, inputs, output):
    query, query_weight, bias = inputs
    ctx.save_for_backward(query, query_weight, output)
    ctx.bias_dtype = bias.dtype


def _query_update_backward(ctx, grad_out):
    query, query_weight, out = ctx.saved_tensors
    grad_query, grad_pre, grad_bias = triton_relu_grad_matmul(grad_out.contiguous(), out, query_weight)
    grad_query_weight = None
    if ctx.needs_input_grad[1]:
        # dWq = sum_b dZ_b^T Q_b is a GEMM with a small (C, C) result reduced over all B*N
        # tokens: torch's matmul (cuBLAS splits that reduction itself) on the dZ the kernel
        # wrote. Writing dZ once and reading it once moves as many bytes as a Triton kernel
        # re-deriving dZ from dY and Y would read, without a second split-reduction kernel.
        grad_query_weight = grad_pre.flatten(0, 1).t().mm(query.flatten(0, 1)).to(query_weight.dtype)
    return grad_query, grad_query_weight, grad_bias.to(ctx.bias_dtype)


triton_bias_relu_matmul.register_autograd(_query_update_backward, setup_context=_query_update_setup)
for _name in ("triton_mask_logits", "triton_bias_relu_matmul"):
    register_autocast(qualified_name(_name), "lower_precision")


def prototype_mask_logits_triton(embedding, tokens):
    """Triton kernels: logits and mask written by one kernel, both gradients by one more."""
    return triton_mask_logits(embedding, tokens)


def prototype_query_update_triton(query, prototype, weight):
    """Triton kernels: a matmul with a per-batch bias + ReLU epilogue, and its fused backward."""
    query_weight, prototype_weight = _split_update_weight(weight, query.dtype)
    # P Wp^T is only (B, C): computed here by torch in the accumulator dtype, so the kernel adds it
    # unrounded; autograd turns its gradient (the column sums of dZ) into dP and dWp.
    acc_dtype = _kernels().accumulator_dtype(query.dtype)
    bias = F.linear(prototype[:, 0].to(acc_dtype), prototype_weight.to(acc_dtype))
    return triton_bias_relu_matmul(query, query_weight, bias)


# ----------------------------------------------------------------------------------------------
# compiled backend: the torch forms' forwards and backwards as C++ ops (csrc/fused_ops.cpp)
# ----------------------------------------------------------------------------------------------

def _mask_logits_compiled_fake(embedding, tokens, threshold):
    return _mask_logits_fake(embedding, tokens)


def _query_update_compiled_fake(query, prototype, weight):
    return contiguous_like(query)


def _query_update_compiled_backward_fake(grad_out, output, query, prototype, weight):
    return contiguous_like(query, prototype, weight)


def _register_compiled_ops():
    register_compiled_fakes(MASK_LOGITS_OP, _mask_logits_compiled_fake, _mask_logits_backward_fake)
    register_compiled_fakes(QUERY_UPDATE_OP, _query_update_compiled_fake, _query_update_compiled_backward_fake)


extension.on_load(_register_compiled_ops)


def prototype_mask_logits_compiled(embedding, tokens):
    """One C++ op each way (``csrc/fused_ops.cpp``): the batched matmul and the exact threshold."""
    return torch.ops.ipmt_fast.prototype_mask_logits(embedding, tokens, mask_logit_threshold(embedding.dtype))


def prototype_query_update_compiled(query, prototype, weight):
    """One C++ op each way (``csrc/fused_ops.cpp``): ``ReLU(Q Wq^T + P Wp^T)`` without the concat."""
    return torch.ops.ipmt_fast.prototype_query_update(query, prototype, weight)


registry.register(MASK_LOGITS_OP, "reference", prototype_mask_logits_reference)
registry.register(QUERY_UPDATE_OP, "reference", prototype_query_update_reference)
registry.register(MASK_LOGITS_OP, "torch", prototype_mask_logits_torch, devices=("cpu", "cuda"))
registry.register(QUERY_UPDATE_OP, "torch", prototype_query_update_torch, devices=("cpu", "cuda"))
registry.register(MASK_LOGITS_OP, "triton", prototype_mask_logits_triton, devices=("cpu", "cuda"),
                  availability=registry.triton_availability)
registry.register(QUERY_UPDATE_OP, "triton", prototype_query_update_triton, devices=("cpu", "cuda"),
                  availability=registry.triton_availability)
registry.register(MASK_LOGITS_OP, "compiled", prototype_mask_logits_compiled, availability=extension.unavailable_reason)
registry.register(QUERY_UPDATE_OP, "compiled", prototype_query_update_compiled,
                  availability=extension.unavailable_reason)


@follows_autocast("lower_precision")
def prototype_mask_logits(embedding: torch.Tensor, tokens: torch.Tensor, backend: str = "auto"):
    """Prediction head over tokens.

    Args:
        embedding: ``(B, M, C)`` mask embeddings (``mask_embed(decoder_norm(P))``).
        tokens: ``(B, N, C)`` token features.
        backend: ``auto``, ``reference``, ``torch`` or ``triton``.

    Returns:
        ``(logits, next_mask)``: ``(B, M, N)`` logits and the detached ``(B, M, N)`` bool mask
        ``sigmoid(logits) >= 0.5``, exactly as the published head rounds it (see
        :data:`MASK_LOGIT_THRESHOLD`).

    Memory-traffic floor (``s`` bytes per element): forward reads ``E`` and ``T`` and writes the
    logits and the mask, ``s*B*(M*C + N*C + M*N) + B*M*N`` bytes; backward reads ``dlogits``,
    ``E`` and ``T`` and writes ``dE`` and ``dT``, ``s*B*(M*N + 2*M*C + 2*N*C)``. The triton
    backend meets both (plus a small float32 buffer of per-token-block partial ``dE``); the torch
    backend reads the logits once more for the mask.
    """
    check_tensor("embedding", embedding, ("B", "M", "C"))
    check_tensor("tokens", tokens, ("B", "N", "C"), dtypes=(embedding.dtype,), device=embedding.device)
    check_same_size("batch", embedding=embedding.shape[0], tokens=tokens.shape[0])
    check_same_size("channel", embedding=embedding.shape[2], tokens=tokens.shape[2])
    fn = registry.get_implementation(MASK_LOGITS_OP, backend, embedding.device)
    return fn(embedding, tokens)


@follows_autocast("lower_precision")
def prototype_query_update(query: torch.Tensor, prototype: torch.Tensor, weight: torch.Tensor,
                           backend: str = "auto") -> torch.Tensor:
    """``ReLU(Conv1x1(cat(query, prototype broadcast)))`` on tokens.

    Args:
        query: ``(B, N, C)`` query tokens.
        prototype: ``(B, 1, C)`` one prototype per episode.
        weight: ``(C, 2C, 1, 1)`` bias-free 1x1 conv weight (``update_q[l].0.weight``); input
            channels ``[:C]`` read the query, ``[C:]`` the prototype.
        backend: ``auto``, ``reference``, ``torch`` or ``triton``.

    Returns:
        ``(B, N, C)`` updated query tokens.

    Memory-traffic floor (``s`` bytes per element): forward reads ``Q``, ``P`` and the weight and
    writes ``Y``, ``s*(2*B*N*C + B*C + 2*C*C)`` bytes; backward reads ``dY``, the saved ``Y``,
    ``Q``, ``P`` and the weight and writes ``dQ``, ``dP`` and ``dW``,
    ``s*(4*B*N*C + 2*B*C + 4*C*C)``. The triton backend meets the forward floor and adds one
    ``B*N*C`` write and read of the masked gradient ``dZ`` to the backward (see
    ``_TritonQueryUpdate.backward``); the torch backend adds passes over ``Y`` for the bias and the ReLU.
    """
    check_tensor("query", query, ("B", "N", "C"))
    b, n, c = query.shape
    check_tensor("prototype", prototype, (b, 1, c), dtypes=(query.dtype,), device=query.device)
    check_tensor("weight", weight, (c, 2 * c, 1, 1), device=query.device)
    fn = registry.get_implementation(QUERY_UPDATE_OP, backend, query.device)
    return fn(query, prototype, weight)
