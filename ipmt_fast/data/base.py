"""What every episode source shares: errors, seeding and assembly of an episode, the checks on
what reaches the model, collation, the batch samplers and the data-loader factory.

An *episode* is one query image with its label binarised for one class (1 target, 0 other,
255 ignore) and ``S`` support images of the same class, binarised alike. Every episode is a pure
function of ``(seed, mode, epoch, index)``: the data loader may use any number of workers and
ranks and a resumed run sees the same episodes.

The model does not inspect label values or image finiteness itself (that would read device
values on the host, a synchronisation per step), so :func:`collate_episodes` checks them here,
on the host, while the batch is still in the loader process.
"""
from __future__ import annotations

import abc
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from ..constants import FOREGROUND_LABEL, IGNORE_LABEL, VALID_LABELS

MODE_SEED = {"train": 0, "val": 1}
# The tensors of an episode that reach the model, stacked by collate_episodes.
MODEL_INPUT_KEYS = ("image", "label", "support_images", "support_labels")
LABEL_KEYS = ("label", "support_labels")
IMAGE_KEYS = ("image", "support_images")
# Batches each loader process prepares ahead (torch's default, named here: a 473 px 1-shot
# batch of 4 episodes is ~36 MB of shared memory per batch held).
PREFETCH_BATCHES = 2
# How many offending values an error message lists.
MAX_VALUES_REPORTED = 8


class DataError(RuntimeError):
    """A problem with the user's data: a missing root or list, an unreadable or mismatched file,
    a label value or image pixel the model cannot take."""


class UnreadableFileError(DataError):
    """An image or label file that cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path


def binarize(label: np.ndarray, class_id: int) -> np.ndarray:
    """Class-coded uint8 label -> 1 where ``class_id``, 255 where ignored, 0 elsewhere (uint8)."""
    if label.dtype != np.uint8:
        raise ValueError(f"label must be a uint8 array of class ids, got dtype {label.dtype}")
    table = np.zeros(256, np.uint8)
    table[class_id] = FOREGROUND_LABEL
    table[IGNORE_LABEL] = IGNORE_LABEL
    return cv2.LUT(label, table)


class EpisodeSource(torch.utils.data.Dataset, abc.ABC):
    """Base of every episode dataset: seeding and the common assembly of an episode.

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) returns a dict with
    ``image (3, H, W)``, ``label (H, W)``, ``support_images (S, 3, H, W)``,
    ``support_labels (S, H, W)``, ``class_id``, ``skipped`` (paths of unreadable files that were
    skipped), ``episode`` (its ``(epoch, index)``) and ``files`` (the query's then the supports'
    image and label paths; empty for generated data); in ``val`` mode also ``original_label``,
    the binarised label at original resolution.

    Args:
        shot: support images per episode.
        transform: called as ``transform(image, label, rng)`` on a uint8 ``(H, W, 3)`` RGB image
            and its binarised uint8 label; returns ``(image (3, H, W), label (H, W))`` tensors.
        mode: ``train`` or ``val``.
        seed: base seed of the episode draws.
    """

    def __init__(self, shot: int, transform, mode: str, seed: int):
        if mode not in MODE_SEED:
            raise ValueError(f"mode must be one of {tuple(MODE_SEED)}, got {mode!r}")
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        self.shot, self.transform, self.mode, self.seed = int(shot), transform, mode, int(seed)

    def episode_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The generator of every random draw of episode ``index`` of ``epoch``."""
        return np.random.default_rng([self.seed, MODE_SEED[self.mode], int(epoch), int(index)])

    @abc.abstractmethod
    def episode(self, epoch: int, index: int) -> dict:
        """The episode ``index`` of ``epoch`` (see the class docstring for its keys)."""

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.episode(epoch, index)
        sample["episode"] = (int(epoch), int(index))
        return sample

    def assemble(self, query, supports, class_id: int, rng: np.random.Generator, skipped=(), files=()) -> dict:
        """Binarise for ``class_id`` and transform a query ``(image, label)`` and its supports,
        in the published order (query first, then each support)."""
        query_label = binarize(query[1], class_id)
        image, label = self.transform(query[0], query_label, rng)
        shots = [self.transform(img, binarize(lab, class_id), rng) for img, lab in supports]
        sample = {
            "image": image, "label": label,
            "support_images": torch.stack([s[0] for s in shots]), "support_labels": torch.stack([s[1] for s in shots]),
            "class_id": int(class_id), "skipped": list(skipped), "files": tuple(files),
        }
        if self.mode == "val":
            sample["original_label"] = torch.from_numpy(query_label).long()
        return sample


