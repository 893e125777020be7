"""Masked prototype attention: a few prototype rows attend over many tokens under a boolean mask.

This is IPMT's ``MyCrossAttention`` (support side, ``cross_layers``) and ``QSCrossAttention``
(query side, ``decoder_cross_attention_layers``)::

    a   = softmax(scale * (P Wq^T) (T Wk^T)^T + (-10000 where mask is False))
    out = (Drop(a) (T Wv^T)) Wo^T

with single-head attention, bias-free projections and ``scale = C ** -0.5``. The additive -10000
(not -inf) is the published choice: an all-False mask row gives a plain softmax, never NaN.
Dropout on ``a`` is given as an explicit ``attn_keep`` multiplier (0 or 1/(1-p), drawn by the
model's ``nn.Dropout``) so every backend applies the same mask.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import registry
from ._checks import check_same_size, check_tensor

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


def masked_prototype_attention(prototype: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                               q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                               proj_weight: torch.Tensor, attn_keep: Optional[torch.Tensor] = None,
                               scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Attend from ``M`` prototype rows over ``N`` tokens restricted by ``token_mask``.

    Args:
        prototype: ``(B, M, C)`` query rows (the prototypes).
        tokens: ``(B, N, C)`` tokens (for S shots, the shots concatenated along N).
        token_mask: ``(B, N)`` bool, True where a token may be attended.
        q_weight, k_weight, v_weight, proj_weight: ``(C, C)`` ``nn.Linear`` weights (no bias).
        attn_keep: optional ``(B, M, N)`` attention-dropout multiplier (0 or ``1/(1-p)``).
        scale: logit scale, default ``C ** -0.5``.
        backend: ``auto``, ``reference``, ``torch`` or ``triton`` (see ``ipmt_fast.ops.registry``).

    Returns:
        ``(B, M, C)`` attention output after the output projection.
    """
    check_tensor("prototype", prototype, ("B", "M", "C"))
    device = prototype.device
    check_tensor("tokens", tokens, ("B", "N", "C"), dtypes=(prototype.dtype,), device=device)
    check_tensor("token_mask", token_mask, ("B", "N"), dtypes=(torch.bool,), device=device)
    b, m, c = prototype.shape
    n = tokens.shape[1]
    check_same_size("batch", prototype=b, tokens=tokens.shape[0], token_mask=token_mask.shape[0])
    check_same_size("channel", prototype=c, tokens=tokens.shape[2])
    check_same_size("token", tokens=n, token_mask=token_mask.shape[1])
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight),
                    ("proj_weight", proj_weight)):
        check_tensor(name, w, (c, c), device=device)
    if attn_keep is not None:
        check_tensor("attn_keep", attn_keep, (b, m, n), device=device)
    fn = registry.get_implementation(OP_NAME, backend, device)
    return fn(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, attn_keep, scale)
