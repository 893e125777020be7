"""Few-shot episode data: PASCAL-5i / COCO-20i from list files, generated synthetic episodes,
and the published transforms."""
from .episodes import (MIN_CLASS_PIXELS, ClassIndex, DataError, EpisodeBatchSampler, EpisodeDataset, EpisodeSource,
                       UnreadableFileError, collate_episodes, evaluation_batches, fold_classes, read_image, read_label,
                       read_list)
from .synthetic import SYNTHETIC_CLASSES, SyntheticEpisodes, render_scene, synthetic_fold_classes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, ValTransform

__all__ = [
    "ClassIndex", "DataError", "EpisodeBatchSampler", "EpisodeDataset", "EpisodeSource", "IMAGENET_MEAN",
    "IMAGENET_STD", "MIN_CLASS_PIXELS", "SYNTHETIC_CLASSES", "SyntheticEpisodes", "TrainTransform",
    "UnreadableFileError", "ValTransform", "collate_episodes", "evaluation_batches", "fold_classes", "read_image",
    "read_label", "read_list", "render_scene", "synthetic_fold_classes",
]
