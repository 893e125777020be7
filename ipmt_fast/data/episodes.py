"""Few-shot episodes: PASCAL-5i and COCO-20i from list files, the shared episode assembly, and
the samplers that split global batches across ranks.

An *episode* is one query image with its label binarised for one class (1 target, 0 other,
255 ignore) and ``S`` support images of the same class, binarised alike. The published rules:

* a class *counts* for an image when it covers at least 4 * 32 * 32 = 4096 label pixels at the
  original resolution; the query list is every image with at least one counting class of the
  fold, and the support images of a class are the images where it counts;
* the query's class is drawn among the fold classes present in its label (at any size, as
  published), the ``S`` supports are distinct list entries of that class, never the query itself.

Every episode is a pure function of ``(seed, mode, epoch, index)``: the data loader may use any
number of workers and ranks and a resumed run sees the same episodes.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..constants import FOREGROUND_LABEL, IGNORE_LABEL

# Published class filter: 4 * 32 * 32 pixels (two 32-stride cells' worth, after Shaban et al.).
MIN_CLASS_PIXELS = 4 * 32 * 32
PASCAL_NUM_CLASSES = 20
COCO_NUM_CLASSES = 80
NUM_FOLDS = 4
COCO_SPLITS = ("interleaved", "blocks")
# Bump when the cached class index's content or meaning changes.
CLASS_INDEX_VERSION = 1
CLASS_INDEX_SUFFIX = ".ipmt-classes.json"
# A training episode whose files cannot be read is replaced by the next query; give up after this
# many consecutive failures (the data root is then most likely wrong, not one file).
MAX_CONSECUTIVE_UNREADABLE = 10
MODE_SEED = {"train": 0, "val": 1}


class DataError(RuntimeError):
    """A problem with the user's data: a missing root or list, an unreadable or mismatched file."""


class UnreadableFileError(DataError):
    """An image or label file that cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path


# --------------------------------------------------------------------------- files
def read_image(path: str) -> np.ndarray:
    """An RGB image as an ``(H, W, 3)`` float32 array with values in 0..255."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise UnreadableFileError(path, "file not found") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports corrupt files as these
        raise UnreadableFileError(path, str(err)) from None


def read_label(path: str) -> np.ndarray:
    """A class-coded label as an ``(H, W)`` integer array. Palette PNGs give their indices (the
    class ids of VOC/COCO masks); other colour modes are converted to grey levels."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                im = im.convert("L")
            return np.asarray(im)
    except FileNotFoundError:
        raise UnreadableFileError(path, "file not found") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableFileError(path, str(err)) from None


def read_pair(image_path: str, label_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read an image and its label and check that their sizes agree."""
    image, label = read_image(image_path), read_label(label_path)
    if image.shape[:2] != label.shape:
        raise DataError(f"image and label sizes differ: {image_path} is {image.shape[1]}x{image.shape[0]}, "
                        f"{label_path} is {label.shape[1]}x{label.shape[0]}")
    return image, label


def read_list(list_path: str) -> List[Tuple[str, str]]:
    """The (image, label) relative paths of a list file: JSON (a list of pairs) or text (one
    ``image label`` pair per line), as the published lists are."""
    if not os.path.isfile(list_path):
        raise DataError(f"list file not found: {list_path}")
    with open(list_path, encoding="utf-8") as f:
        text = f.read()
    if list_path.endswith(".json"):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{list_path} is not valid JSON: {err}") from None
        if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise DataError(f"{list_path} must hold a JSON list of [image, label] pairs")
        return [(str(a), str(b)) for a, b in pairs]
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{list_path}:{number}: expected 'image_path label_path', got {line!r}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"list file is empty: {list_path}")
    return pairs


