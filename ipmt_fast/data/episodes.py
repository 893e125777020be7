"""PASCAL-5i and COCO-20i episodes from published-style list files, and the fold class lists.

The published rules:

* a class *counts* for an image when it covers at least 4 * 32 * 32 = 4096 label pixels at the
  original resolution; the query list is every image with at least one counting class of the
  fold, and the support images of a class are the images where it counts;
* the query's class is drawn among the fold classes present in its label (at any size, as
  published), the ``S`` supports are distinct list entries of that class, never the query itself.

Episode assembly, seeding, collation and the samplers are shared with the generated data
(:mod:`ipmt_fast.data.base`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..constants import BACKGROUND_LABEL, IGNORE_LABEL
from .base import DataError, EpisodeSource, UnreadableFileError
from .files import read_label, read_list, read_pair
from .synthetic import synthetic_fold_classes

# Published class filter: 4 * 32 * 32 pixels (two 32-stride cells' worth, after Shaban et al.).
MIN_CLASS_PIXELS = 4 * 32 * 32
PASCAL_NUM_CLASSES = 20
COCO_NUM_CLASSES = 80
NUM_FOLDS = 4
COCO_SPLITS = ("interleaved", "blocks")
# Bump when the cached class index's content or meaning changes.
CLASS_INDEX_VERSION = 2
CLASS_INDEX_SUFFIX = ".ipmt-classes.json"
# A training episode whose files cannot be read is replaced by the next query; give up after this
# many consecutive failures (the data root is then most likely wrong, not one file).
MAX_CONSECUTIVE_UNREADABLE = 10


# --------------------------------------------------------------------------- folds
def fold_classes(dataset: str, split: int, coco_split: str = "interleaved") -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(training classes, test classes) of a fold.

    PASCAL-5i: fold k tests classes ``5k+1 .. 5k+5``. COCO-20i has two published conventions:
    ``interleaved`` (the published ``use_split_coco``) tests ``k+1, k+5, ..., k+77``; ``blocks``
    tests ``20k+1 .. 20k+20``. Synthetic: see :func:`ipmt_fast.data.synthetic.synthetic_fold_classes`.
    """
    if dataset == "synthetic":
        return synthetic_fold_classes(split)
    if split not in range(NUM_FOLDS):
        raise ValueError(f"split must be in 0..{NUM_FOLDS - 1}, got {split}")
    if dataset == "pascal":
        total, per_fold = PASCAL_NUM_CLASSES, PASCAL_NUM_CLASSES // NUM_FOLDS
        test = tuple(range(split * per_fold + 1, (split + 1) * per_fold + 1))
    elif dataset == "coco":
        total, per_fold = COCO_NUM_CLASSES, COCO_NUM_CLASSES // NUM_FOLDS
        if coco_split == "interleaved":
            test = tuple(range(split + 1, total + 1, NUM_FOLDS))
        elif coco_split == "blocks":
            test = tuple(range(split * per_fold + 1, (split + 1) * per_fold + 1))
        else:
            raise ValueError(f"coco_split must be one of {COCO_SPLITS}, got {coco_split!r}")
    else:
        raise ValueError(f"dataset must be 'synthetic', 'pascal' or 'coco', got {dataset!r}")
    return tuple(c for c in range(1, total + 1) if c not in test), test


# --------------------------------------------------------------------------- class index
def _class_pixel_counts(label_path: str):
    """(label_path, {class: pixels} excluding background and 255, or the read error message)."""
    try:
        label = read_label(label_path)
    except UnreadableFileError as err:
        return label_path, str(err)
    values, counts = np.unique(label, return_counts=True)
    return label_path, {int(v): int(n) for v, n in zip(values, counts) if v not in (BACKGROUND_LABEL, IGNORE_LABEL)}


@dataclass
class ClassIndex:
    """Per list entry, the pixel count of every class in its label (background and 255 left out).

    Built once per list by reading every label and cached next to the list file as
    ``<list>.ipmt-classes.json``, keyed by :data:`CLASS_INDEX_VERSION`, the list's SHA-256 and the
    data root, so a changed list, root or format rebuilds it.
    """

    items: List[Tuple[str, str]]  # (image path, label path), joined with the data root
    counts: List[Dict[int, int]]
    unreadable: List[str]  # label files that could not be read (left out of items)

    @staticmethod
    def cache_path(list_path: str) -> str:
        return list_path + CLASS_INDEX_SUFFIX

    @classmethod
    def load_or_build(cls, list_path: str, data_root: str, workers: int = 0, cache: bool = True) -> "ClassIndex":
        pairs = read_list(list_path)
        with open(list_path, "rb") as f:
            key = {"version": CLASS_INDEX_VERSION, "list_sha256": hashlib.sha256(f.read()).hexdigest(),
                   "data_root": os.path.abspath(data_root)}
        cache_file = cls.cache_path(list_path)
        if cache and os.path.isfile(cache_file):
            try:
                with open(cache_file, encoding="utf-8") as f:
                    stored = json.load(f)
                if stored.get("key") == key:
                    return cls([tuple(p) for p in stored["items"]],
                               [{int(c): n for c, n in counts.items()} for counts in stored["counts"]],
                               stored["unreadable"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged cache is rebuilt below
        index = cls.build(pairs, data_root, workers)
        if cache:
            index._save(cache_file, key)
        return index

    @classmethod
    def build(cls, pairs: Sequence[Tuple[str, str]], data_root: str, workers: int = 0) -> "ClassIndex":
        items = [(os.path.join(data_root, image), os.path.join(data_root, label)) for image, label in pairs]
        label_paths = [label for _, label in items]
        if workers > 0 and len(label_paths) > workers:
            import multiprocessing
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_class_pixel_counts, label_paths, chunksize=64)
        else:
            results = [_class_pixel_counts(p) for p in label_paths]
        kept_items, counts, unreadable = [], [], []
        for item, (label_path, result) in zip(items, results):
            if isinstance(result, str):
                unreadable.append(label_path)
            else:
                kept_items.append(item)
                counts.append(result)
        if not kept_items:
            raise DataError(f"none of the {len(items)} label files could be read (check the data root); "
                            f"first: {unreadable[0] if unreadable else 'none listed'}")
        if unreadable:
            warnings.warn(f"{len(unreadable)} label file(s) could not be read and are left out, e.g. {unreadable[0]}",
                          RuntimeWarning, stacklevel=2)
        return cls(kept_items, counts, unreadable)

    def _save(self, path: str, key: dict) -> None:
        payload = {"key": key, "items": self.items, "counts": self.counts, "unreadable": self.unreadable}
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f)
            os.replace(tmp, path)
        except OSError as err:  # e.g. a read-only list directory: work without the cache
            warnings.warn(f"cannot write the class index cache {path}: {err}", RuntimeWarning, stacklevel=3)
            if os.path.exists(tmp):
                os.remove(tmp)


