"""Few-shot episode data: PASCAL-5i / COCO-20i from list files, generated synthetic episodes,
the published transforms (OpenCV) and the data loader.

Modules, each importing only those before it: ``base`` (errors, episode assembly, checks,
collation, samplers, :func:`make_loader`), ``files`` (decoding), ``transforms``, ``synthetic``,
``episodes`` (real datasets and the fold class lists).
"""
from .base import (DataError, EpisodeBatchSampler, EpisodeSource, UnreadableFileError, binarize, check_episodes,
                   collate_episodes, evaluation_batches, make_loader)
from .episodes import MIN_CLASS_PIXELS, ClassIndex, EpisodeDataset, fold_classes
from .files import read_image, read_label, read_list, read_pair
from .synthetic import SYNTHETIC_CLASSES, SyntheticEpisodes, render_scene, synthetic_fold_classes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, ValTransform

__all__ = [
    "ClassIndex", "DataError", "EpisodeBatchSampler", "EpisodeDataset", "EpisodeSource", "IMAGENET_MEAN",
    "IMAGENET_STD", "MIN_CLASS_PIXELS", "SYNTHETIC_CLASSES", "SyntheticEpisodes", "TrainTransform",
    "UnreadableFileError", "ValTransform", "binarize", "check_episodes", "collate_episodes", "evaluation_batches",
    "fold_classes", "make_loader", "read_image", "read_label", "read_list", "read_pair", "render_scene",
    "synthetic_fold_classes",
]
