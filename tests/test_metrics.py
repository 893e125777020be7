"""mIoU / FB-IoU on hand-made predictions with known answers, and the evaluation loop."""
import pytest
import torch

from ipmt_fast.data.synthetic import SyntheticEpisodes, synthetic_fold_classes
from ipmt_fast.data.transforms import ValTransform
from ipmt_fast.train.evaluate import evaluate, prediction_at_original_size
from ipmt_fast.train.metrics import FewShotMeter, intersection_and_union

X = 255  # ignored


def test_intersection_and_union_counts_and_ignores_255():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 1, 1, X],
                           [X, X, 0, 0]])
    prediction = torch.tensor([[0, 1, 1, 0],
                               [0, 1, 1, 1],
                               [1, 1, 1, 0]])
    intersection, union, area = intersection_and_union(prediction, target)
    # Valid pixels: 9. Background: target {00,01,10,22,23} (5), predicted {00,03,10,23} (4), both {00,10,23}.
    # Foreground: target {02,03,11,12} (4), predicted {01,02,11,12,22} (5), both {02,11,12}.
    assert intersection.tolist() == [3, 3]
    assert union.tolist() == [5 + 4 - 3, 4 + 5 - 3]
    assert area.tolist() == [5, 4]


def test_meter_averages_class_iou_and_fb_iou():
    meter = FewShotMeter([1, 2, 3])
    ones, zeros = torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    half = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    meter.update(ones, ones, 1)         # class 1: I 10, U 10
    meter.update(half, ones, 1)         # class 1: I 5,  U 10  -> class IoU 15/20
    meter.update(zeros, half, 2)        # class 2: I 0,  U 5   -> 0
    meter.update(half, half, 3)         # class 3: I 5,  U 5   -> 1
    result = meter.result()
    assert result.class_iou == pytest.approx({1: 0.75, 2: 0.0, 3: 1.0})
    assert result.miou == pytest.approx((0.75 + 0 + 1) / 3)
    # Background over all episodes: I = 0 + 0 + 5 + 5 = 10, U = 0 + 5 + 10 + 5 = 20.
    # Foreground: I = 10 + 5 + 0 + 5 = 20, U = 10 + 10 + 5 + 5 = 30.
    assert result.fb_iou == pytest.approx((10 / 20 + 20 / 30) / 2)
    assert result.episodes == 4 and result.class_episodes == {1: 2, 2: 1, 3: 1}
    assert result.summary() == f"mIoU {100 * (1.75 / 3):.2f} FB-IoU {100 * (0.5 + 2 / 3) / 2:.2f}"


def test_meter_ignores_255_and_averages_only_seen_classes():
    meter = FewShotMeter([4, 5])
    target = torch.tensor([[1, X], [0, X]])
    meter.update(torch.tensor([[1, 0], [0, 1]]), target, 4)  # the wrong pixels are all ignored
    with pytest.warns(RuntimeWarning, match="no episode of fold classes \\[5\\]"):
        result = meter.result()
    assert result.miou == pytest.approx(1.0) and result.fb_iou == pytest.approx(1.0)
    assert list(result.class_iou) == [4]
    with pytest.raises(ValueError, match="not one of the fold classes"):
        meter.update(target, target, 7)


def test_prediction_at_original_size_resizes_then_crops():
    logits = torch.zeros(2, 9, 9)
    logits[1, :, :5] = 1.0  # foreground on the left 5 of 9 columns
    logits[0, :, 5:] = 1.0
    # align_corners: column j of the 6-wide square samples source column 8j/5 -> 0, 1.6, 3.2 are
    # foreground, 4.8 (0.2 * fg + 0.8 * bg) and beyond are background.
    wide = prediction_at_original_size(logits, (3, 6))
    assert wide.shape == (3, 6) and wide.tolist() == [[1, 1, 1, 0, 0, 0]] * 3
    tall = prediction_at_original_size(logits, (6, 3))
    assert tall.shape == (6, 3) and (tall == 1).all()


class LabelOracle(torch.nn.Module):
    """Test double for the evaluation loop: predicts the query label it is given (or background)."""

    def __init__(self, predict_foreground=True):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.predict_foreground = predict_foreground

    def forward(self, x, s_x, s_y, y):
        foreground = (y == 1).float() if self.predict_foreground else torch.zeros_like(y, dtype=torch.float)
        return self.scale * torch.stack([1 - foreground, foreground], 1)


def test_evaluate_loop_scores_episodes_per_class():
    classes = synthetic_fold_classes(0)[1]
    data = SyntheticEpisodes(classes, 1, ValTransform(33), size=33, length=9, seed=2, mode="val")
    exact = evaluate(LabelOracle(), data, classes, torch.device("cpu"), batch_size=4, original_resolution=False)
    assert exact.miou == pytest.approx(1.0) and exact.fb_iou == pytest.approx(1.0) and exact.episodes == 9
    assert sum(exact.class_episodes.values()) == 9
    empty = evaluate(LabelOracle(False), data, classes, torch.device("cpu"), batch_size=2)
    assert empty.miou == 0.0 and 0.0 < empty.fb_iou < 0.5  # background IoU / 2
    # At the original resolution the oracle's label went through resize and back (on ~30 x 30
    # scenes, with the floor-to-8 misalignment of the published protocol): close, not exact.
    resized = evaluate(LabelOracle(), data, classes, torch.device("cpu"))
    assert 0.5 < resized.miou < 0.95 and resized.episodes == 9
