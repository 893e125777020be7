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

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import registry
from ._checks import check_same_size, check_tensor, follows_autocast

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

_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


@functools.lru_cache(maxsize=None)
def published_mask_threshold(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The least logit ``t`` of ``dtype`` whose ``sigmoid(t) >= 0.5`` as torch computes it on ``device``.

    Mathematically ``sigmoid(x) >= 0.5`` is ``x >= 0``, but the rounded sigmoid is exactly 0.5 for
    small negative logits too (float32 on the CPU: down to about -1.8e-7), so the published mask
    keeps those tokens. The rounded sigmoid is monotone, hence ``x >= t`` reproduces the published
    mask exactly without a sigmoid pass. ``t`` is found by bisection over the bit patterns of the
    negative values of ``dtype`` (which order like their magnitudes), once per dtype and device.

    Returns:
        A one-element tensor of ``dtype`` on ``device``.
    """
    as_int = _SAME_WIDTH_INT[dtype]

    def negative(magnitude_bits: int) -> torch.Tensor:
        return -torch.tensor([magnitude_bits], dtype=as_int, device=device).view(dtype)

    def kept(magnitude_bits: int) -> bool:
        return bool(negative(magnitude_bits).sigmoid() >= MASK_PROBABILITY_THRESHOLD)

    # -0.0 is kept (sigmoid 0.5) and -1.0 is not (sigmoid 0.27).
    kept_bits, dropped_bits = 0, int(torch.tensor([1.0], dtype=dtype).view(as_int))
    while dropped_bits - kept_bits > 1:
        middle = (kept_bits + dropped_bits) // 2
        if kept(middle):
            kept_bits = middle
        else:
            dropped_bits = middle
    return negative(kept_bits)


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
    return logits, logits.detach() >= published_mask_threshold(logits.dtype, logits.device)


def prototype_query_update_torch(query, prototype, weight):
    """``ReLU(Q Wq^T + P Wp^T)``: the prototype half is a per-batch bias of one batched matmul."""
    query_weight, prototype_weight = _split_update_weight(weight, query.dtype)
    bias = F.linear(prototype, prototype_weight)  # (B, 1, C), broadcast over the tokens by baddbmm
    b, _, c = query.shape
    # In-place ReLU is safe: baddbmm's backward needs its inputs, not its output.
    return torch.baddbmm(bias, query, query_weight.t().expand(b, c, c)).relu_()


# ----------------------------------------------------------------------------------------------
# triton backend: kernels in ipmt_fast.kernels.query_activation, one autograd.Function per op
# ----------------------------------------------------------------------------------------------

def _kernels():
    # Imported on first use: importing triton fixes whether it interprets (CPU) or compiles.
    from ipmt_fast.kernels import query_activation
    return query_activation


class _TritonMaskLogits(torch.autograd.Function):
    """Logits and mask in one pass over the tokens; both gradients from one backward kernel."""

    @staticmethod
    def forward(ctx, embedding, tokens):
        threshold = published_mask_threshold(embedding.dtype, embedding.device)
        logits, next_mask = _kernels().thresholded_logits(embedding, tokens, threshold)
        ctx.save_for_backward(embedding, tokens)
        ctx.mark_non_differentiable(next_mask)
        return logits, next_mask

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits, _grad_next_mask):
        embedding, tokens = ctx.saved_tensors
        return _kernels().logits_backward(grad_logits, embedding, tokens)


class _TritonQueryUpdate(torch.autograd.Function):
    """``ReLU(Q Wq^T + bias_b)``: a matmul with a bias + ReLU epilogue; backward from the saved output."""

    @staticmethod
    def forward(ctx, query, query_weight, bias):
        out = _kernels().bias_relu_matmul(query, query_weight, bias)
        ctx.save_for_backward(query, query_weight, out)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, query_weight, out = ctx.saved_tensors
        grad_query, grad_pre, grad_bias = _kernels().relu_grad_matmul(grad_out, out, query_weight)
        grad_query_weight = None
        if ctx.needs_input_grad[1]:
            # dWq = sum_b dZ_b^T Q_b is a GEMM with a small (C, C) result reduced over all B*N
            # tokens: torch's matmul (cuBLAS splits that reduction itself) on the dZ the kernel
            # wrote. Writing dZ once and reading it once moves as many bytes as a Triton kernel
            # re-deriving dZ from dY and Y would read, without a second split-reduction kernel.
            grad_query_weight = grad_pre.flatten(0, 1).t().mm(query.flatten(0, 1)).to(query_weight.dtype)
        return grad_query, grad_query_weight, grad_bias.to(ctx.bias_dtype)


def prototype_mask_logits_triton(embedding, tokens):
    """Triton kernels: logits and mask written by one kernel, both gradients by one more."""
    return _TritonMaskLogits.apply(embedding, tokens)


def prototype_query_update_triton(query, prototype, weight):
    """Triton kernels: a matmul with a per-batch bias + ReLU epilogue, and its fused backward."""
    query_weight, prototype_weight = _split_update_weight(weight, query.dtype)
    # P Wp^T is only (B, C): computed here by torch in the accumulator dtype, so the kernel adds it
    # unrounded; autograd turns its gradient (the column sums of dZ) into dP and dWp.
    acc_dtype = _kernels().accumulator_dtype(query.dtype)
    bias = F.linear(prototype[:, 0].to(acc_dtype), prototype_weight.to(acc_dtype))
    return _TritonQueryUpdate.apply(query, query_weight, bias)


registry.register(MASK_LOGITS_OP, "reference", prototype_mask_logits_reference)
registry.register(QUERY_UPDATE_OP, "reference", prototype_query_update_reference)
registry.register(MASK_LOGITS_OP, "torch", prototype_mask_logits_torch, devices=("cpu", "cuda"))
registry.register(QUERY_UPDATE_OP, "torch", prototype_query_update_torch, devices=("cpu", "cuda"))
registry.register(MASK_LOGITS_OP, "triton", prototype_mask_logits_triton, devices=("cpu", "cuda"),
                  availability=registry.triton_availability)
registry.register(QUERY_UPDATE_OP, "triton", prototype_query_update_triton, devices=("cpu", "cuda"),
                  availability=registry.triton_availability)


@follows_autocast
def prototype_mask_logits(embedding: torch.Tensor, tokens: torch.Tensor, backend: str = "auto"):
    """Prediction head over tokens.

    Args:
        embedding: ``(B, M, C)`` mask embeddings (``mask_embed(decoder_norm(P))``).
        tokens: ``(B, N, C)`` token features.
        backend: ``auto``, ``reference``, ``torch`` or ``triton``.

    Returns:
        ``(logits, next_mask)``: ``(B, M, N)`` logits and the detached ``(B, M, N)`` bool mask
        ``sigmoid(logits) >= 0.5``, exactly as the published head rounds it (see
        :func:`published_mask_threshold`).

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


@follows_autocast
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
