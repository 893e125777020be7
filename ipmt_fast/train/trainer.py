"""The published training recipe, with exact resume and ``torchrun`` data parallelism.

Optimisers (as the published ``train.py``):

* SGD (momentum 0.9, weight decay 1e-4) over every trainable parameter outside the transformer,
  one group at ``base_lr`` 0.0025 with poly decay ``(1 - it/max_it) ** 0.9`` evaluated at the
  1-based iteration ``it`` over all iterations, multiplied by ``scale_lr`` = 15 (the published
  ``poly_learning_rate`` scales every group past ``index_split=-1``, i.e. all of them);
* AdamW at a constant 1e-4 over the transformer: weight decay 1e-2 on parameters whose name has
  no ``bias``, 0 on biases.

Loss = main + ``aux_weight`` * aux (the model's weighted-dice and duplex losses).

Reproducibility: every episode is a pure function of ``(seed, epoch, index)``; the global RNGs are
re-seeded at each epoch start (``seed + epoch``, as published) and checkpoints carry the RNG
states of every rank, both optimisers, the AMP scaler and the sampler position, so a stopped and
resumed run is bit-identical on the CPU to an uninterrupted one. Evaluation runs under a forked
RNG state so it never changes training.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
import warnings
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import torch

from ..data import (EpisodeBatchSampler, EpisodeDataset, SyntheticEpisodes, TrainTransform, ValTransform,
                    collate_episodes, fold_classes, make_loader)
from ..model import IPMT, CheckpointError, load_published_checkpoint, read_checkpoint
from ..tuning import TuningResult, tune_backends
from .amp import autocast
from .config import TrainConfig, default_list
from .distributed import DistContext, all_gather_objects, all_reduce_mean, barrier, init_distributed
from .evaluate import episode_inputs, evaluate
from .graphs import GraphedStep, check_training_support, configure_optimizers_for_graphs
from .metrics import EvalResult

CHECKPOINT_FORMAT = "ipmt-fast-checkpoint"
CHECKPOINT_VERSION = 1
# Ranks draw different dropout masks: rank r seeds its RNGs with seed + epoch + r * this prime.
RANK_SEED_STRIDE = 1_000_003
# Published warm-up: lr ramps linearly from this fraction of the base lr over the first epoch.
WARMUP_START_RATIO = 0.001
TRANSFORMER_PREFIX = "transformer."
# Entries of our training checkpoints that resuming reads, and that evaluating one reads.
RESUME_KEYS = ("arch", "state_dict", "optimizer", "transformer_optimizer", "scaler", "iteration",
               "total_iterations", "sampler", "rng", "best_miou", "history", "skipped_files")
EVAL_KEYS = ("arch", "config", "state_dict")
TRAIN_LOG_FIELDS = ("iteration", "epoch", "lr", "transformer_lr", "loss", "main_loss", "aux_loss", "seconds")
VAL_LOG_FIELDS = ("iteration", "epoch", "miou", "fb_iou", "episodes")


# --------------------------------------------------------------------------- builders
def model_arch(cfg: TrainConfig) -> Dict[str, int]:
    return {"layers": cfg.layers, "shot": cfg.shot, "reduce_dim": cfg.reduce_dim, "num_layers": cfg.num_layers}


def build_model(cfg: TrainConfig) -> IPMT:
    """The IPMT of ``cfg``, with ``cfg.weight`` (published or our checkpoint) loaded if given. Its
    device-side value checks are off: the data layer checks every batch on the host
    (:func:`ipmt_fast.data.collate_episodes`), so the step reads nothing back from the device."""
    model = IPMT(backend=cfg.backend, backbone_weights=cfg.backbone_weights, recompute_ffn=cfg.recompute_ffn,
                 check_values=False, channels_last=cfg.channels_last, **model_arch(cfg))
    if cfg.weight:
        load_published_checkpoint(model, cfg.weight)
    return model


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` of ``model`` as one graph (``fullgraph=True``: a graph break is an error,
    not a silent split). The compiled module shares the model's parameters and modes."""
    return torch.compile(model, fullgraph=True)