# --------------------------------------------------------------------------- checks and batching
# Labels are checked in uint8 arithmetic, where adding LABEL_SHIFT wraps IGNORE_LABEL (255) round
# to 0: the valid labels become the run 0 .. len(VALID_LABELS) - 1, so one max() checks them all
# (measured on one core, four 473x473 labels: 0.6 ms, against 2.7 ms comparing with each value).
LABEL_SHIFT = 256 - IGNORE_LABEL
assert sorted((v + LABEL_SHIFT) % 256 for v in VALID_LABELS) == list(range(len(VALID_LABELS)))


def _labels_valid(labels: torch.Tensor) -> bool:
    low, high = torch.aminmax(labels)
    if low < 0 or high > 255:
        return False
    return int((labels.to(torch.uint8) + LABEL_SHIFT).max()) < len(VALID_LABELS)


def _describe(sample: dict) -> str:
    where = f"episode {sample.get('episode', '?')} (class {sample.get('class_id', '?')})"
    files = sample.get("files") or ()
    return where + (f", files {', '.join(files)}" if files else "")


def check_episodes(batch: dict, samples: Sequence[dict]) -> None:
    """Raise :class:`DataError` unless every label of ``batch`` holds only values in
    ``VALID_LABELS`` and every image is finite; the message names the episode, its files and the
    bad values. ``batch`` holds ``samples`` stacked."""
    for key in LABEL_KEYS:
        if batch[key].is_floating_point() or batch[key].is_complex():
            raise DataError(f"{key} must hold integer labels, got {batch[key].dtype} ({_describe(samples[0])})")
    # NaN and infinities propagate through a sum: one reduction per batch finds them.
    if all(_labels_valid(batch[key]) for key in LABEL_KEYS) and \
            all(torch.isfinite(batch[key].sum()) for key in IMAGE_KEYS):
        return
    for i, sample in enumerate(samples):  # the slow scan: which episode, which values
        for key in LABEL_KEYS:
            labels = batch[key][i]
            bad = torch.ones_like(labels, dtype=torch.bool)
            for value in VALID_LABELS:
                bad &= labels != value
            if bad.any():
                values = labels[bad].unique().tolist()
                raise DataError(f"{_describe(sample)}: {key} holds {values[:MAX_VALUES_REPORTED]}"
                                f"{' ...' if len(values) > MAX_VALUES_REPORTED else ''}; labels must be in "
                                f"{VALID_LABELS} (0 background, 1 target, 255 ignore)")
        for key in IMAGE_KEYS:
            values = batch[key][i][~torch.isfinite(batch[key][i])]
            if values.numel():
                raise DataError(f"{_describe(sample)}: {key} holds {int(values.isnan().sum())} NaN and "
                                f"{int(values.isinf().sum())} infinite values; images must be finite")
    # Only finite values whose sum overflowed: nothing to report.


def collate_episodes(samples: Sequence[dict]) -> dict:
    """Stack episode samples into a batch (original-resolution labels stay a list), after
    :func:`check_episodes`."""
    # torch's default_collate stacks straight into shared memory inside a loader process, which
    # saves a copy of the whole batch on its way to the training process.
    batch = {key: torch.utils.data.default_collate([s[key] for s in samples]) for key in MODEL_INPUT_KEYS}
    check_episodes(batch, samples)
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
        """Make the next iteration yield ``epoch``'s batches from ``start_batch`` on."""
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


# --------------------------------------------------------------------------- loading
def init_loader_process(worker_id: int) -> None:
    """Loader-process setup: one OpenCV thread. Each process already owns a core's worth of
    work (torch sets its own threads to 1 there); OpenCV's thread pool would only oversubscribe."""
    cv2.setNumThreads(1)


def make_loader(dataset: torch.utils.data.Dataset, batches: Union[torch.utils.data.Sampler, Sequence[Sequence]],
                device: Union[str, torch.device], workers: int = 0,
                generator: Optional[torch.Generator] = None) -> torch.utils.data.DataLoader:
    """The data loader of an episode source: ``batches`` (a batch sampler or lists of keys)
    collated by :func:`collate_episodes`, decoded and transformed in ``workers`` processes
    (0: in this process) that persist across epochs and prefetch, into pinned memory when
    ``device`` is CUDA. ``generator`` seeds the loader's own draws (worker base seeds)."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    parallel = workers > 0
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_episodes, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=parallel,
        prefetch_factor=PREFETCH_BATCHES if parallel else None,
        worker_init_fn=init_loader_process if parallel else None, generator=generator)
