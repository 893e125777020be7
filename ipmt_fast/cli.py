"""``ipmt-fast`` command line: ``train``, ``eval``, ``predict`` and ``build``.

Settings come from (lowest to highest) the built-in and dataset defaults, the configuration saved
in a checkpoint (``eval``/``predict`` of our checkpoints), a YAML file (``--config``, our keys or
the published ones) and the flags. ``torchrun --nproc_per_node=N -m ipmt_fast train ...`` trains
data-parallel (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import numpy as np

from .constants import BACKGROUND_LABEL, FOREGROUND_LABEL, IGNORE_LABEL
from .data.base import DataError
from .ops.extension import BUILD_DESCRIPTION, add_build_arguments, report_build

AMP_CHOICES = ("none", "bf16", "fp16")
BACKEND_CHOICES = ("auto", "reference", "torch", "triton", "compiled")
# Overlay colour and opacity of the predicted mask in `predict`.
OVERLAY_RGB = (255, 40, 40)
OVERLAY_ALPHA = 0.5
MASK_PNG_FOREGROUND = 255


# --------------------------------------------------------------------------- arguments
def _add_data_args(p: argparse.ArgumentParser, with_train: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("synthetic", "pascal", "coco"),
                   help="episode source: generated shapes (default), PASCAL-5i or COCO-20i")
    g.add_argument("--data-root", help="folder the list files' image/label paths start from")
    if with_train:
        g.add_argument("--train-list", help="training list (default: DATA_ROOT/lists/<data>/<published name>)")
    g.add_argument("--val-list", help="validation list (default: DATA_ROOT/lists/<data>/<published name>)")
    g.add_argument("--split", type=int, help="fold 0..3 (its classes are held out for testing)")
    g.add_argument("--shot", type=int, help="support images per episode")
    g.add_argument("--coco-split", choices=("interleaved", "blocks"),
                   help="COCO-20i convention: classes k+1, k+5, ... (default) or a block of 20")
    g.add_argument("--workers", type=int, help="data-loading processes")
    g.add_argument("--seed", dest="manual_seed", type=int, help="seed of the episodes and the run (default 123)")


def _add_channels_last_arg(g) -> None:
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="run the feature maps channels-last: same values up to rounding, faster where the "
                        "device's convolutions prefer it (large images on a CPU, see NOTES.md)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, choices=(50, 101), help="backbone depth")
    g.add_argument("--reduce-dim", type=int, help="hidden width C (published 384)")
    g.add_argument("--num-layers", type=int, help="transformer layers (published 5)")
    g.add_argument("--backend", choices=BACKEND_CHOICES, help="op backend (default auto)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU if any)")
    g.add_argument("--amp", choices=AMP_CHOICES, help="autocast dtype (default none)")
    _add_channels_last_arg(g)
    _add_cuda_graphs_arg(g)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model as one graph (fullgraph) for training and evaluation; the "
                        "first steps pay the compile time (README, torch.compile)")


def _add_cuda_graphs_arg(g) -> None:
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the whole training iteration (train) or the forward (eval, predict) in a CUDA "
                        "graph and replay it: far fewer host launches (CUDA only; README, CUDA graphs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipmt-fast", description="IPMT few-shot segmentation: train, evaluate, "
                                     "predict; build the compiled ops ahead. Run `ipmt-fast <command> --help` for a "
                                     "command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,build}")

    train = sub.add_parser("train", help="train a model", description=(
        "Train IPMT with the published recipe. Writes OUT/last.pt, OUT/best.pt (best validation mIoU), "
        "OUT/metrics.json and CSV logs. For several processes: torchrun --nproc_per_node=N -m ipmt_fast train ..."))
    train.add_argument("--config", help="YAML file of our or the published keys")
    _add_data_args(train, with_train=True)
    _add_model_args(train)
    g = train.add_argument_group("training")
    g.add_argument("--image-size", type=int, help="training crop and validation size, 8k+1 (published 473)")
    g.add_argument("--val-size", type=int, help="validation size if different from --image-size")
    g.add_argument("--batch-size", type=int, help="episodes per step over all processes (published 4)")
    g.add_argument("--steps", type=int, help="total iterations (overrides --epochs)")
    g.add_argument("--epochs", type=int, help="epochs (published 200 on PASCAL)")
    g.add_argument("--base-lr", type=float, help="SGD base lr before the x15 scaling (published 0.0025)")
    g.add_argument("--scale-lr", type=float, help="multiplier of the SGD lr (published 15)")
    g.add_argument("--aux-weight", type=float, help="weight of the duplex segmentation loss (published 1.0)")
    g.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm (not in the published recipe)")
    g.add_argument("--backbone-weights", help="PFENet deep-stem ImageNet ResNet (resnet50_v2.pth)")
    g.add_argument("--weight", help="initial weights of the whole model (published or ours)")
    g.add_argument("--resume", help="continue a run from its checkpoint (OUT/last.pt)")
    g.add_argument("--out", help="output folder (default runs/<data>)")
    g.add_argument("--recompute-ffn", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the transformer FFNs' hidden activations in backward (less memory)")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None, help="validate during training")
    g.add_argument("--eval-every", type=int, help="iterations between validations (default: one epoch)")
    g.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=None,
                   help="validate before the first step (default: on for synthetic data)")
    g.add_argument("--val-episodes", type=int, help="validation episodes (default 1000 PASCAL, 5000 COCO)")
    g.add_argument("--save-every", type=int, help="iterations between OUT/last.pt writes (default: each validation)")
    g.add_argument("--stop-after", type=int, help="stop at this iteration (the schedule still spans --steps); "
                   "continue later with --resume")
    g.add_argument("--tensorboard", action="store_true", default=None, help="also log to TensorBoard if installed")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    g.add_argument("--tune-backends", action=argparse.BooleanOptionalAction, default=None,
                   help="before training, choose each op's backend by timing a forward + backward of the first "
                        "batch here (time only; README, Backends by measurement)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint", description=(
        "Evaluate a checkpoint (ours or published) with the published protocol: fixed-seed episodes, "
        "class-wise foreground IoU averaged over the fold's test classes (mIoU) and FB-IoU, on original-"
        "resolution labels. The last line reads `mIoU <percent> FB-IoU <percent>`."))
    ev.add_argument("--checkpoint", required=True, help="our .pt checkpoint or a published .pth")
    ev.add_argument("--config", help="YAML file of our or the published keys")
    _add_data_args(ev, with_train=False)
    _add_model_args(ev)
    ev.add_argument("--image-size", dest="val_size", type=int, help="input size, 8k+1 (published 473)")
    ev.add_argument("--episodes", dest="val_episodes", type=int, help="episodes (default 1000 PASCAL, 5000 COCO)")
    ev.add_argument("--batch-size", dest="batch_size_val", type=int, help="episodes per forward pass")
    ev.add_argument("--original-resolution", action=argparse.BooleanOptionalAction, default=None,
                    help="score on the original labels (default, published ori_resize) or on the resized ones")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")

    pr = sub.add_parser("predict", help="segment a query image given annotated support images", description=(
        "Segment the class shown by the support masks in the query image. Writes the query with the "
        "predicted mask overlaid (--out) and optionally the mask itself (--mask-out, 0/255 PNG)."))
    pr.add_argument("--checkpoint", required=True, help="our .pt checkpoint or a published .pth")
    pr.add_argument("--query", required=True, help="query image")
    pr.add_argument("--support", required=True, nargs="+", help="support image(s)")
    pr.add_argument("--support-mask", required=True, nargs="+",
                    help="support mask(s): pixels equal to --class-id (default: any value but 0 and 255) are "
                         "the target, 255 is ignored")
    pr.add_argument("--class-id", type=int, help="label value of the target class in the support masks")
    pr.add_argument("--out", default="prediction.png", help="overlay PNG to write (default prediction.png)")
    pr.add_argument("--mask-out", help="also write the predicted mask here (PNG, 0/255)")
    pr.add_argument("--image-size", dest="val_size", type=int, help="input size, 8k+1 (default: the checkpoint's, "
                    "else 473)")
    pr.add_argument("--layers", type=int, choices=(50, 101), help="backbone depth (published checkpoints)")
    pr.add_argument("--reduce-dim", type=int, help="hidden width (published checkpoints: 384)")
    pr.add_argument("--num-layers", type=int, help="transformer layers (published checkpoints: 5)")
    pr.add_argument("--backend", choices=BACKEND_CHOICES, help="op backend (default auto)")
    pr.add_argument("--device", help="cpu, cuda or cuda:N")
    _add_channels_last_arg(pr)
    _add_cuda_graphs_arg(pr)

    bd = sub.add_parser("build", help="build the compiled ops ahead of the first model call",
                        description=BUILD_DESCRIPTION)
    add_build_arguments(bd)
    return parser


# --------------------------------------------------------------------------- helpers
def _overrides(args: argparse.Namespace, skip=("command", "config", "checkpoint")) -> dict:
    values = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    size = values.pop("image_size", None)
    if size is not None:
        values.setdefault("train_h", size)
        values.setdefault("train_w", size)
        values.setdefault("val_size", size)
    return values


def _checkpoint_settings(path: str):
    """(state, config values, arch) of a checkpoint: ours carry their config, published ones none."""
    from .train.trainer import CHECKPOINT_FORMAT, EVAL_KEYS, load_checkpoint_file, require_entries

    state = load_checkpoint_file(path)
    if state.get("format") == CHECKPOINT_FORMAT:
        require_entries(state, path, EVAL_KEYS)
        return state, dict(state["config"]), dict(state["arch"])
    return state, {}, {}


def _config_for_checkpoint(args: argparse.Namespace):
    """A resolved config for ``eval``/``predict``: checkpoint config < YAML < flags; the model
    shape comes from the checkpoint unless a flag sets it."""
    from .train.config import TrainConfig, load_yaml_config

    state, values, arch = _checkpoint_settings(args.checkpoint)
    # Settings of the run that wrote the checkpoint, not of its model (cuda_graphs: a GPU run's
    # choice that must not refuse evaluation elsewhere).
    for run_only in ("resume", "weight", "stop_after", "out", "steps", "epochs", "eval_every", "cuda_graphs",
                     "compile"):
        values.pop(run_only, None)
    values.update(arch)
    if getattr(args, "config", None):
        values.update(load_yaml_config(args.config))
    values.update(_overrides(args, skip=("command", "config", "checkpoint", "query", "support", "support_mask",
                                         "class_id", "out", "mask_out")))
    return state, TrainConfig(**values).resolved()


def _load_model(cfg, state, device):
    import torch

    from .model import IPMT, load_published_checkpoint
    from .train.trainer import model_arch

    # Values are checked on the host by the data layer (eval) or from the files read (predict).
    model = IPMT(backend=cfg.backend, check_values=False, channels_last=cfg.channels_last, **model_arch(cfg))
    load_published_checkpoint(model, state)
    return model.to(device).eval(), torch.device(device)


# --------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import make_config
    from .train.distributed import shutdown
    from .train.trainer import Trainer

    cfg = make_config(args.config, **_overrides(args))
    try:
        trainer = Trainer(cfg)
        summary = trainer.fit()
        if trainer.ctx.is_main:
            print(f"wrote {os.path.join(cfg.out, 'last.pt')} (iteration {summary['iteration']})")
            if summary["best"] is not None:
                first, best, last = summary["evaluations"][0], summary["best"], summary["last"]
                print(f"first evaluation (iteration {first['iteration']}): mIoU {100 * first['miou']:.2f} "
                      f"FB-IoU {100 * first['fb_iou']:.2f}")
                print(f"best (iteration {best['iteration']}, {os.path.join(cfg.out, 'best.pt')}): "
                      f"mIoU {100 * best['miou']:.2f} FB-IoU {100 * best['fb_iou']:.2f}")
                print(f"mIoU {100 * last['miou']:.2f} FB-IoU {100 * last['fb_iou']:.2f}")
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.distributed import init_distributed, shutdown
    from .train.evaluate import evaluate
    from .train.graphs import require_cuda
    from .train.trainer import build_dataset, compile_model
    from .data import fold_classes

    state, cfg = _config_for_checkpoint(args)
    ctx = init_distributed(cfg.device)
    try:
        if cfg.cuda_graphs:  # refused before the data is indexed
            require_cuda(ctx.device)
        model, device = _load_model(cfg, state, ctx.device)
        if cfg.compile:
            model = compile_model(model)
        dataset = build_dataset(cfg, "val")
        classes = fold_classes(cfg.data, cfg.split, cfg.coco_split)[1]
        result = evaluate(model, dataset, classes, device, batch_size=cfg.batch_size_val, workers=cfg.workers,
                          amp=cfg.amp, original_resolution=cfg.original_resolution, dist_ctx=ctx,
                          progress=ctx.is_main and cfg.progress, cuda_graphs=cfg.cuda_graphs)
        if ctx.is_main:
            print(f"{cfg.data} fold {cfg.split}, {cfg.shot}-shot, {result.episodes} episodes, input {cfg.val_size}")
            for c, iou in result.class_iou.items():
                print(f"class {c}: IoU {100 * iou:.2f} ({result.class_episodes[c]} episodes)")
            print(result.summary())
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from .data import ValTransform, binarize, read_image, read_label
    from .train.evaluate import prediction_at_original_size
    from .train.graphs import GraphedForward

    if len(args.support) != len(args.support_mask):
        raise ValueError(f"got {len(args.support)} --support image(s) but {len(args.support_mask)} --support-mask(s)")
    args.shot = len(args.support)
    state, cfg = _config_for_checkpoint(args)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, device = _load_model(cfg, state, device)
    forward = GraphedForward(model) if cfg.cuda_graphs else model
    transform = ValTransform(cfg.val_size)

    query = read_image(args.query)
    x, padding_label = transform(query)  # the label marks the resize/pad padding with 255
    support_images, support_labels = [], []
    for image_path, mask_path in zip(args.support, args.support_mask):
        image, mask = read_image(image_path), read_label(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(f"support image and mask sizes differ: {image_path} {image.shape[1]}x{image.shape[0]}, "
                            f"{mask_path} {mask.shape[1]}x{mask.shape[0]}")
        if args.class_id is not None:
            binary = binarize(mask, args.class_id)
        else:
            binary = np.where(mask == IGNORE_LABEL, IGNORE_LABEL,
                              (mask != BACKGROUND_LABEL) * FOREGROUND_LABEL).astype(np.uint8)
        if not (binary == FOREGROUND_LABEL).any():
            raise DataError(f"support mask {mask_path} marks no target pixel")
        s_x, s_y = transform(image, binary)
        support_images.append(s_x)
        support_labels.append(s_y)
    with torch.no_grad():
        logits = forward(x[None].to(device), torch.stack(support_images)[None].to(device),
                       torch.stack(support_labels)[None].to(device), padding_label[None].to(device))
    mask = prediction_at_original_size(logits[0], query.shape[:2]).cpu().numpy().astype(bool)

    overlay = query.astype(np.float32)
    overlay[mask] = (1 - OVERLAY_ALPHA) * overlay[mask] + OVERLAY_ALPHA * np.asarray(OVERLAY_RGB, np.float32)
    Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8)).save(args.out)
    if args.mask_out:
        Image.fromarray(mask.astype(np.uint8) * MASK_PNG_FOREGROUND).save(args.mask_out)
    print(f"foreground: {int(mask.sum())} of {mask.size} pixels ({100 * mask.mean():.1f}%); wrote {args.out}"
          + (f" and {args.mask_out}" if args.mask_out else ""))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    return report_build(args.require_cuda, prog="ipmt-fast build")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "build": cmd_build}


def _finish_progress_bars() -> None:
    """Close the progress bars a failed command left open (tqdm's registry of live bars), so that
    its error starts a line of its own instead of trailing the bar and being redrawn over."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: Optional[List[str]] = None) -> int:
    from .train.trainer import SaveError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DataError, FileNotFoundError, SaveError, ValueError) as err:
        _finish_progress_bars()
        print(f"ipmt-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
