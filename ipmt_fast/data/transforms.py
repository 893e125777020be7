"""Image/label transforms of the published training and validation pipelines, on numpy arrays.

Images are ``(H, W, 3)`` float32 RGB arrays with values in 0..255, labels ``(H, W)`` integer
arrays (0 background, 1 target, 255 ignore). Every random choice comes from the
``numpy.random.Generator`` passed in, so an episode is reproducible from its seed alone whatever
process or worker builds it.

Geometry follows OpenCV's conventions, which the published pipeline used: bilinear resizing with
half-pixel centres and no anti-aliasing, nearest-neighbour resizing that floors ``dst * in/out``,
rotation about ``(w/2, h/2)`` in pixel-index coordinates, and OpenCV's fixed 5-tap Gaussian
kernel for a 5x5 blur with automatic sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

IGNORE_LABEL = 255
FOREGROUND = 1
# ImageNet statistics on the 0..255 scale (the published normalisation).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The 5-tap kernel OpenCV uses for GaussianBlur((5, 5), sigma=0) (its built-in small-kernel table).
GAUSSIAN_KERNEL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16.0
# The published crop re-draws a random window (at most this many times after the first draw)
# while it keeps less than this fraction of the label's foreground pixels.
CROP_MAX_REDRAWS = 31
CROP_MIN_FOREGROUND_KEPT = 0.85
# Validation sizes are floored to multiples of the network's output stride.
SIZE_MULTIPLE = 8


# --------------------------------------------------------------------------- resampling
def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of OpenCV-style bilinear resizing along one axis."""
    pos = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    pos = np.clip(pos, 0.0, in_size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (pos - lo).astype(np.float32)
    return lo, hi, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an ``(H, W[, C])`` float array (half-pixel centres, edge clamp)."""
    image = image.astype(np.float32, copy=False)
    if image.shape[:2] == (height, width):
        return image.copy()
    lo, hi, frac = _linear_taps(image.shape[0], height)
    shape = (-1,) + (1,) * (image.ndim - 1)
    rows = image[lo] * (1 - frac).reshape(shape) + image[hi] * frac.reshape(shape)
    lo, hi, frac = _linear_taps(image.shape[1], width)
    shape = (1, -1) + (1,) * (image.ndim - 2)
    return rows[:, lo] * (1 - frac).reshape(shape) + rows[:, hi] * frac.reshape(shape)


def resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label (OpenCV's rule: source index ``floor(dst * in / out)``)."""
    rows = np.minimum((np.arange(height) * (label.shape[0] / height)).astype(np.int64), label.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (label.shape[1] / width)).astype(np.int64), label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


def _rotation_source_coords(height: int, width: int, angle_degrees: float):
    """Source (x, y) of every destination pixel for a rotation about (w/2, h/2) by ``angle``
    degrees counter-clockwise (OpenCV's ``getRotationMatrix2D`` + ``warpAffine``)."""
    theta = math.radians(angle_degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = width / 2.0, height / 2.0
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = xs - cx, ys - cy
    # Inverse of [[cos, sin], [-sin, cos]] is its transpose.
    return cos * dx - sin * dy + cx, sin * dx + cos * dy + cy


def rotate(image: np.ndarray, label: np.ndarray, angle_degrees: float, image_fill: Sequence[float],
           label_fill: int = IGNORE_LABEL) -> Tuple[np.ndarray, np.ndarray]:
    """Rotate image (bilinear) and label (nearest) about the centre; uncovered pixels get the fills."""
    h, w = label.shape
    sx, sy = _rotation_source_coords(h, w, angle_degrees)
    fill = np.asarray(image_fill, dtype=np.float32)
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0).astype(np.float32)[..., None], (sy - y0).astype(np.float32)[..., None]
    out = np.zeros((h, w, image.shape[2]), dtype=np.float32)
    for oy, ox, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + ox, y0 + oy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        sample = np.where(inside[..., None], image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], fill)
        out += weight * sample
    xn, yn = np.rint(sx).astype(np.int64), np.rint(sy).astype(np.int64)
    inside = (xn >= 0) & (xn < w) & (yn >= 0) & (yn < h)
    rotated_label = np.where(inside, label[np.clip(yn, 0, h - 1), np.clip(xn, 0, w - 1)], label_fill)
    return out, rotated_label.astype(label.dtype)


