"""The published training and validation transforms, made of the same OpenCV calls in the same order.

Inputs are a uint8 ``(H, W, 3)`` RGB image and a uint8 ``(H, W)`` label (0 background, 1 target,
255 ignore); outputs are an ImageNet-normalised float32 ``(3, H, W)`` tensor and an int64
``(H, W)`` label tensor. Every random choice comes from the ``numpy.random.Generator`` passed in,
in the published order of draws, so an episode is reproducible from its seed alone whatever
process or worker builds it.

Faithfulness: the published loader turns every image into float32 right after decoding and
resamples the float32 image (OpenCV resamples uint8 images with fixed-point weights and rounds
after every step), so images become float32 on entry here too; they travel as uint8 until then.
Labels stay uint8 (as published) until the final int64 tensor. The pixels are OpenCV's own, so
they depend on its version: ``setup.py`` asks for OpenCV 4, which the published pipeline used
(OpenCV 5's ``warpAffine`` samples differently, see NOTES.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np
import torch

from ..constants import BACKGROUND_LABEL, FOREGROUND_LABEL, IGNORE_LABEL, OUTPUT_STRIDE

# ImageNet statistics on the 0..255 scale (the published normalisation).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The published blur: GaussianBlur with a 5x5 kernel and sigma derived from the size (0).
BLUR_KERNEL_SIZE = 5
# The published crop re-draws a random window (at most this many times after the first draw)
# while it keeps less than this fraction of the label's foreground pixels.
CROP_MAX_REDRAWS = 31
CROP_MIN_FOREGROUND_KEPT = 0.85
# cv2.flip's code for a horizontal flip.
FLIP_HORIZONTAL = 1


def _check_inputs(image: np.ndarray, label: Optional[np.ndarray]) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) array, got shape {image.shape}")
    if label is not None:
        if label.dtype != np.uint8:
            raise ValueError(f"label must be a uint8 array (0, 1, 255), got dtype {label.dtype}")
        if label.shape != image.shape[:2]:
            raise ValueError(f"label shape {label.shape} differs from the image's {image.shape[:2]}")


def to_tensors(image: np.ndarray, label: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``(H, W, 3)`` float32 image -> normalised ``(3, H, W)`` float32 tensor; label -> int64 tensor.

    The values are those of the published ``ToTensor`` + ``Normalize`` (per channel, subtract the
    mean, then divide by the standard deviation, in float32); views (crop windows) are accepted.
    """
    planes = np.empty((3,) + image.shape[:2], np.float32)
    for channel in range(3):
        # Straight into CHW planes, one strided read per channel: 1.5x faster here than a
        # transposing copy followed by the arithmetic.
        np.subtract(image[..., channel], np.float32(mean[channel]), out=planes[channel])
        np.divide(planes[channel], np.float32(std[channel]), out=planes[channel])
    return torch.from_numpy(planes), torch.from_numpy(label).long()


