"""The published evaluation protocol: fixed-seed episodes, class-wise foreground IoU averaged over
the fold's classes (mIoU) and FB-IoU, measured on the original-resolution labels.

The model sees the validation transform's square (longer side resized to the input size, zero
padding, label padded with 255, which marks the padding for the model). Its logits are
bilinearly resized (``align_corners=True``) to the square of the original label's longer side,
the top-left ``H x W`` is compared with the original label and 255 pixels are ignored, exactly as
the published ``ori_resize`` protocol pads the label with 255 to that square.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..data import evaluation_batches, make_loader
from .amp import autocast
from .distributed import DistContext
from .graphs import GraphedForward
from .metrics import EvalResult, FewShotMeter


def prediction_at_original_size(logits: torch.Tensor, original_size: Tuple[int, int]) -> torch.Tensor:
    """``(2, S, S)`` logits of a validation square -> ``(H, W)`` class map of the original image
    (resize to the longer side's square, keep the top-left ``H x W``: where the content was)."""
    height, width = original_size
    longer = max(height, width)
    resized = F.interpolate(logits[None].float(), size=(longer, longer), mode="bilinear", align_corners=True)[0]
    return resized[:, :height, :width].argmax(0)


def episode_inputs(batch: dict, device: torch.device, dtype: torch.dtype):
    """The model's inputs ``(x, s_x, s_y, y)`` of a collated batch, on ``device``."""
    return (batch["image"].to(device, dtype, non_blocking=True),
            batch["support_images"].to(device, dtype, non_blocking=True),
            batch["support_labels"].to(device, non_blocking=True),
            batch["label"].to(device, non_blocking=True))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, class_ids: Sequence[int], device: torch.device, batch_size: int = 1,
             workers: int = 0, amp: str = "none", original_resolution: bool = True,
             dist_ctx: Optional[DistContext] = None, progress: bool = False, cuda_graphs: bool = False
             ) -> EvalResult:
    """Run every episode of ``dataset`` (a ``val``-mode episode source) and score it.

    With several ranks each evaluates every ``world_size``-th episode and the counts are summed,
    so the result equals a single-process run. ``model`` is left in eval mode. ``cuda_graphs``
    replays the forward from a CUDA graph captured once per input shape (:class:`GraphedForward`).
    """
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx else (0, 1)
    batches = evaluation_batches(len(dataset), batch_size, rank, world)
    loader = make_loader(dataset, batches, device, workers)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    meter = FewShotMeter(class_ids)
    model.eval()
    graphed = GraphedForward(model, amp) if cuda_graphs else None
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for batch in loader:
        x, s_x, s_y, y = episode_inputs(batch, device, dtype)
        if graphed is not None:
            logits = graphed(x, s_x, s_y, y)
        else:
            with autocast(device, amp):
                logits = model(x, s_x, s_y, y)
        for i, class_id in enumerate(batch["class_id"].tolist()):
            if original_resolution:
                target = batch["original_label"][i]
                prediction = prediction_at_original_size(logits[i], tuple(target.shape)).cpu()
            else:
                target = batch["label"][i]
                prediction = logits[i].argmax(0).cpu()
            meter.update(prediction, target, class_id)
    meter.all_reduce()
    return meter.result()