def gaussian_blur5(image: np.ndarray) -> np.ndarray:
    """Separable 5x5 Gaussian blur with OpenCV's default kernel and reflect-101 borders."""
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    rows = sum(k * padded[i:i + h] for i, k in enumerate(GAUSSIAN_KERNEL_5))
    return sum(k * rows[:, i:i + w] for i, k in enumerate(GAUSSIAN_KERNEL_5)).astype(np.float32)


def to_tensors(image: np.ndarray, label: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``(H, W, 3)`` 0..255 image -> normalised ``(3, H, W)`` float32 tensor; label -> int64 tensor."""
    image = (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), \
        torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


# --------------------------------------------------------------------------- training
@dataclass
class TrainTransform:
    """The published training augmentation, in order: random scale, random rotation (p 0.5,
    image padded with the mean, label with 255), 5x5 Gaussian blur (p 0.5), horizontal flip
    (p 0.5), random crop to ``size`` (padding likewise, re-drawn while it loses too much
    foreground), then ImageNet normalisation."""

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
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {self.scale}")
        if self.rotate[0] > self.rotate[1]:
            raise ValueError(f"rotate must be (min, max) with min <= max, got {self.rotate}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        scale = rng.uniform(*self.scale)
        h, w = label.shape
        new_h, new_w = max(1, int(np.rint(h * scale))), max(1, int(np.rint(w * scale)))
        image, label = resize_bilinear(image, new_h, new_w), resize_nearest(label, new_h, new_w)
        if rng.random() < self.rotate_p:
            image, label = rotate(image, label, rng.uniform(*self.rotate), self.mean, self.ignore_label)
        if rng.random() < self.blur_p:
            image = gaussian_blur5(image)
        if rng.random() < self.flip_p:
            image, label = image[:, ::-1], label[:, ::-1]
        image, label = self.crop(image, label, rng)
        return to_tensors(image, label, self.mean, self.std)

    def crop(self, image, label, rng):
        crop_h, crop_w = self.size
        h, w = label.shape
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            padded = np.empty((h + pad_h, w + pad_w, 3), np.float32)
            padded[:] = np.asarray(self.mean, np.float32)
            padded[top:top + h, left:left + w] = image
            padded_label = np.full((h + pad_h, w + pad_w), self.ignore_label, label.dtype)
            padded_label[top:top + h, left:left + w] = label
            image, label = padded, padded_label
            h, w = label.shape
        foreground = int(np.count_nonzero(label == FOREGROUND))
        for _ in range(1 + CROP_MAX_REDRAWS):
            top, left = int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1))
            window = label[top:top + crop_h, left:left + crop_w]
            if np.count_nonzero(window == FOREGROUND) >= CROP_MIN_FOREGROUND_KEPT * foreground:
                break
        return image[top:top + crop_h, left:left + crop_w], window


# --------------------------------------------------------------------------- validation
def validation_size(height: int, width: int, size: int, only_shrink: bool = False) -> Tuple[int, int]:
    """The content size of the published validation resize: longer side -> ``size``, the other
    scaled alike, both floored to multiples of 8. With ``only_shrink`` (the published
    ``test_Resize``) images no larger than ``size`` keep their size."""
    if only_shrink and max(height, width) <= size:
        return height, width
    if height >= width:
        new_h, new_w = size, int(width * (size / height))
    else:
        new_h, new_w = int(height * (size / width)), size
    # The published code would produce an empty side for very elongated images; keep one stride.
    return (max(SIZE_MULTIPLE, new_h // SIZE_MULTIPLE * SIZE_MULTIPLE),
            max(SIZE_MULTIPLE, new_w // SIZE_MULTIPLE * SIZE_MULTIPLE))


@dataclass
class ValTransform:
    """The published validation transform: resize (see :func:`validation_size`), zero-pad the
    image to ``size x size`` at the bottom/right, pad the label with 255, normalise.

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
        h, w = image.shape[:2]
        new_h, new_w = validation_size(h, w, self.size, self.only_shrink)
        canvas = np.zeros((self.size, self.size, 3), np.float32)
        canvas[:new_h, :new_w] = resize_bilinear(image, new_h, new_w)
        padded_label = np.full((self.size, self.size), self.ignore_label, np.int64)
        if label is None:
            padded_label[:new_h, :new_w] = 0
        else:
            padded_label[:new_h, :new_w] = resize_nearest(label, new_h, new_w)
        return to_tensors(canvas, padded_label, self.mean, self.std)