# --------------------------------------------------------------------------- training
@dataclass
class TrainTransform:
    """The published training augmentation, in order: random scale (``cv2.resize`` by the factor
    itself, bilinear image, nearest label), random rotation (p 0.5; bilinear image padded with
    the mean, nearest label padded with 255), 5x5 Gaussian blur (p 0.5), horizontal flip (p 0.5),
    random crop to ``size`` (padding likewise, re-drawn while it loses too much foreground), then
    ImageNet normalisation."""

    size: Tuple[int, int]
    scale: Tuple[float, float] = (0.9, 1.1)
    rotate: Tuple[float, float] = (-10.0, 10.0)
    rotate_p: float = 0.5
    blur_p: float = 0.5
    flip_p: float = 0.5
    ignore_label: int = IGNORE_LABEL
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive sides, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {self.scale}")
        if self.rotate[0] > self.rotate[1]:
            raise ValueError(f"rotate must be (min, max) with min <= max, got {self.rotate}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        _check_inputs(image, label)
        image = np.asarray(image, np.float32)
        # Resampled by the factor itself (fx, fy), as published: OpenCV then samples source
        # positions with the factor, not with the ratio of the rounded output size.
        factor = rng.uniform(*self.scale)
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        if rng.random() < self.rotate_p:
            image, label = self.rotation(image, label, rng.uniform(*self.rotate))
        if rng.random() < self.blur_p:
            image = cv2.GaussianBlur(image, (BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE), 0)
        if rng.random() < self.flip_p:
            image, label = cv2.flip(image, FLIP_HORIZONTAL), cv2.flip(label, FLIP_HORIZONTAL)
        image, label = self.crop(image, label, rng)
        return to_tensors(image, label, self.mean, self.std)

    def rotation(self, image: np.ndarray, label: np.ndarray, angle: float):
        """Rotate by ``angle`` degrees counter-clockwise about ``(w/2, h/2)``, keeping the size."""
        h, w = label.shape
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
        image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=self.mean)
        label = cv2.warpAffine(label, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=self.ignore_label)
        return image, label

    def crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """Pad to at least ``size`` (centred; mean / 255), then a random ``size`` window, re-drawn
        up to CROP_MAX_REDRAWS times while it keeps under 85% of the foreground pixels. Returns views."""
        crop_h, crop_w = self.size
        h, w = label.shape
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            borders = (top, pad_h - top, left, pad_w - left)
            image = cv2.copyMakeBorder(image, *borders, cv2.BORDER_CONSTANT, value=self.mean)
            label = cv2.copyMakeBorder(label, *borders, cv2.BORDER_CONSTANT, value=self.ignore_label)
            h, w = label.shape
        foreground = label == FOREGROUND_LABEL
        total = int(np.count_nonzero(foreground))
        for _ in range(1 + CROP_MAX_REDRAWS):
            top, left = int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1))
            if np.count_nonzero(foreground[top:top + crop_h, left:left + crop_w]) >= CROP_MIN_FOREGROUND_KEPT * total:
                break
        return image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]


# --------------------------------------------------------------------------- validation
def validation_size(height: int, width: int, size: int, only_shrink: bool = False) -> Tuple[int, int]:
    """The content size of the published validation resize: longer side -> ``size``, the other
    scaled alike, both floored to multiples of the output stride (8). With ``only_shrink`` (the
    published ``test_Resize``) images no larger than ``size`` keep their size."""
    if only_shrink and max(height, width) <= size:
        return height, width
    if height >= width:
        new_h, new_w = size, int(width * (size / height))
    else:
        new_h, new_w = int(height * (size / width)), size
    # The published code would produce an empty side for very elongated images; keep one stride.
    return (max(OUTPUT_STRIDE, new_h // OUTPUT_STRIDE * OUTPUT_STRIDE),
            max(OUTPUT_STRIDE, new_w // OUTPUT_STRIDE * OUTPUT_STRIDE))


@dataclass
class ValTransform:
    """The published validation transform: resize (see :func:`validation_size`; bilinear image,
    nearest label), zero-pad the image to ``size x size`` at the bottom/right, pad the label with
    255, normalise.

    Called without a label (prediction), the returned label is 0 on the image content and 255 on
    the padding, which is all the model reads of a query label at inference.
    """

    size: int
    only_shrink: bool = False
    ignore_label: int = IGNORE_LABEL
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray] = None, rng=None):
        # ``rng`` is accepted (and unused) so both transforms share one call signature.
        _check_inputs(image, label)
        h, w = image.shape[:2]
        new_h, new_w = validation_size(h, w, self.size, self.only_shrink)
        canvas = np.zeros((self.size, self.size, 3), np.float32)
        canvas[:new_h, :new_w] = cv2.resize(np.asarray(image, np.float32), (new_w, new_h),
                                            interpolation=cv2.INTER_LINEAR)
        padded_label = np.full((self.size, self.size), self.ignore_label, np.uint8)
        # The published code resizes a float32 copy of the label; nearest-neighbour picks the
        # same source pixels for uint8 (tests/test_transforms.py checks every size pair).
        padded_label[:new_h, :new_w] = BACKGROUND_LABEL if label is None else cv2.resize(label, (new_w, new_h),
                                                                          interpolation=cv2.INTER_NEAREST)
        return to_tensors(canvas, padded_label, self.mean, self.std)
