"""Procedural few-shot segmentation data: shape/texture classes on cluttered backgrounds.

Every scene is a pure function of a seed and a size: a smooth coloured background with random
clutter blobs, one or two instances of a *target* class and sometimes distractor objects of other
classes, with a class-coded label (0 background, ``k`` for class ``k`` in 1..12, 255 for void
boundaries and padded borders, like PASCAL VOC's). A class is a fixed (shape, texture pattern,
colour pair); instances vary in size, position, rotation, aspect, colour, pattern frequency and
noise. :class:`SyntheticEpisodes` turns scenes into episodes exactly like the real datasets do
(one class per query, ``S`` support scenes of that class, the same transforms), so the whole
training and evaluation pipeline runs without downloading anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import numpy as np

from ..constants import IGNORE_LABEL
from .base import EpisodeSource

SQRT3 = math.sqrt(3.0)


# --------------------------------------------------------------------------- shapes
# Each shape maps object-frame coordinates (u, v), roughly within [-1, 1], to an inside mask.
def _disc(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _triangle(u, v):
    return (v >= -0.5) & (v <= 1.0 - SQRT3 * np.abs(u))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.0


def _star(u, v):
    return np.hypot(u, v) <= 0.6 + 0.4 * np.cos(5.0 * np.arctan2(v, u))


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75 ** 2)


def _hexagon(u, v):
    au, av = np.abs(u), np.abs(v)
    return (av <= SQRT3 / 2) & (SQRT3 * au + av <= SQRT3)


def _ellipse(u, v):
    return u * u + (v / 0.55) ** 2 <= 1.0


def _bar(u, v):
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.4)


def _corner(u, v):  # an L
    return ((u >= -1.0) & (u <= -0.3) & (np.abs(v) <= 1.0)) | ((np.abs(u) <= 1.0) & (v >= 0.3) & (v <= 1.0))


SHAPES: Dict[str, Callable] = {
    "disc": _disc, "square": _square, "triangle": _triangle, "ring": _ring, "cross": _cross,
    "diamond": _diamond, "star": _star, "crescent": _crescent, "hexagon": _hexagon,
    "ellipse": _ellipse, "bar": _bar, "corner": _corner,
}


# --------------------------------------------------------------------------- textures
# Each pattern maps object-frame coordinates and a frequency to a blend weight in [0, 1] between
# the class colour (0) and its accent colour (1).
def _solid(u, v, f):
    return np.zeros_like(u)


def _stripes(u, v, f):
    return (np.sin(math.pi * f * u) > 0).astype(np.float32)


def _checker(u, v, f):
    return (np.sin(math.pi * f * u) * np.sin(math.pi * f * v) > 0).astype(np.float32)


def _dots(u, v, f):
    cell_u, cell_v = (u * f / 2) % 1.0 - 0.5, (v * f / 2) % 1.0 - 0.5
    return (cell_u ** 2 + cell_v ** 2 <= 0.3 ** 2).astype(np.float32)


def _gradient(u, v, f):
    return np.clip((v + 1.0) / 2.0, 0.0, 1.0)


def _concentric(u, v, f):
    return (np.sin(math.pi * f * np.hypot(u, v)) > 0).astype(np.float32)


PATTERNS: Dict[str, Callable] = {
    "solid": _solid, "stripes": _stripes, "checker": _checker, "dots": _dots,
    "gradient": _gradient, "concentric": _concentric,
}


@dataclass(frozen=True)
class SyntheticClass:
    """One procedural class: a shape, a texture pattern and its two colours (RGB 0..255)."""

    name: str
    shape: str
    pattern: str
    colour: Tuple[int, int, int]
    accent: Tuple[int, int, int]
    frequency: float  # pattern periods across the object's diameter


SYNTHETIC_CLASSES: Tuple[SyntheticClass, ...] = (
    SyntheticClass("red disc", "disc", "solid", (200, 40, 40), (200, 40, 40), 1.0),
    SyntheticClass("striped square", "square", "stripes", (40, 60, 200), (235, 235, 235), 4.0),
    SyntheticClass("checkered triangle", "triangle", "checker", (40, 170, 60), (20, 20, 20), 4.0),
    SyntheticClass("yellow ring", "ring", "solid", (230, 210, 40), (230, 210, 40), 1.0),
    SyntheticClass("dotted cross", "cross", "dots", (120, 40, 160), (240, 240, 240), 5.0),
    SyntheticClass("shaded diamond", "diamond", "gradient", (240, 140, 30), (110, 60, 20), 1.0),
    SyntheticClass("cyan star", "star", "solid", (40, 200, 210), (40, 200, 210), 1.0),
    SyntheticClass("striped crescent", "crescent", "stripes", (210, 40, 170), (240, 220, 60), 5.0),
    SyntheticClass("checkered hexagon", "hexagon", "checker", (30, 40, 110), (240, 150, 40), 3.0),
    SyntheticClass("target ellipse", "ellipse", "concentric", (20, 130, 130), (240, 240, 240), 4.0),
    SyntheticClass("dotted bar", "bar", "dots", (120, 75, 40), (240, 225, 190), 6.0),
    SyntheticClass("shaded corner", "corner", "gradient", (130, 130, 130), (240, 120, 170), 1.0),
)
NUM_SYNTHETIC_CLASSES = len(SYNTHETIC_CLASSES)
# Like PASCAL-5i: four folds, fold k holds out a contiguous block of classes for testing.
SYNTHETIC_FOLDS = 4
CLASSES_PER_FOLD = NUM_SYNTHETIC_CLASSES // SYNTHETIC_FOLDS

# Scene statistics (fractions are of the scene's shorter side).
OBJECT_RADIUS = (0.28, 0.4)
SECOND_INSTANCE_SHRINK = 0.75
SECOND_INSTANCE_P = 0.25
DISTRACTOR_COUNT_P = (0.8, 0.2, 0.0)  # probability of 0, 1, 2 distractor objects
CLUTTER_COUNT = (0, 2)
CLUTTER_RADIUS = (0.04, 0.12)
ASPECT_JITTER = (0.85, 1.15)
COLOUR_JITTER = 15.0
PIXEL_NOISE = 6.0
BACKGROUND_NOISE = 25.0
BACKGROUND_NOISE_GRID = 4
VOID_BOUNDARY_P = 0.5
PADDED_BORDER_P = 0.25
PADDED_BORDER_WIDTH = (0.05, 0.15)
# Original (pre-transform) scenes are drawn at this multiple of the requested size per side, so
# the scale/crop and resize/pad transforms have real work to do.
SCENE_SIZE_RANGE = (0.8, 1.25)


def _object_frame(height, width, cy, cx, radius, angle, aspect):
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = (ys - cy) / radius, (xs - cx) / radius
    cos, sin = math.cos(angle), math.sin(angle)
    return (cos * dx + sin * dy) * aspect, (-sin * dx + cos * dy) / aspect


def _background(height, width, rng):
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (math.cos(angle) * xs / width + math.sin(angle) * ys / height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = start + (end - start) * t[..., None]
    grid = rng.normal(0.0, BACKGROUND_NOISE, (BACKGROUND_NOISE_GRID, BACKGROUND_NOISE_GRID, 3))
    rows = np.linspace(0, BACKGROUND_NOISE_GRID - 1, height)
    cols = np.linspace(0, BACKGROUND_NOISE_GRID - 1, width)
    # Smooth low-frequency noise: bilinear upsampling of a coarse random grid.
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, BACKGROUND_NOISE_GRID - 1), np.minimum(c0 + 1, BACKGROUND_NOISE_GRID - 1)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    smooth = ((1 - fr) * ((1 - fc) * grid[r0][:, c0] + fc * grid[r0][:, c1])
              + fr * ((1 - fc) * grid[r1][:, c0] + fc * grid[r1][:, c1]))
    return image + smooth


def _draw_clutter(image, rng):
    height, width = image.shape[:2]
    short = min(height, width)
    for _ in range(int(rng.integers(CLUTTER_COUNT[0], CLUTTER_COUNT[1] + 1))):
        radius = rng.uniform(*CLUTTER_RADIUS) * short
        u, v = _object_frame(height, width, rng.uniform(0, height), rng.uniform(0, width), radius,
                             rng.uniform(0, math.pi), rng.uniform(0.5, 1.0))
        image[u * u + v * v <= 1.0] = rng.uniform(0, 255, 3)


def _draw_object(image, label, class_id, radius, rng):
    cls = SYNTHETIC_CLASSES[class_id - 1]
    height, width = label.shape
    margin = 0.6 * radius
    cy = rng.uniform(margin, max(margin, height - margin))
    cx = rng.uniform(margin, max(margin, width - margin))
    u, v = _object_frame(height, width, cy, cx, radius, rng.uniform(0, 2 * math.pi), rng.uniform(*ASPECT_JITTER))
    inside = SHAPES[cls.shape](u, v)
    frequency = cls.frequency * rng.uniform(0.85, 1.15)
    blend = PATTERNS[cls.pattern](u + rng.uniform(-1, 1), v + rng.uniform(-1, 1), frequency)[..., None]
    colour = np.asarray(cls.colour, np.float32) + rng.normal(0, COLOUR_JITTER, 3)
    accent = np.asarray(cls.accent, np.float32) + rng.normal(0, COLOUR_JITTER, 3)
    texture = colour * (1 - blend) + accent * blend
    image[inside] = texture[inside]
    label[inside] = class_id


def _void_boundaries(label):
    """Mark object pixels that touch a differently labelled 4-neighbour as void (255)."""
    edge = np.zeros(label.shape, bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    label[edge & (label > 0)] = IGNORE_LABEL


def render_scene(target_class: int, height: int, width: int, rng: np.random.Generator,
                 distractor_classes: Sequence[int] = ()) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one scene containing ``target_class`` (1-based into :data:`SYNTHETIC_CLASSES`).

    Returns an ``(H, W, 3)`` uint8 RGB image and an ``(H, W)`` uint8 class-coded label. Distractor
    objects are drawn from ``distractor_classes`` (never the target); targets are drawn last, so
    they are never fully hidden.
    """
    if not 1 <= target_class <= NUM_SYNTHETIC_CLASSES:
        raise ValueError(f"target_class must be in 1..{NUM_SYNTHETIC_CLASSES}, got {target_class}")
    image = _background(height, width, rng)
    _draw_clutter(image, rng)
    label = np.zeros((height, width), np.uint8)
    short = min(height, width)
    others = [c for c in distractor_classes if c != target_class]
    n_distractors = int(rng.choice(len(DISTRACTOR_COUNT_P), p=DISTRACTOR_COUNT_P)) if others else 0
    for _ in range(n_distractors):
        _draw_object(image, label, int(rng.choice(others)), rng.uniform(*OBJECT_RADIUS) * short, rng)
    radius = rng.uniform(*OBJECT_RADIUS) * short
    instances = 2 if rng.random() < SECOND_INSTANCE_P else 1
    for _ in range(instances):
        _draw_object(image, label, target_class, radius * (SECOND_INSTANCE_SHRINK if instances > 1 else 1.0), rng)
    image += rng.normal(0, PIXEL_NOISE, image.shape)
    if rng.random() < VOID_BOUNDARY_P:
        _void_boundaries(label)
    if rng.random() < PADDED_BORDER_P:
        side = int(rng.integers(4))
        band = max(1, int(rng.uniform(*PADDED_BORDER_WIDTH) * (height if side < 2 else width)))
        region = [np.s_[:band, :], np.s_[-band:, :], np.s_[:, :band], np.s_[:, -band:]][side]
        image[region] = 0
        label[region] = IGNORE_LABEL
    return np.clip(image, 0, 255).astype(np.uint8), label


