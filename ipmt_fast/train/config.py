"""Training/evaluation configuration: one dataclass, the published YAML keys, dataset defaults.

Precedence: built-in defaults < dataset defaults (for fields left unset) < YAML file < command
line. A published config (``config/pascal/pascal_split0_resnet50.yaml``: sections ``DATA``,
``TRAIN``, ``Distributed``) loads as is: its keys map onto these fields, keys that only steered
the published multi-GPU launcher are accepted and ignored (``torchrun`` replaces them), and
anything else is an error naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import yaml

from ..constants import IGNORE_LABEL, OUTPUT_STRIDE

DATASETS = ("synthetic", "pascal", "coco")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training or evaluation run needs. ``None`` means "the dataset's default"
    (see :data:`DATASET_DEFAULTS`), filled in by :meth:`resolved`."""

    # data
    data: str = "synthetic"
    data_root: Optional[str] = None
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    split: int = 0
    shot: int = 1
    coco_split: str = "interleaved"
    min_class_pixels: int = 4 * 32 * 32
    synthetic_length: Optional[int] = None  # generated training episodes per epoch
    train_h: Optional[int] = None
    train_w: Optional[int] = None
    val_size: Optional[int] = None
    scale_min: float = 0.9
    scale_max: float = 1.1
    rotate_min: float = -10.0
    rotate_max: float = 10.0
    workers: int = 2
    # model
    layers: int = 50
    reduce_dim: Optional[int] = None
    num_layers: Optional[int] = None
    backend: str = "auto"
    # Recompute the transformer FFNs' hidden activations in backward: less memory, a little slower.
    recompute_ffn: bool = False
    # Feature maps channels-last (IPMT's channels_last): same values up to rounding, faster or
    # slower by device and image size (NOTES.md).
    channels_last: bool = False
    backbone_weights: Optional[str] = None
    # Without backbone weights: measure the random backbone's batch-norm statistics on the first
    # training batch (see ipmt_fast.train.trainer.calibrate_frozen_batchnorm).
    calibrate_backbone: bool = True
    weight: Optional[str] = None  # initial weights of the whole model (published or ours)
    # optimisation (published recipe)
    batch_size: int = 4  # global: split across torchrun processes
    base_lr: float = 0.0025
    scale_lr: float = 15.0
    power: float = 0.9
    warmup: bool = False
    momentum: float = 0.9
    weight_decay: float = 1e-4
    transformer_lr: float = 1e-4
    transformer_weight_decay: float = 1e-2
    aux_weight: Optional[float] = None
    clip_grad_norm: Optional[float] = None  # not in the published recipe
    epochs: Optional[int] = None
    steps: Optional[int] = None  # total iterations; overrides epochs
    manual_seed: int = 123
    amp: str = "none"
    # Capture the whole training iteration (train) or the forward (eval/predict) in a CUDA graph
    # and replay it (ipmt_fast.train.graphs; CUDA only).
    cuda_graphs: bool = False
    # torch.compile the model (fullgraph; training and evaluation). An alternative to cuda_graphs.
    compile: bool = False
    # Choose each transformer op's backend by timing a forward + backward of the first batch on this
    # device before training (ipmt_fast.tune_backends): time only, the same values up to rounding.
    tune_backends: bool = False
    # evaluation
    eval: bool = True
    eval_every: Optional[int] = None  # iterations; default once per epoch
    eval_at_start: Optional[bool] = None
    val_episodes: Optional[int] = None
    batch_size_val: int = 1
    val_only_shrink: bool = False  # published resized_val=False (test_Resize)
    original_resolution: bool = True  # published ori_resize
    # run
    device: Optional[str] = None
    out: Optional[str] = None  # default runs/<data>
    resume: Optional[str] = None
    save_every: Optional[int] = None  # iterations; default: with every evaluation
    stop_after: Optional[int] = None  # stop at this iteration (the schedule still spans all)
    print_freq: int = 10
    tensorboard: bool = False
    progress: bool = True
    find_unused_parameters: bool = False

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset defaults filled in and every value checked."""
        cfg = dataclasses.replace(self)
        if cfg.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {cfg.data!r}")
        for name, value in DATASET_DEFAULTS[cfg.data].items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        cfg.train_w = cfg.train_w if cfg.train_w is not None else cfg.train_h
        cfg.out = cfg.out or os.path.join("runs", cfg.data)
        for name in ("train_h", "train_w", "val_size"):
            size = getattr(cfg, name)
            if size < OUTPUT_STRIDE + 1 or (size - 1) % OUTPUT_STRIDE:
                raise ValueError(f"{name} must be 8k+1 (e.g. 473, 97, 65), got {size}")
        if cfg.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {cfg.amp!r}")
        if cfg.compile and cfg.cuda_graphs:
            raise ValueError("compile and cuda_graphs are alternatives (cuda_graphs captures the eager step; "
                             "torch.compile makes its own kernels): choose one")
        if cfg.shot < 1 or cfg.batch_size < 1 or cfg.batch_size_val < 1:
            raise ValueError("shot, batch_size and batch_size_val must be >= 1")
        if cfg.steps is not None and cfg.steps < 1:
            raise ValueError(f"steps must be >= 1, got {cfg.steps}")
        if cfg.data != "synthetic" and not cfg.data_root:
            raise ValueError(f"--data {cfg.data} needs --data-root (the folder the list files' paths start from)")
        return cfg

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Defaults that depend on the dataset. Real data: the published recipe. Synthetic: a small model
# on small generated images, sized so the default run trains in minutes on two CPU cores.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "pascal": dict(train_h=473, val_size=473, reduce_dim=384, num_layers=5, epochs=200, val_episodes=1000,
                   eval_at_start=False, aux_weight=1.0),
    # The IPMT repository ships no COCO config; 50 epochs is PFENet's COCO-20i recipe.
    "coco": dict(train_h=473, val_size=473, reduce_dim=384, num_layers=5, epochs=50, val_episodes=5000,
                 eval_at_start=False, aux_weight=1.0),
    # Without ImageNet weights the duplex loss's first gradients, at the published x15 SGD rate,
    # blow up the raw support/query tokens it scores and kill the features (measured: mIoU stays
    # 0); the synthetic default trains on the main loss alone. Pass --aux-weight 1 with
    # --backbone-weights for the full recipe.
    "synthetic": dict(train_h=49, val_size=49, reduce_dim=64, num_layers=2, epochs=1, steps=600, val_episodes=120,
                      eval_at_start=True, eval_every=200, aux_weight=0.0, synthetic_length=4000),
}

# Published config keys with another name (or meaning) here.
PUBLISHED_RENAMES = {"hidden_dims": "reduce_dim", "save_path": "out", "evaluate": "eval",
                     "ori_resize": "original_resolution"}
# Published keys that steered its launcher, logging or deprecated paths: accepted and ignored.
PUBLISHED_IGNORED = {
    "sync_bn", "train_gpu", "start_epoch", "save_freq", "fix_random_seed_val", "dist_url", "dist_backend",
    "multiprocessing_distributed", "world_size", "rank", "use_apex", "opt_level", "keep_batchnorm_fp32",
    "loss_scale",
}


def _published_value(key: str, value, out: Dict[str, Any]) -> None:
    """Translate one published key that has no one-to-one field."""
    if key == "classes":
        if value != 2:
            raise ValueError(f"classes must be 2 (background, target) in few-shot segmentation, got {value}")
    elif key in ("ignore_label", "padding_label"):
        if value != IGNORE_LABEL:
            raise ValueError(f"{key} must be {IGNORE_LABEL} (the model reads 255 as padding), got {value}")
    elif key == "with_transformer":
        if not value:
            raise ValueError("with_transformer: False (the network without its transformer) is not supported")
    elif key == "use_coco":
        if value:
            out["data"] = "coco"
        else:
            out.setdefault("data", "pascal")
    elif key == "use_split_coco":
        out["coco_split"] = "interleaved" if value else "blocks"
    elif key == "resized_val":
        out["val_only_shrink"] = not value
    else:
        raise KeyError(key)


def config_from_mapping(mapping: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """Field values from a (possibly sectioned) mapping of our or the published keys."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):  # published sections: DATA, TRAIN, Distributed
            flat.update(value)
        else:
            flat[key] = value
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out: Dict[str, Any] = {}
    unknown = []
    for key, value in flat.items():
        name = PUBLISHED_RENAMES.get(key, key)
        if name in fields:
            out[name] = value
        elif key in PUBLISHED_IGNORED:
            continue
        else:
            try:
                _published_value(key, value, out)
            except KeyError:
                unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    # An empty published value (`weight:`, `resume:`) means "none".
    return {k: (None if v == "" else v) for k, v in out.items()}


def load_yaml_config(path: str) -> Dict[str, Any]:
    """Field values from a YAML file of our or the published keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        mapping = yaml.safe_load(f) or {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values")
    return config_from_mapping(mapping, source=path)


def make_config(yaml_path: Optional[str] = None, **overrides) -> TrainConfig:
    """A resolved config from an optional YAML file and keyword overrides (``None`` = not given)."""
    values: Dict[str, Any] = load_yaml_config(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).resolved()


def default_list(cfg: TrainConfig, mode: str) -> str:
    """The list file of ``mode`` for real data: the configured one, else the published list under
    the data root (``lists/pascal/...`` or ``lists/coco/...``)."""
    given = cfg.train_list if mode == "train" else cfg.val_list
    if given:
        return given
    names = {("pascal", "train"): "lists/pascal/voc_sbd_merge_noduplicate.txt",
             ("pascal", "val"): "lists/pascal/val.txt",
             ("coco", "train"): "lists/coco/train_list.json",
             ("coco", "val"): "lists/coco/val_list.json"}
    return os.path.join(cfg.data_root, names[(cfg.data, mode)])

