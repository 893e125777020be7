"""Masked prototype attention: a few prototype rows attend over many tokens under a boolean mask.

This is IPMT's ``MyCrossAttention`` (support side, ``cross_layers``) and ``QSCrossAttention``
(query side, ``decoder_cross_attention_layers``)::

    a   = softmax(scale * (P Wq^T) (T Wk^T)^T + (-10000 where mask is False))
    out = (Drop(a) (T Wv^T)) Wo^T

with single-head attention, bias-free projections and ``scale = C ** -0.5``. The additive -10000
(not -inf) is the published choice: an all-False mask row gives a plain softmax, never NaN.
Dropout on ``a`` is given as an explicit ``attn_keep`` multiplier (0 or 1/(1-p), drawn by the
model's ``nn.Dropout``) so every backend applies the same mask. ``attn_keep`` is a sampled mask
that needs no gradient: the ``triton`` backend returns none for it (nor for ``token_mask``).

Fused form (``torch`` and ``triton`` backends). Keys and values of the N tokens are never formed:
with ``q' = (P Wq^T) Wk`` (one C-vector per prototype row) the logits are ``scale * T q'``, and
``(sum_n a_n keep_n T_n) Wv^T Wo^T`` is the output, so the only work of size N x C is one pass over
the tokens (the logits, then the weighted sum) instead of two (N, C) x (C, C) projections.

A row whose mask is all False has a uniform bias, i.e. a plain softmax of the logits. The fused
backends drop the bias there (the same function in exact arithmetic): the published form adds it
in the input dtype, which rounds those logits to the spacing of floats near -10000 (2**-10 in
fp32, 8 in fp16, 64 in bf16) and so loses a few 1e-4 of relative accuracy in fp32 and nearly all of
it in fp16/bf16. The fused backends match the float64 reference on such rows in every dtype.

Memory-traffic floor of the fused op, per call, with ``e`` bytes per element of the input dtype:
forward reads the tokens and the mask and, when given, ``attn_keep``, and writes the output:
``e*B*N*C + B*N + e_keep*B*M*N + e*B*M*C`` bytes (plus the (C, C) weights and (B, M, C) rows, which
are small); backward reads the tokens, mask and keep once more and writes ``dT``:
``2*e*B*N*C + B*N + e_keep*B*M*N`` bytes. The ``triton`` backend moves this plus span partials of
``(C + 2) * 4`` bytes per row and span (a few percent at IPMT's sizes); the ``reference`` form
also writes and reads two (B, N, C) projections and (B, M, N) attention maps.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.library import triton_op

from . import extension, registry
from ._checks import check_same_size, check_tensor
from ._library import contiguous_like, follows_autocast, qualified_name, register_autocast, register_compiled_fakes

OP_NAME = "masked_prototype_attention"

# The published additive mask value for tokens outside the mask (not -inf: see module docstring).
MASKED_LOGIT_BIAS = -10000.0


def masked_prototype_attention_reference(prototype, tokens, token_mask, q_weight, k_weight, v_weight,
                                         proj_weight, attn_keep=None, scale=None):
    """The published computation, literally: full K/V projections of every token."""
    scale = prototype.shape[-1] ** -0.5 if scale is None else scale
    q = prototype @ q_weight.t()
    k = tokens @ k_weight.t()
    v = tokens @ v_weight.t()
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn + (~token_mask).unsqueeze(1).to(attn.dtype) * MASKED_LOGIT_BIAS
    attn = attn.softmax(dim=-1)
    if attn_keep is not None:
        attn = attn * attn_keep
    return (attn @ v) @ proj_weight.t()


registry.register(OP_NAME, "reference", masked_prototype_attention_reference)


def _fused_prototype_attention(softmax_pool, prototype, tokens, token_mask, q_weight, k_weight, v_weight,
                               proj_weight, attn_keep, scale):
    """The op with its token work delegated to ``softmax_pool(query_key, tokens, mask, keep, scale)``.

    The (B, M, C) x (C, C) products around the pool are ordinary matmuls that autograd
    differentiates (they give dP, dWq, dWk, dWv, dWo from dq' and dpooled).
    """
    scale = prototype.shape[-1] ** -0.5 if scale is None else scale
    # q . (T_n Wk^T) = ((P Wq^T) Wk) . T_n: project the prototype, not the tokens.
    query_key = (prototype @ q_weight.t()) @ k_weight
    pooled = softmax_pool(query_key, tokens, token_mask, attn_keep, scale)
    # sum_n w_n (T_n Wv^T) = (sum_n w_n T_n) Wv^T: the values are projected after pooling.
    return (pooled @ v_weight.t()) @ proj_weight.t()


def _softmax_pool_torch(query_key, tokens, token_mask, attn_keep, scale):
    """``sum_n softmax_n(scale * q'.T_n + bias_n) keep_n T_n`` in plain PyTorch ops."""
    bias = (~token_mask).to(query_key.dtype) * MASKED_LOGIT_BIAS
    # A row with no allowed token has a uniform bias, i.e. a plain softmax: removing it there
    # changes nothing in exact arithmetic and spares fp32/fp16 the rounding of logits near -10000.
    bias = bias - bias.amax(dim=1, keepdim=True)
    # Tokens-major (B, N, M) logits and weights: both bmm backwards then produce dT as contiguous
    # (B, N, C) products (a (B, M, N) layout makes autograd add a transposed dT, ~10x slower on CPU).
    logits = torch.bmm(tokens, query_key.transpose(1, 2)) * scale + bias.unsqueeze(2)
    weights = logits.softmax(dim=1)
    if attn_keep is not None:
        weights = weights * attn_keep.transpose(1, 2)
    return torch.bmm(weights.transpose(1, 2), tokens)


def masked_prototype_attention_torch(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight,
                                     attn_keep=None, scale=None):
    """Fused form in plain PyTorch ops (any device); autograd differentiates it."""
    return _fused_prototype_attention(_softmax_pool_torch, prototype, tokens, token_mask, q_weight, k_weight,
                                      v_weight, proj_weight, attn_keep, scale)


@triton_op(qualified_name("triton_softmax_pool"), mutates_args=())
def triton_softmax_pool(query_key: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                        attn_keep: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The triton backend's token work, one streaming pass (``ipmt_fast.kernels``): the pooled rows
    and the per-row log-sum-exp (B, M), which backward uses instead of the (B, M, N) attention."""
    from ..kernels import prototype_attention as kernels

    return kernels.softmax_pool_forward(query_key, tokens, token_mask, attn_keep, scale, MASKED_LOGIT_BIAS)


@triton_op(qualified_name("triton_softmax_pool_backward"), mutates_args=())
def triton_softmax_pool_backward(query_key: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                                 attn_keep: Optional[torch.Tensor], scale: float, pooled: torch.Tensor,
                                 lse: torch.Tensor, grad_pooled: torch.Tensor,
                                 need_grad_tokens: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of query_key and (when ``need_grad_tokens``, else an empty tensor) of the tokens."""
    from ..kernels import prototype_attention as kernels

    grad_query_key, grad_tokens = kernels.softmax_pool_backward(
        query_key, tokens, token_mask, attn_keep, scale, MASKED_LOGIT_BIAS, pooled, lse, grad_pooled,
        need_grad_tokens=need_grad_tokens)
    return grad_query_key, grad_tokens if need_grad_tokens else tokens.new_empty(0)


@triton_softmax_pool.register_fake
def _softmax_pool_fake(query_key, tokens, token_mask, attn_keep, scale):
    b, m, c = query_key.shape
    return tokens.new_empty(b, m, c), tokens.new_empty(b, m, dtype=torch.float32)


@triton_softmax_pool_backward.register_fake
def _softmax_pool_backward_fake(query_key, tokens, token_mask, attn_keep, scale, pooled, lse, grad_pooled,
                                need_grad_tokens):
    return contiguous_like(query_key), contiguous_like(tokens) if need_grad_tokens else tokens.new_empty(0)


def _softmax_pool_setup(ctx, inputs, output):
    query_key, tokens, token_mask, attn_keep, scale = inputs
    pooled, lse = output
    ctx.save_for_backward(query_key, tokens, token_mask, attn_keep, pooled, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)  # saved for backward, never differentiated
    ctx.set_materialize_grads(False)


def _softmax_pool_autograd(ctx, grad_pooled, _grad_lse):
    """Gradients for ``query_key`` and ``tokens`` only: ``token_mask`` is boolean and
    ``attn_keep`` a sampled mask."""
    if grad_pooled is None:  # grads are not materialised: the output took no part in the loss
        return (None,) * 5
    query_key, tokens, token_mask, attn_keep, pooled, lse = ctx.saved_tensors
    need_grad_tokens = ctx.needs_input_grad[1]
    grad_query_key, grad_tokens = triton_softmax_pool_backward(
        query_key, tokens, token_mask, attn_keep, ctx.scale, pooled, lse, grad_pooled.contiguous(), need_grad_tokens)
    return grad_query_key, grad_tokens if need_grad_tokens else None, None, None, None


triton_softmax_pool.register_autograd(_softmax_pool_autograd, setup_context=_softmax_pool_setup)
register_autocast(qualified_name("triton_softmax_pool"), "lower_precision")


def _triton_softmax_pool(query_key, tokens, token_mask, attn_keep, scale):
    return triton_softmax_pool(query_key, tokens, token_mask, attn_keep, scale)[0]


def masked_prototype_attention_triton(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight,
                                      attn_keep=None, scale=None):
    """Fused form with the token pass in Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    return _fused_prototype_attention(_triton_softmax_pool, prototype, tokens, token_mask, q_weight, k_weight,
                                      v_weight, proj_weight, attn_keep, scale)


# ---------------------------------------------------------------------------------------------
# compiled backend: the torch form's forward and its backward as two C++ ops (csrc/fused_ops.cpp),
# autograd and autocast in C++ (csrc/autograd.cpp)
# ---------------------------------------------------------------------------------------------

def _compiled_fake(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, attn_keep, scale,
                   masked_bias):
    b, m, c = prototype.shape
    rows = [prototype.new_empty(b, m, c) for _ in range(5)]
    return rows[0], rows[1], rows[2], prototype.new_empty(b, tokens.shape[1], m), rows[3], rows[4]


def _compiled_backward_fake(grad_out, prototype, tokens, q_weight, k_weight, v_weight, proj_weight, attn_keep, scale,
                            query, query_key, attention, pooled, value):
    return contiguous_like(prototype, tokens, q_weight, k_weight, v_weight, proj_weight)


extension.on_load(lambda: register_compiled_fakes(OP_NAME, _compiled_fake, _compiled_backward_fake))


def masked_prototype_attention_compiled(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight,
                                        attn_keep=None, scale=None):
    """The torch form's algebra, forward and backward each one C++ op (``csrc/fused_ops.cpp``)."""
    scale = prototype.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.ipmt_fast.masked_prototype_attention(prototype, tokens, token_mask, q_weight, k_weight, v_weight,
                                                          proj_weight, attn_keep, scale, MASKED_LOGIT_BIAS)[0]


registry.register(OP_NAME, "torch", masked_prototype_attention_torch, devices=("cpu", "cuda"))
registry.register(OP_NAME, "compiled", masked_prototype_attention_compiled, devices=("cpu", "cuda"),
                  availability=extension.unavailable_reason)
registry.register(OP_NAME, "triton", masked_prototype_attention_triton, devices=("cpu", "cuda"),
                  availability=registry.triton_availability)


def check_arguments(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, attn_keep=None):
    """Raise if the arguments of :func:`masked_prototype_attention` do not fit together."""
    check_tensor("prototype", prototype, ("B", "M", "C"))
    device = prototype.device
    check_tensor("tokens", tokens, ("B", "N", "C"), dtypes=(prototype.dtype,), device=device)
    check_tensor("token_mask", token_mask, ("B", "N"), dtypes=(torch.bool,), device=device)
    b, m, c = prototype.shape
    n = tokens.shape[1]
    check_same_size("batch", prototype=b, tokens=tokens.shape[0], token_mask=token_mask.shape[0])
    check_same_size("channel", prototype=c, tokens=tokens.shape[2])
    check_same_size("token", tokens=n, token_mask=token_mask.shape[1])
    if n == 0:
        raise ValueError("tokens must hold at least one token (N >= 1): there is nothing to attend to")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight),
                    ("proj_weight", proj_weight)):
        check_tensor(name, w, (c, c), device=device)
    if attn_keep is not None:
        check_tensor("attn_keep", attn_keep, (b, m, n), device=device)


@follows_autocast("lower_precision")
def masked_prototype_attention(prototype: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                               q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                               proj_weight: torch.Tensor, attn_keep: Optional[torch.Tensor] = None,
                               scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Attend from ``M`` prototype rows over ``N`` tokens restricted by ``token_mask``.

    Args:
        prototype: ``(B, M, C)`` query rows (the prototypes).
        tokens: ``(B, N, C)`` tokens, ``N >= 1`` (for S shots, the shots concatenated along N).
        token_mask: ``(B, N)`` bool, True where a token may be attended.
        q_weight, k_weight, v_weight, proj_weight: ``(C, C)`` ``nn.Linear`` weights (no bias).
        attn_keep: optional ``(B, M, N)`` attention-dropout multiplier (0 or ``1/(1-p)``); a
            sampled mask, so the ``triton`` backend gives it no gradient.
        scale: logit scale, default ``C ** -0.5``.
        backend: ``auto``, ``reference``, ``torch`` or ``triton`` (see ``ipmt_fast.ops.registry``).

    Returns:
        ``(B, M, C)`` attention output after the output projection.
    """
    check_arguments(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, attn_keep)
    fn = registry.get_implementation(OP_NAME, backend, prototype.device)
    return fn(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, attn_keep, scale)
