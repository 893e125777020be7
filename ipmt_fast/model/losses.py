"""IPMT's training losses: the weighted dice loss and the duplex segmentation loss (DSL)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DICE_EPS = 1e-8
# DSL mixes the query-side and support-side mask losses 0.3 : 0.7 (published `erfa`).
DSL_QUERY_WEIGHT = 0.3


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice loss on the sigmoid of each of 2 logit channels against one-hot {bg==0, fg==1}.

    Per image and channel: ``1 - 2 sum(p t) / clamp(sum(p^2) + sum(t^2), 1e-8)``, summed over the
    two channels and averaged over the batch. Pixels labelled 255 are in neither one-hot channel,
    but their predictions still count in ``sum(p^2)`` (as published).

    Args:
        logits: ``(B, 2, H, W)``.
        target: ``(B, H, W)`` labels in {0, 1, 255}.
    """
    one_hot = torch.stack([target == 0, target == 1], dim=1).to(logits.dtype)
    batch = logits.shape[0]
    p = torch.sigmoid(logits).flatten(2)
    t = one_hot.flatten(2)
    denominator = torch.clamp((p * p).sum(-1) + (t * t).sum(-1), min=DICE_EPS)
    return (1 - 2 * (p * t).sum(-1) / denominator).sum() / batch


def duplex_segmentation_loss(query_logits: Sequence[torch.Tensor], support_logits: Sequence[torch.Tensor],
                             y: torch.Tensor, s_y: torch.Tensor) -> torch.Tensor:
    """The duplex segmentation loss over the transformer's per-layer mask logits.

    ``0.3 * mean_l BCE(query_logits[l], (y == 1) nearest-resized) +
    0.7 * mean_l BCE(support_logits[l], (s_y == 1) nearest-resized)``.

    Args:
        query_logits: maps of ``(B, 1, h, w)`` (2L of them).
        support_logits: maps of ``(B, S, h, w)`` (L of them).
        y: ``(B, H, W)`` query labels; s_y: ``(B, S, H, W)`` support labels.
    """
    size = query_logits[0].shape[-2:]
    query_gt = F.interpolate((y == 1).unsqueeze(1).to(query_logits[0].dtype), size=size, mode="nearest")
    support_gt = F.interpolate((s_y == 1).to(support_logits[0].dtype), size=size, mode="nearest")
    query_loss = sum(F.binary_cross_entropy_with_logits(q, query_gt) for q in query_logits) / len(query_logits)
    support_loss = sum(F.binary_cross_entropy_with_logits(s, support_gt) for s in support_logits) / len(support_logits)
    return DSL_QUERY_WEIGHT * query_loss + (1 - DSL_QUERY_WEIGHT) * support_loss