# --------------------------------------------------------------------------- folds
def fold_classes(dataset: str, split: int, coco_split: str = "interleaved") -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(training classes, test classes) of a fold.

    PASCAL-5i: fold k tests classes ``5k+1 .. 5k+5``. COCO-20i has two published conventions:
    ``interleaved`` (the published ``use_split_coco``) tests ``k+1, k+5, ..., k+77``; ``blocks``
    tests ``20k+1 .. 20k+20``. Synthetic: see :func:`ipmt_fast.data.synthetic.synthetic_fold_classes`.
    """
    if dataset == "synthetic":
        from .synthetic import synthetic_fold_classes
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
    return label_path, {int(v): int(n) for v, n in zip(values, counts) if v not in (0, IGNORE_LABEL)}


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
def binarize(label: np.ndarray, class_id: int) -> np.ndarray:
    """Class-coded label -> 1 where ``class_id``, 255 where ignored, 0 elsewhere (uint8)."""
    out = np.zeros(label.shape, np.uint8)
    out[label == class_id] = FOREGROUND_LABEL
    out[label == IGNORE_LABEL] = IGNORE_LABEL
    return out


class EpisodeSource(torch.utils.data.Dataset, abc.ABC):
    """Base of every episode dataset: seeding and the common assembly of an episode.

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) returns a dict with
    ``image (3, H, W)``, ``label (H, W)``, ``support_images (S, 3, H, W)``,
    ``support_labels (S, H, W)``, ``class_id`` and ``skipped`` (paths of unreadable files that were
    skipped); in ``val`` mode also ``original_label``, the binarised label at original resolution.
    """

    def __init__(self, shot: int, transform, mode: str, seed: int):
        if mode not in MODE_SEED:
            raise ValueError(f"mode must be one of {tuple(MODE_SEED)}, got {mode!r}")
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        self.shot, self.transform, self.mode, self.seed = int(shot), transform, mode, int(seed)

    def episode_rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, MODE_SEED[self.mode], int(epoch), int(index)])

    @abc.abstractmethod
    def episode(self, epoch: int, index: int) -> dict:
        """The episode ``index`` of ``epoch`` (see the class docstring for its keys)."""

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.episode(epoch, index)

    def assemble(self, query, supports, class_id: int, rng: np.random.Generator, skipped=()) -> dict:
        """Binarise for ``class_id`` and transform a query ``(image, label)`` and its supports."""
        query_label = binarize(query[1], class_id)
        image, label = self.transform(np.asarray(query[0], np.float32), query_label, rng)
        shots = [self.transform(np.asarray(img, np.float32), binarize(lab, class_id), rng) for img, lab in supports]
        sample = {
            "image": image, "label": label,
            "support_images": torch.stack([s[0] for s in shots]), "support_labels": torch.stack([s[1] for s in shots]),
            "class_id": int(class_id), "skipped": list(skipped),
        }
        if self.mode == "val":
            sample["original_label"] = torch.from_numpy(query_label.astype(np.int64))
        return sample


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
            return self.assemble(query, supports, class_id, rng, skipped)
        raise DataError(f"{len(skipped)} consecutive episodes had unreadable files (check the data root): "
                        + ", ".join(skipped))


# --------------------------------------------------------------------------- batching
def collate_episodes(samples: Sequence[dict]) -> dict:
    """Stack episode samples into a batch (original-resolution labels stay a list)."""
    batch = {key: torch.stack([s[key] for s in samples])
             for key in ("image", "label", "support_images", "support_labels")}
    batch["class_id"] = torch.tensor([s["class_id"] for s in samples], dtype=torch.int64)
    batch["skipped"] = [path for s in samples for path in s["skipped"]]
    if "original_label" in samples[0]:
        batch["original_label"] = [s["original_label"] for s in samples]
    return batch


class EpisodeBatchSampler(torch.utils.data.Sampler):
    """Batches of episode keys ``(epoch, index)`` for one rank.

    Each epoch is a seeded permutation of the items cut into *global* batches of
    ``global_batch_size`` (the incomplete last one dropped, as published); rank ``r`` of ``W``
    gets the ``r``-th of ``W`` equal slices of every global batch. So W ranks together see exactly
    the batches one process would, and :meth:`set_epoch` with a ``start_batch`` resumes mid-epoch.
    """

    def __init__(self, num_items: int, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} must be a multiple of the {world_size} processes")
        if num_items < global_batch_size:
            raise ValueError(f"the dataset has {num_items} queries, fewer than one batch of {global_batch_size}")
        self.num_items, self.global_batch_size = num_items, global_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = global_batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items) if self.shuffle
                 else np.arange(self.num_items))
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch_size + self.rank * self.per_rank
            yield [(self.epoch, int(i)) for i in order[start:start + self.per_rank]]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def evaluation_batches(num_episodes: int, batch_size: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """This rank's share of episodes ``0 .. num_episodes-1`` (every ``world_size``-th), batched."""
    mine = list(range(rank, num_episodes, world_size))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