# --------------------------------------------------------------------------- episodes
class EpisodeDataset(EpisodeSource):
    """PASCAL-5i / COCO-20i episodes from a data root and a published-style list file.

    Args:
        data_root: folder the list's relative paths start from.
        list_path: the list (``.json`` pairs or ``image label`` text lines).
        classes: the fold classes episodes are drawn from (training or test classes).
        shot: support images per episode.
        transform: a ``TrainTransform`` (train) or ``ValTransform`` (val).
        mode: ``train`` (one epoch = every query once, in the sampler's order) or ``val``
            (``episodes`` episodes cycling through the queries in list order, as published).
        seed: base seed of the episode draws.
        episodes: number of validation episodes (default: one per query).
        min_pixels: the class filter (default 4096).
        index_workers: processes used to build the class index the first time.
    """

    def __init__(self, data_root: str, list_path: str, classes: Sequence[int], shot: int, transform,
                 mode: str = "train", seed: int = 123, episodes: Optional[int] = None,
                 min_pixels: int = MIN_CLASS_PIXELS, index_workers: int = 0, cache_index: bool = True):
        super().__init__(shot=shot, transform=transform, mode=mode, seed=seed)
        if not data_root or not os.path.isdir(data_root):
            raise DataError(f"data root not found: {data_root}")
        self.classes = tuple(int(c) for c in classes)
        index = ClassIndex.load_or_build(list_path, data_root, index_workers, cache_index)
        self.items = index.items
        self.unreadable_labels = index.unreadable
        class_set = set(self.classes)
        self.support_pool: Dict[int, List[int]] = {c: [] for c in self.classes}
        for i, counts in enumerate(index.counts):
            for c, n in counts.items():
                if c in class_set and n >= min_pixels:
                    self.support_pool[c].append(i)
        # How often each (image, label) pair occurs in each pool (lists may repeat entries).
        self._pool_pairs = {c: Counter(self.items[j] for j in pool) for c, pool in self.support_pool.items()}
        self.queries: List[Tuple[int, Tuple[int, ...]]] = []
        self.queries_without_supports = 0
        for i, counts in enumerate(index.counts):
            if not any(counts.get(c, 0) >= min_pixels for c in self.classes):
                continue
            usable = tuple(c for c in sorted(counts) if c in class_set and self._support_count(c, i) >= shot)
            if usable:
                self.queries.append((i, usable))
            else:
                self.queries_without_supports += 1
        if not self.queries:
            raise DataError(f"{list_path} has no image with a class of {self.classes} covering >= {min_pixels} "
                            f"pixels and {shot} other support image(s) of it")
        self.length = len(self.queries) if mode == "train" or episodes is None else int(episodes)

    def _support_count(self, class_id: int, query_item: int) -> int:
        # Published rule: any list entry of the class except the query's own image/label pair.
        return len(self.support_pool[class_id]) - self._pool_pairs[class_id][self.items[query_item]]

    def _draw_supports(self, class_id: int, query_item: int, rng: np.random.Generator) -> List[int]:
        """``shot`` distinct pool entries of ``class_id`` other than the query (the published
        rejection sampling; it ends because the query was kept only with enough candidates)."""
        pool, query_pair, picks = self.support_pool[class_id], self.items[query_item], []
        while len(picks) < self.shot:
            j = pool[int(rng.integers(len(pool)))]
            if self.items[j] != query_pair and j not in picks:
                picks.append(j)
        return picks

    def __len__(self) -> int:
        return self.length

    def episode(self, epoch: int, index: int) -> dict:
        rng = self.episode_rng(epoch, index)
        skipped = []
        for attempt in range(MAX_CONSECUTIVE_UNREADABLE + 1):
            item, usable = self.queries[(index + attempt) % len(self.queries)]
            class_id = usable[int(rng.integers(len(usable)))]
            chosen = self._draw_supports(class_id, item, rng)
            try:
                query = read_pair(*self.items[item])
                supports = [read_pair(*self.items[j]) for j in chosen]
            except UnreadableFileError as err:
                if self.mode != "train":
                    raise
                skipped.append(err.path)
                continue
            files = [path for j in [item] + chosen for path in self.items[j]]
            return self.assemble(query, supports, class_id, rng, skipped, files)
        raise DataError(f"{len(skipped)} consecutive episodes had unreadable files (check the data root): "
                        + ", ".join(skipped))
