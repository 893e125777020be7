"""Few-shot segmentation metrics of the published protocol.

Per episode, the intersection and union of background (0) and foreground (1) are counted over
the pixels whose label is not 255. Foreground counts are summed per fold class over all episodes
of that class; the class IoU is ``sum(I) / sum(U)`` and **mIoU** is the mean over the fold's
classes. **FB-IoU** is the mean of the background and foreground IoU with the counts summed over
all episodes. Counts are integers, so a sum over ranks is exact.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, Sequence

import torch

from ..constants import IGNORE_LABEL

NUM_CLASSES = 2  # background, foreground
# The published division guard.
IOU_EPS = 1e-10


def intersection_and_union(prediction: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES,
                           ignore_label: int = IGNORE_LABEL):
    """Per-class ``(intersection, union, target area)`` pixel counts (int64, shape ``(K,)``) of
    ``prediction`` against ``target`` (same shape), ignoring pixels where ``target == ignore_label``."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have one shape")
    valid = target != ignore_label
    pred, tgt = prediction[valid].long(), target[valid].long()
    intersection = torch.bincount(pred[pred == tgt], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_target = torch.bincount(tgt, minlength=num_classes)[:num_classes]
    return intersection, area_pred + area_target - intersection, area_target


@dataclass
class EvalResult:
    """mIoU and FB-IoU as fractions (0..1), per-class foreground IoU and episode counts."""

    miou: float
    fb_iou: float
    class_iou: Dict[int, float]
    class_episodes: Dict[int, int]
    episodes: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"miou": self.miou, "fb_iou": self.fb_iou, "episodes": self.episodes,
                "class_iou": {str(c): v for c, v in self.class_iou.items()},
                "class_episodes": {str(c): v for c, v in self.class_episodes.items()}, **self.extra}

    def summary(self) -> str:
        """The CLI's closing line, in percent."""
        return f"mIoU {100 * self.miou:.2f} FB-IoU {100 * self.fb_iou:.2f}"


class FewShotMeter:
    """Accumulates episode counts for the fold classes ``class_ids``."""

    def __init__(self, class_ids: Sequence[int]):
        self.class_ids = tuple(int(c) for c in class_ids)
        self._position = {c: i for i, c in enumerate(self.class_ids)}
        n = len(self.class_ids)
        # Columns: foreground intersection, foreground union, episodes (per class); then totals.
        self.class_counts = torch.zeros(n, 3, dtype=torch.int64)
        self.totals = torch.zeros(2, NUM_CLASSES, dtype=torch.int64)  # rows: intersection, union

    def update(self, prediction: torch.Tensor, target: torch.Tensor, class_id: int) -> None:
        """Add one episode: ``prediction`` and ``target`` label maps of one shape."""
        if int(class_id) not in self._position:
            raise ValueError(f"class {class_id} is not one of the fold classes {self.class_ids}")
        intersection, union, _ = intersection_and_union(prediction, target)
        intersection, union = intersection.cpu(), union.cpu()
        row = self.class_counts[self._position[int(class_id)]]
        row += torch.stack([intersection[1], union[1], torch.ones((), dtype=torch.int64)])
        self.totals += torch.stack([intersection, union])

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of the default process group (exact: integers)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            for name in ("class_counts", "totals"):
                t = getattr(self, name).to(device)
                dist.all_reduce(t)
                setattr(self, name, t.cpu())

    def result(self) -> EvalResult:
        counts = self.class_counts.double()
        class_iou = counts[:, 0] / (counts[:, 1] + IOU_EPS)
        seen = self.class_counts[:, 2] > 0
        if not bool(seen.any()):
            raise ValueError("no episode was evaluated")
        missing = [c for c, s in zip(self.class_ids, seen.tolist()) if not s]
        if missing:
            # The published code would count these classes as IoU 0; we average over the classes seen.
            warnings.warn(f"no episode of fold classes {missing}: mIoU averages the other classes", RuntimeWarning,
                          stacklevel=2)
        totals = self.totals.double()
        fb = totals[0] / (totals[1] + IOU_EPS)
        return EvalResult(
            miou=float(class_iou[seen].mean()), fb_iou=float(fb.mean()),
            class_iou={c: float(v) for c, v, s in zip(self.class_ids, class_iou.tolist(), seen.tolist()) if s},
            class_episodes={c: int(n) for c, n in zip(self.class_ids, self.class_counts[:, 2].tolist())},
            episodes=int(self.class_counts[:, 2].sum()))
