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

import torch
import torch.nn.functional as F

from . import registry
from ._checks import check_same_size, check_tensor

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


registry.register(MASK_LOGITS_OP, "reference", prototype_mask_logits_reference)
registry.register(QUERY_UPDATE_OP, "reference", prototype_query_update_reference)


def prototype_mask_logits(embedding: torch.Tensor, tokens: torch.Tensor, backend: str = "auto"):
    """Prediction head over tokens.

    Args:
        embedding: ``(B, M, C)`` mask embeddings (``mask_embed(decoder_norm(P))``).
        tokens: ``(B, N, C)`` token features.
        backend: ``auto``, ``reference``, ``torch`` or ``triton``.

    Returns:
        ``(logits, next_mask)``: ``(B, M, N)`` logits and the detached ``(B, M, N)`` bool mask
        ``sigmoid(logits) >= 0.5``.
    """
    check_tensor("embedding", embedding, ("B", "M", "C"))
    check_tensor("tokens", tokens, ("B", "N", "C"), dtypes=(embedding.dtype,), device=embedding.device)
    check_same_size("batch", embedding=embedding.shape[0], tokens=tokens.shape[0])
    check_same_size("channel", embedding=embedding.shape[2], tokens=tokens.shape[2])
    fn = registry.get_implementation(MASK_LOGITS_OP, backend, embedding.device)
    return fn(embedding, tokens)


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
    """
    check_tensor("query", query, ("B", "N", "C"))
    b, n, c = query.shape
    check_tensor("prototype", prototype, (b, 1, c), dtypes=(query.dtype,), device=query.device)
    check_tensor("weight", weight, (c, 2 * c, 1, 1), device=query.device)
    fn = registry.get_implementation(QUERY_UPDATE_OP, backend, query.device)
    return fn(query, prototype, weight)