def build_dataset(cfg: TrainConfig, mode: str):
    """The ``train`` or ``val`` episode source of ``cfg`` (the fold's training or test classes)."""
    train_classes, test_classes = fold_classes(cfg.data, cfg.split, cfg.coco_split)
    classes = train_classes if mode == "train" else test_classes
    if mode == "train":
        transform = TrainTransform(size=(cfg.train_h, cfg.train_w), scale=(cfg.scale_min, cfg.scale_max),
                                   rotate=(cfg.rotate_min, cfg.rotate_max))
    else:
        transform = ValTransform(size=cfg.val_size, only_shrink=cfg.val_only_shrink)
    if cfg.data == "synthetic":
        length = cfg.synthetic_length if mode == "train" else cfg.val_episodes
        size = cfg.train_h if mode == "train" else cfg.val_size
        return SyntheticEpisodes(classes, cfg.shot, transform, size=size, length=length, seed=cfg.manual_seed,
                                 mode=mode)
    return EpisodeDataset(cfg.data_root, default_list(cfg, mode), classes, cfg.shot, transform, mode=mode,
                          seed=cfg.manual_seed, episodes=cfg.val_episodes if mode == "val" else None,
                          min_pixels=cfg.min_class_pixels, index_workers=cfg.workers)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig, fast: bool = True):
    """(SGD over non-transformer parameters, AdamW over the transformer), as published.

    ``fast``: PyTorch's fused implementations, one multi-tensor kernel per optimiser step instead of
    several ops per parameter (the eager AdamW also reads its step counters on the host); 5x less
    host time than the defaults at IPMT's small shapes on the CPU (NOTES.md). They order their
    arithmetic differently from the defaults: about an ulp of the weights' scale apart
    (tests/test_trainer.py). Else PyTorch's default forms.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    others = [p for n, p in named if not n.startswith(TRANSFORMER_PREFIX)]
    weights = [p for n, p in named if n.startswith(TRANSFORMER_PREFIX) and "bias" not in n]
    biases = [p for n, p in named if n.startswith(TRANSFORMER_PREFIX) and "bias" in n]
    fused = {"fused": True} if fast else {}
    sgd = torch.optim.SGD([{"params": others}], lr=cfg.base_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, **fused)
    adamw = torch.optim.AdamW([{"params": weights, "weight_decay": cfg.transformer_weight_decay},
                               {"params": biases, "weight_decay": 0.0}], lr=cfg.transformer_lr, **fused)
    return sgd, adamw


@torch.no_grad()
def calibrate_frozen_batchnorm(backbone: torch.nn.Module, images: torch.Tensor) -> None:
    """Give a *randomly initialised* frozen backbone the feature scale of a trained one.

    With identity statistics, a random deep-stem ResNet's activations grow block after block
    (layer4 ~10x a trained network's), which makes the published learning rates diverge. Here
    every frozen batch norm takes, in forward order, the per-channel mean and variance of its
    input on ``images`` (affine left at identity), as batch norm in training mode would. Only
    buffers change; the backbone stays frozen. The norms run literally meanwhile (a norm folded
    into its conv is never called, so its hook would not see its input).
    """
    from ..model.backbone import FrozenBatchNorm2d

    def measure(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3), unbiased=False))

    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    folds = [m.fold for m in norms]
    hooks = [m.register_forward_pre_hook(measure) for m in norms]
    try:
        for m in norms:
            m.fold = False
        backbone(images)
    finally:
        for hook in hooks:
            hook.remove()
        for m, fold in zip(norms, folds):
            m.fold = fold


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """``base_lr * (1 - iteration / max_iterations) ** power`` (``iteration`` 1-based)."""
    return base_lr * (1.0 - iteration / max_iterations) ** power


# --------------------------------------------------------------------------- state helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as plain picklable data."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    # random.setstate needs tuples; a round trip through some serialisers yields lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class SaveError(OSError):
    """A checkpoint or metrics file could not be written (disk full, no permission, ...). The
    temporary file is gone and a file already at the path is left as it was. The message reads
    ``cannot write <what> <path>: <reason>`` (one line)."""

    def __init__(self, what: str, path: str, reason: str):
        super().__init__(f"cannot write {what} {path}: {reason}")
        self.path, self.reason = path, reason


def _os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError behind ``error``: itself, or one it was raised from or while handling.
    torch.save reports a failed write of its file object as its own RuntimeError (``[enforce
    fail at inline_container.cc:...] . unexpected pos ...``) raised while handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_atomic(path: str, what: str, mode: str, write, **open_args) -> None:
    """``write(file)`` to a temporary file in the same folder, synced, then ``os.replace`` it into
    place. If that fails, the temporary file is removed (a checkpoint's is tens of megabytes) and
    a failed write (an OSError: disk full, quota, permissions) becomes a :class:`SaveError`;
    anything else (an interrupt, a bug) is raised as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **open_args) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        _raise_save_error(error, what, path, os.path.exists(path))


def _raise_save_error(error: BaseException, what: str, path: str, existed: bool) -> None:
    """Raise ``error`` as a :class:`SaveError` if a failed write (an OSError) is behind it, else as it was."""
    cause = _os_error_behind(error)
    if cause is None:
        raise error
    reason = os.strerror(cause.errno)
    reason = reason[:1].lower() + reason[1:]
    if existed:
        reason += f" ({path} from before is unchanged)"
    raise SaveError(what, path, reason) from error


def append_csv_row(path: str, fields, row: dict) -> None:
    """Append ``row`` to the CSV file at ``path`` (with the header when the file is new): the whole
    line or nothing. A failed write (disk full, ...) leaves the file as it was (cut back to its
    size before, removed if it was new) and becomes a :class:`SaveError`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    existed = os.path.exists(path)
    if not existed:
        writer.writeheader()
    writer.writerow(row)
    size = os.path.getsize(path) if existed else 0
    try:
        with open(path, "a", newline="", encoding="utf-8") as f:
            f.write(text.getvalue())
            f.flush()
    except BaseException as error:
        if existed:
            os.truncate(path, size)
        elif os.path.exists(path):
            os.remove(path)
        _raise_save_error(error, "log", path, existed)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it into place;
    :class:`SaveError` (the temporary file removed) if it cannot be written."""
    _write_atomic(path, "checkpoint", "wb", lambda f: torch.save(obj, f))


def write_json_atomic(obj, path: str) -> None:
    """``json.dump`` like :func:`save_atomic`: all or nothing, :class:`SaveError` if it cannot be written."""
    _write_atomic(path, "metrics file", "w", lambda f: json.dump(obj, f, indent=2), encoding="utf-8")


def load_checkpoint_file(path: str) -> dict:
    """A checkpoint file's contents; :class:`~ipmt_fast.model.CheckpointError` if it cannot be read."""
    return dict(read_checkpoint(path))


def require_entries(state: dict, path: str, keys) -> None:
    """Refuse one of our checkpoints that lacks any of ``keys`` (:class:`~ipmt_fast.model.CheckpointError`)."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(path, f"incomplete ipmt-fast checkpoint, missing {', '.join(missing)}")


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Trains an IPMT with the published recipe; see the module docstring.

    Args:
        cfg: a resolved :class:`~ipmt_fast.train.config.TrainConfig`.
        model: an IPMT to train, used as given (default: built from ``cfg``, with a random
            backbone calibrated, see :func:`calibrate_frozen_batchnorm`); its dtype (e.g.
            float64) is used for the inputs too.
        train_data, val_data: episode sources (default: built from ``cfg``).
        dist_ctx: the process-group context (default: from torchrun's environment).
    """

    def __init__(self, cfg: TrainConfig, model: Optional[IPMT] = None, train_data=None, val_data=None,
                 dist_ctx: Optional[DistContext] = None):
        self.cfg = cfg
        self.ctx = dist_ctx or init_distributed(cfg.device)
        self.device = self.ctx.device
        if cfg.cuda_graphs:  # refused before any data or model is built
            check_training_support(self.device, cfg.amp, self.ctx.distributed)
        # Data first: a wrong data root or list fails before the model is built.
        self.train_data = train_data if train_data is not None else build_dataset(cfg, "train")
        self.val_data = val_data if val_data is not None or not cfg.eval else build_dataset(cfg, "val")
        seed_everything(cfg.manual_seed)
        self.model = (model if model is not None else build_model(cfg)).to(self.device)
        # Before anything wraps the model: DDP's hooks, a compiled graph or a captured one.
        self.tuning: Optional[TuningResult] = self._tune_backends() if cfg.tune_backends else None
        # What evaluation runs: the model, or its compiled graph.
        self.eval_model = compile_model(self.model) if cfg.compile else self.model
        self.net = self.eval_model
        if self.ctx.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
            if cfg.compile:
                # DDP's gradient buckets split the graph (its optimizer for compile), so no fullgraph.
                self.net = torch.compile(self.net)
        self.optimizer, self.transformer_optimizer = build_optimizers(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # With cuda_graphs, train_step replays a captured iteration (see ipmt_fast.train.graphs).
        self.graphed_step = GraphedStep(self.model, [self.optimizer, self.transformer_optimizer], amp=cfg.amp,
                                        clip_grad_norm=cfg.clip_grad_norm, aux_weight=cfg.aux_weight) \
            if cfg.cuda_graphs else None

        self.val_classes = fold_classes(cfg.data, cfg.split, cfg.coco_split)[1]
        self.sampler = EpisodeBatchSampler(len(self.train_data), cfg.batch_size, self.ctx.rank, self.ctx.world_size,
                                           seed=cfg.manual_seed)
        # A private generator: the loader's per-iterator seed draw must not touch the global RNG
        # (it would make the dropout stream depend on where an epoch was resumed).
        self.train_loader = make_loader(self.train_data, self.sampler, self.device, cfg.workers,
                                        generator=torch.Generator().manual_seed(cfg.manual_seed))
        self.iters_per_epoch = self.sampler.batches_per_epoch
        self.total_iterations = cfg.steps if cfg.steps is not None else cfg.epochs * self.iters_per_epoch
        self.eval_every = cfg.eval_every or self.iters_per_epoch
        self.save_every = cfg.save_every or self.eval_every

        if cfg.calibrate_backbone and not (cfg.backbone_weights or cfg.weight or cfg.resume or model is not None):
            self._calibrate_backbone()

        self.iteration = 0
        self.best_miou = -math.inf
        self.history: List[dict] = []
        self.skipped_files: Counter = Counter()
        self.last_losses: Dict[str, float] = {}
        self._tensorboard = None
        if cfg.resume:
            self.load_checkpoint(cfg.resume)

    @property
    def _dtype(self) -> torch.dtype:
        """The model's floating-point dtype (its inputs are cast to it)."""
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def _first_batch(self, rank: int = 0, world_size: int = 1) -> dict:
        """The first batch of epoch 0, collated: the global one, or ``rank``'s share of it."""
        keys = next(iter(EpisodeBatchSampler(len(self.train_data), self.cfg.batch_size, rank, world_size,
                                             seed=self.cfg.manual_seed)))
        return collate_episodes([self.train_data[key] for key in keys])

    def _calibrate_backbone(self) -> None:
        # The first global batch (query and support images): the same on every rank.
        batch = self._first_batch()
        images = torch.cat([batch["image"], batch["support_images"].flatten(0, 1)])
        calibrate_frozen_batchnorm(self.model.backbone, images.to(self.device, self._dtype))

    def _tune_backends(self) -> TuningResult:
        """Each op's backend by timing a forward + backward of this rank's share of the first batch
        (before any graph is captured or compiled). Every rank runs rank 0's choices."""
        x, s_x, s_y, y = episode_inputs(self._first_batch(self.ctx.rank, self.ctx.world_size), self.device,
                                        self._dtype)

        def forward_backward():
            self.model.zero_grad(set_to_none=True)
            with autocast(self.device, self.cfg.amp):
                _, main_loss, aux_loss = self.model(x, s_x, s_y, y)
            (main_loss + self.cfg.aux_weight * aux_loss).backward()

        self.model.train()
        result = tune_backends(self.model, forward_backward, progress=self.ctx.is_main and self.cfg.progress)
        choices = all_gather_objects(result.choices)[0]
        self.model.set_backend(self.model.backend, choices)
        if self.ctx.is_main:
            self._print(result.table())
        return result

    # ----------------------------------------------------------------------- schedule
    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch

    def learning_rates(self, iteration: int):
        """(SGD lr, AdamW lr) used at 1-based ``iteration``."""
        cfg = self.cfg
        if cfg.warmup and iteration < self.iters_per_epoch:
            base = cfg.base_lr * (WARMUP_START_RATIO + (1 - WARMUP_START_RATIO) * iteration / self.iters_per_epoch)
        else:
            base = poly_lr(cfg.base_lr, iteration, self.total_iterations, cfg.power)
        return base * cfg.scale_lr, cfg.transformer_lr

    def _seed_epoch(self, epoch: int) -> None:
        seed_everything(self.cfg.manual_seed + epoch + self.ctx.rank * RANK_SEED_STRIDE)

    # ----------------------------------------------------------------------- one step
    def train_step(self, batch: dict) -> Dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (this rank's share), eager or replayed from a CUDA
        graph (``cuda_graphs``). Returns detached losses (device tensors); the gradients of the
        step stay in ``.grad`` until the next step."""
        sgd_lr, transformer_lr = self.learning_rates(self.iteration + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = sgd_lr
        for group in self.transformer_optimizer.param_groups:
            group["lr"] = transformer_lr
        losses = self.graphed_step.step(batch) if self.graphed_step is not None else self._eager_step(batch)
        self.iteration += 1
        for path in batch.get("skipped", ()):
            if path not in self.skipped_files:
                self._print(f"warning: skipping unreadable file {path} (rank {self.ctx.rank})")
            self.skipped_files[path] += 1
        return losses

    def _eager_step(self, batch: dict) -> Dict[str, torch.Tensor]:
        """Forward, backward (through the fp16 scaler when on), clipping, both optimisers' steps."""
        x, s_x, s_y, y = episode_inputs(batch, self.device, self._dtype)
        with autocast(self.device, self.cfg.amp):
            _, main_loss, aux_loss = self.net(x, s_x, s_y, y)
        loss = main_loss + self.cfg.aux_weight * aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.transformer_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            self.scaler.unscale_(self.transformer_optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.step(self.transformer_optimizer)
        self.scaler.update()
        return {"loss": loss.detach(), "main_loss": main_loss.detach(), "aux_loss": aux_loss.detach()}

    # ----------------------------------------------------------------------- loop
    def fit(self, until: Optional[int] = None) -> dict:
        """Train up to iteration ``until`` (default: the end of the schedule or ``stop_after``),
        evaluating every ``eval_every`` iterations and at the end. Returns the metrics summary."""
        cfg = self.cfg
        stop = min(x for x in (until, cfg.stop_after, self.total_iterations) if x is not None)
        if self.ctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        if cfg.eval and cfg.eval_at_start and self.iteration == 0 and not self.history:
            self.run_evaluation()
        progress = None
        if self.ctx.is_main and cfg.progress:
            from tqdm import tqdm
            progress = tqdm(total=self.total_iterations, initial=self.iteration, desc="train", unit="it",
                            dynamic_ncols=True)
        self.model.train()
        tick = time.perf_counter()
        saved_at = None
        while self.iteration < stop:
            epoch, start_batch = divmod(self.iteration, self.iters_per_epoch)
            if start_batch == 0:
                self._seed_epoch(epoch)
            self.sampler.set_epoch(epoch, start_batch)
            for batch in self.train_loader:
                losses = self.train_step(batch)
                now = time.perf_counter()
                seconds, tick = now - tick, now
                if self.iteration % cfg.print_freq == 0 or self.iteration == stop:
                    self._log_train(losses, seconds, progress)
                if progress is not None:
                    progress.update(1)
                evaluated = cfg.eval and (self.iteration % self.eval_every == 0
                                          or self.iteration == self.total_iterations)
                if evaluated:
                    self.run_evaluation()
                    self.model.train()
                if evaluated or self.iteration % self.save_every == 0 or self.iteration == stop:
                    self.save_checkpoint(os.path.join(cfg.out, "last.pt"))
                    saved_at = self.iteration
                tick = time.perf_counter()
                if self.iteration >= stop:
                    break
        if progress is not None:
            progress.close()
        if saved_at != self.iteration:
            self.save_checkpoint(os.path.join(cfg.out, "last.pt"))
        summary = self.summary()
        if self.ctx.is_main:
            write_json_atomic(summary, os.path.join(cfg.out, "metrics.json"))
            skipped = summary["skipped_files"]
            if skipped:
                warnings.warn(f"skipped {sum(skipped.values())} unreadable file read(s) during training: "
                              + ", ".join(sorted(skipped)), RuntimeWarning, stacklevel=2)
        return summary

    def _log_train(self, losses: Dict[str, torch.Tensor], seconds: float, progress) -> None:
        values = all_reduce_mean(torch.stack([losses["loss"], losses["main_loss"], losses["aux_loss"]]).float())
        loss, main_loss, aux_loss = values.tolist()
        self.last_losses = {"loss": loss, "main_loss": main_loss, "aux_loss": aux_loss}
        if not self.ctx.is_main:
            return
        sgd_lr, transformer_lr = self.learning_rates(self.iteration)
        row = {"iteration": self.iteration, "epoch": self.epoch, "lr": sgd_lr, "transformer_lr": transformer_lr,
               "loss": loss, "main_loss": main_loss, "aux_loss": aux_loss, "seconds": seconds}
        self._append_csv("train_log.csv", TRAIN_LOG_FIELDS, row)
        self._scalar({"train/loss": loss, "train/main_loss": main_loss, "train/aux_loss": aux_loss, "train/lr": sgd_lr})
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{sgd_lr:.2e}", refresh=False)

    def run_evaluation(self) -> EvalResult:
        """Evaluate on the validation episodes; record, log and keep the best checkpoint."""
        cfg = self.cfg
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            python_state, numpy_state = random.getstate(), np.random.get_state()
            result = evaluate(self.eval_model, self.val_data, self.val_classes, self.device,
                              batch_size=cfg.batch_size_val, workers=cfg.workers, amp=cfg.amp,
                              original_resolution=cfg.original_resolution, dist_ctx=self.ctx,
                              progress=self.ctx.is_main and cfg.progress, cuda_graphs=cfg.cuda_graphs)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        record = {"iteration": self.iteration, "epoch": self.epoch, **result.as_dict()}
        self.history.append(record)
        improved = result.miou > self.best_miou
        if improved:
            self.best_miou = result.miou
        if self.ctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            self._append_csv("val_log.csv", VAL_LOG_FIELDS, {k: record[k] for k in VAL_LOG_FIELDS})
            self._scalar({"val/miou": result.miou, "val/fb_iou": result.fb_iou})
            self._print(f"[iteration {self.iteration}] {result.summary()} ({result.episodes} episodes)")
        if improved:
            self.save_checkpoint(os.path.join(cfg.out, "best.pt"))
        summary = self.summary()  # collective: every rank takes part, rank 0 writes
        if self.ctx.is_main:
            write_json_atomic(summary, os.path.join(cfg.out, "metrics.json"))
        return result

    def all_skipped_files(self) -> Counter:
        """Every rank's count of skipped unreadable files, merged (a collective call)."""
        merged: Counter = Counter()
        for counts in all_gather_objects(dict(self.skipped_files)):
            merged.update(counts)
        return merged

    def summary(self) -> dict:
        """The metrics.json content (a collective call: it merges the ranks' skipped files)."""
        best = max(self.history, key=lambda r: r["miou"]) if self.history else None
        return {"iteration": self.iteration, "total_iterations": self.total_iterations,
                "evaluations": self.history, "best": best, "last": self.history[-1] if self.history else None,
                "train_losses": self.last_losses, "skipped_files": dict(self.all_skipped_files()),
                "config": self.cfg.as_dict()}

    # ----------------------------------------------------------------------- logging
    def _print(self, message: str) -> None:
        from tqdm import tqdm
        tqdm.write(message)

    def _append_csv(self, name: str, fields, row: dict) -> None:
        append_csv_row(os.path.join(self.cfg.out, name), fields, row)

    def _scalar(self, values: Dict[str, float]) -> None:
        if not self.cfg.tensorboard:
            return
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard); logging to CSV only",
                              RuntimeWarning, stacklevel=2)
                self.cfg.tensorboard = False
                return
            self._tensorboard = SummaryWriter(self.cfg.out)
        for tag, value in values.items():
            self._tensorboard.add_scalar(tag, value, self.iteration)

    # ----------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """This run's full state (the RNG states of all ranks: a collective call)."""
        epoch, batch = divmod(self.iteration, self.iters_per_epoch)
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": model_arch(self.cfg),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "transformer_optimizer": self.transformer_optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch, "iteration": self.iteration, "total_iterations": self.total_iterations,
            "sampler": {"epoch": epoch, "batch": batch, "seed": self.cfg.manual_seed,
                        "world_size": self.ctx.world_size, "global_batch_size": self.cfg.batch_size},
            "rng": all_gather_objects(capture_rng_state()),
            "best_miou": self.best_miou, "history": self.history,
            "skipped_files": dict(self.all_skipped_files()), "config": self.cfg.as_dict(),
        }

    def save_checkpoint(self, path: str) -> None:
        state = self.state()
        if self.ctx.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_atomic(state, path)
        barrier()

    def load_checkpoint(self, path: str) -> None:
        """Resume from one of our checkpoints: weights, optimisers, scaler, position and RNGs.
        A captured training step is dropped, to be captured again on the next step."""
        state = load_checkpoint_file(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an ipmt-fast training checkpoint (to start from published weights "
                             f"use --weight instead of --resume)")
        require_entries(state, path, RESUME_KEYS)
        if state["arch"] != model_arch(self.cfg):
            raise ValueError(f"{path} was trained with {state['arch']}, this run is configured for "
                             f"{model_arch(self.cfg)}")
        sampler = state["sampler"]
        if (sampler["global_batch_size"], sampler["seed"]) != (self.cfg.batch_size, self.cfg.manual_seed):
            raise ValueError(f"{path} used batch size {sampler['global_batch_size']} and seed {sampler['seed']}; "
                             f"resume with the same values (got {self.cfg.batch_size}, {self.cfg.manual_seed})")
        load_published_checkpoint(self.model, state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.transformer_optimizer.load_state_dict(state["transformer_optimizer"])
        # A checkpoint keeps the optimiser forms of the run that wrote it (graph-safe or not).
        configure_optimizers_for_graphs([self.optimizer, self.transformer_optimizer], self.cfg.cuda_graphs)
        if self.graphed_step is not None:
            self.graphed_step.invalidate()  # the graph holds the replaced optimiser state's addresses
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.history = list(state["history"])
        # The checkpoint holds all ranks' skips merged; rank 0 carries them on.
        self.skipped_files = Counter(state["skipped_files"] if self.ctx.is_main else {})
        if state["total_iterations"] != self.total_iterations:
            warnings.warn(f"resuming a {state['total_iterations']}-iteration schedule as {self.total_iterations} "
                          f"iterations: the learning-rate schedule changes", RuntimeWarning, stacklevel=2)
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            warnings.warn(f"{path} was written by {len(rng)} process(es), this run has {self.ctx.world_size}: "
                          f"episodes continue exactly, dropout draws are re-seeded", RuntimeWarning, stacklevel=2)
            self._seed_epoch(self.epoch)
