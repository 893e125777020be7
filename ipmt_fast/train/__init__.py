"""Training and evaluation: the published recipe, metrics, checkpoints, torchrun support, CUDA graphs."""
from .config import DATASET_DEFAULTS, TrainConfig, load_yaml_config, make_config
from .distributed import DistContext, init_distributed
from .evaluate import evaluate, prediction_at_original_size
from .graphs import CudaGraphError, GraphedForward, GraphedStep
from .metrics import EvalResult, FewShotMeter, intersection_and_union
from .trainer import Trainer, build_dataset, build_model, build_optimizers, poly_lr

__all__ = [
    "CudaGraphError", "DATASET_DEFAULTS", "DistContext", "EvalResult", "FewShotMeter", "GraphedForward",
    "GraphedStep", "TrainConfig", "Trainer", "build_dataset", "build_model", "build_optimizers", "evaluate",
    "init_distributed", "intersection_and_union", "load_yaml_config", "make_config", "poly_lr",
    "prediction_at_original_size",
]