def synthetic_fold_classes(split: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(training classes, test classes) of fold ``split`` (0..3): fold k tests classes
    ``3k+1 .. 3k+3`` and trains on the other nine."""
    if split not in range(SYNTHETIC_FOLDS):
        raise ValueError(f"synthetic split must be in 0..{SYNTHETIC_FOLDS - 1}, got {split}")
    test = tuple(range(split * CLASSES_PER_FOLD + 1, (split + 1) * CLASSES_PER_FOLD + 1))
    return tuple(c for c in range(1, NUM_SYNTHETIC_CLASSES + 1) if c not in test), test


class SyntheticEpisodes(EpisodeSource):
    """Generated episodes: a query scene of one class and ``shot`` support scenes of the same class.

    Args:
        classes: the class ids episodes are drawn from (e.g. a fold's training or test classes).
        shot: support scenes per episode.
        transform: a :class:`~ipmt_fast.data.transforms.TrainTransform` or ``ValTransform``.
        size: nominal scene size; each scene's sides are drawn in ``SCENE_SIZE_RANGE`` times it.
        length: episodes per epoch (training) or in all (evaluation).
        seed: base seed; an episode is a pure function of ``(seed, epoch, index)``.
        mode: ``"train"`` or ``"val"`` (validation also returns the original-resolution label).
    """

    def __init__(self, classes: Sequence[int], shot: int, transform, size: int, length: int, seed: int = 0,
                 mode: str = "train"):
        super().__init__(shot=shot, transform=transform, mode=mode, seed=seed)
        self.classes = tuple(int(c) for c in classes)
        if not self.classes or not all(1 <= c <= NUM_SYNTHETIC_CLASSES for c in self.classes):
            raise ValueError(f"classes must be a non-empty subset of 1..{NUM_SYNTHETIC_CLASSES}, got {classes}")
        self.size, self.length = int(size), int(length)

    def __len__(self) -> int:
        return self.length

    def _scene(self, class_id, rng):
        height, width = (max(1, int(round(self.size * rng.uniform(*SCENE_SIZE_RANGE)))) for _ in range(2))
        return render_scene(class_id, height, width, rng, distractor_classes=range(1, NUM_SYNTHETIC_CLASSES + 1))

    def episode(self, epoch: int, index: int):
        rng = self.episode_rng(epoch, index)
        class_id = self.classes[int(rng.integers(len(self.classes)))]
        query = self._scene(class_id, rng)
        supports = [self._scene(class_id, rng) for _ in range(self.shot)]
        return self.assemble(query, supports, class_id, rng)
