"""The ipmt-fast command line: help, a tiny train/eval/predict run, configs, bad inputs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from PIL import Image

import ipmt_fast
from ipmt_fast.data.synthetic import render_scene
from ipmt_fast.train.config import load_yaml_config, make_config

TINY = ["--data", "synthetic", "--image-size", "33", "--reduce-dim", "32", "--num-layers", "1", "--batch-size", "2",
        "--workers", "0", "--backend", "torch", "--no-progress"]
SUMMARY_LINE = re.compile(r"^mIoU (\d+\.\d\d) FB-IoU (\d+\.\d\d)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code, stdout, stderr = run_cli("train", *TINY, "--steps", "2", "--val-episodes", "3", "--eval-every", "2",
                                   "--out", str(out))
    assert code == 0, stderr
    return out, stdout


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["predict"], ["build"]])
def test_help(command):
    code, stdout, _ = run_cli(*command, "--help")
    assert code == 0 and stdout.startswith("usage: ipmt-fast")
    expected = {"train": ["--data", "--data-root", "--split", "--shot", "--layers", "--image-size", "--steps",
                          "--backend", "--out", "--resume", "--config"],
                "eval": ["--checkpoint", "--data", "--episodes"],
                "predict": ["--query", "--support", "--support-mask"], "build": ["--require-cuda"]}
    for flag in expected.get(command[0] if command else "", ["train", "eval", "predict", "build"]):
        assert flag in stdout


@pytest.mark.parametrize("flag, expected", [([], False), (["--recompute-ffn"], True)])
def test_recompute_ffn_flag_reaches_the_model(flag, expected):
    from ipmt_fast.cli import _overrides, build_parser
    from ipmt_fast.model.transformer import FFN
    from ipmt_fast.train.trainer import build_model

    cfg = make_config(None, **_overrides(build_parser().parse_args(["train", *TINY, *flag])))
    assert cfg.recompute_ffn is expected
    ffns = [m for m in build_model(cfg).modules() if isinstance(m, FFN)]
    assert ffns and all(m.recompute_hidden is expected for m in ffns)


@pytest.mark.parametrize("flag, expected", [([], False), (["--tune-backends"], True), (["--no-tune-backends"], False)])
def test_tune_backends_flag_reaches_the_config(flag, expected):
    """(The tuning itself: tests/test_trainer.py and tests/test_tuning.py.)"""
    from ipmt_fast.cli import _overrides, build_parser

    cfg = make_config(None, **_overrides(build_parser().parse_args(["train", *TINY, *flag])))
    assert cfg.tune_backends is expected


@pytest.mark.parametrize("flag, expected", [([], torch.contiguous_format), (["--channels-last"], torch.channels_last)])
def test_channels_last_flag_reaches_the_model(flag, expected):
    from ipmt_fast.cli import _overrides, build_parser
    from ipmt_fast.train.trainer import build_model

    cfg = make_config(None, **_overrides(build_parser().parse_args(["train", *TINY, *flag])))
    assert build_model(cfg).map_layout == expected


def test_module_and_console_entry_points():
    module = subprocess.run([sys.executable, "-m", "ipmt_fast", "eval", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0 and "--checkpoint" in module.stdout
    script = os.path.join(os.path.dirname(sys.executable), "ipmt-fast")
    if os.path.exists(script):  # installed with pip install -e .
        console = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
        assert console.returncode == 0 and "predict" in console.stdout


def test_train_writes_checkpoints_and_metrics(trained):
    out, stdout = trained
    assert {"last.pt", "best.pt", "metrics.json", "train_log.csv", "val_log.csv"} <= set(os.listdir(out))
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["iteration"] == 2 and [e["iteration"] for e in metrics["evaluations"]] == [0, 2]
    last = metrics["last"]
    assert SUMMARY_LINE.match(stdout.splitlines()[-1])
    assert stdout.splitlines()[-1] == f"mIoU {100 * last['miou']:.2f} FB-IoU {100 * last['fb_iou']:.2f}"


def test_eval_reproduces_the_training_evaluation(trained):
    out, _ = trained
    code, stdout, stderr = run_cli("eval", "--checkpoint", str(out / "last.pt"), "--episodes", "3",
                                   "--workers", "0", "--backend", "reference")
    assert code == 0, stderr
    with open(out / "metrics.json") as f:
        last = json.load(f)["last"]
    line = stdout.splitlines()[-1]
    assert SUMMARY_LINE.match(line)
    assert line == f"mIoU {100 * last['miou']:.2f} FB-IoU {100 * last['fb_iou']:.2f}"


def test_compile_flag_trains_and_evaluates_like_eager(trained, tmp_path):
    """``--compile``: evaluation of the trained checkpoint prints the same summary as the eager
    evaluation during training, and a compiled training run completes and saves."""
    out, _ = trained
    code, stdout, stderr = run_cli("eval", "--checkpoint", str(out / "last.pt"), "--episodes", "3",
                                   "--workers", "0", "--backend", "torch", "--compile")
    assert code == 0, stderr
    with open(out / "metrics.json") as f:
        last = json.load(f)["last"]
    assert stdout.splitlines()[-1] == f"mIoU {100 * last['miou']:.2f} FB-IoU {100 * last['fb_iou']:.2f}"
    code, _, stderr = run_cli("train", *TINY, "--steps", "1", "--no-eval", "--compile", "--out", str(tmp_path))
    assert code == 0, stderr
    assert (tmp_path / "last.pt").is_file()


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_channels_last_flag_reaches_the_loaded_model(trained, command):
    from ipmt_fast.cli import _config_for_checkpoint, _load_model, build_parser

    out, _ = trained
    extra = ["--query", "q.png", "--support", "s.png", "--support-mask", "m.png"] if command == "predict" else []
    args = build_parser().parse_args([command, "--checkpoint", str(out / "last.pt"), "--channels-last", *extra])
    state, cfg = _config_for_checkpoint(args)
    model, _ = _load_model(cfg, state, "cpu")
    assert cfg.channels_last and model.map_layout == torch.channels_last


def test_compile_and_cuda_graphs_are_alternatives(tmp_path):
    code, _, stderr = run_cli("train", *TINY, "--steps", "1", "--compile", "--cuda-graphs", "--out", str(tmp_path))
    assert code == 2 and "compile and cuda_graphs are alternatives" in stderr


def test_predict_writes_overlay_and_mask(trained, tmp_path):
    out, _ = trained
    paths = {}
    for name, seed, size in (("query", 1, (30, 41)), ("support", 2, (37, 29))):
        image, label = render_scene(4, *size, np.random.default_rng(seed))
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(image).save(paths[name])
        if name == "support":
            paths["mask"] = str(tmp_path / "mask.png")
            Image.fromarray(label).save(paths["mask"])
    code, stdout, stderr = run_cli("predict", "--checkpoint", str(out / "best.pt"), "--query", paths["query"],
                                   "--support", paths["support"], "--support-mask", paths["mask"], "--class-id", "4",
                                   "--out", str(tmp_path / "overlay.png"), "--mask-out", str(tmp_path / "pred.png"))
    assert code == 0, stderr
    overlay, mask = Image.open(tmp_path / "overlay.png"), np.asarray(Image.open(tmp_path / "pred.png"))
    assert overlay.size == (41, 30) and mask.shape == (30, 41)
    assert set(np.unique(mask).tolist()) <= {0, 255} and "foreground:" in stdout


def test_published_config_keys(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text("DATA:\n  data_root: data/pascal\n  train_list: a.txt\n  val_list: b.txt\n  classes: 2\n"
                    "TRAIN:\n  layers: 101\n  train_h: 473\n  train_w: 473\n  val_size: 473\n  hidden_dims: 384\n"
                    "  ignore_label: 255\n  padding_label: 255\n  train_gpu: [0]\n  batch_size: 4\n  base_lr: 0.0025\n"
                    "  epochs: 200\n  split: 2\n  shot: 5\n  save_path: exp/model\n  weight:\n  resume:\n"
                    "  evaluate: True\n  use_coco: False\n  use_split_coco: False\n  resized_val: True\n"
                    "  ori_resize: True\nDistributed:\n  dist_url: tcp://127.0.0.1:6789\n  world_size: 1\n")
    cfg = make_config(str(path))
    assert (cfg.data, cfg.data_root, cfg.layers, cfg.reduce_dim, cfg.num_layers) == \
        ("pascal", "data/pascal", 101, 384, 5)
    assert (cfg.split, cfg.shot, cfg.out, cfg.weight, cfg.epochs, cfg.val_episodes, cfg.aux_weight) == \
        (2, 5, "exp/model", None, 200, 1000, 1.0)
    # Flags override the file.
    assert make_config(str(path), split=3).split == 3
    path.write_text("TRAIN:\n  hidden_dim: 384\n")
    with pytest.raises(ValueError, match="unknown key.*hidden_dim"):
        load_yaml_config(str(path))
    for name in ("synthetic.yaml", "pascal/pascal_split0_resnet50.yaml", "coco/coco_split0_resnet50.yaml"):
        load_yaml_config(os.path.join(os.path.dirname(__file__), "..", "configs", name))


def test_bad_inputs_give_clear_errors(trained, tmp_path):
    code, _, stderr = run_cli("train", "--data", "pascal", "--data-root", str(tmp_path / "nowhere"))
    assert code == 2 and f"data root not found: {tmp_path / 'nowhere'}" in stderr
    code, _, stderr = run_cli("train", "--data", "pascal", "--data-root", str(tmp_path))
    assert code == 2 and "list file not found: " + os.path.join(str(tmp_path), "lists", "pascal") in stderr
    code, _, stderr = run_cli("train", "--data", "pascal")
    assert code == 2 and "--data-root" in stderr
    out, _ = trained
    code, _, stderr = run_cli("eval", "--checkpoint", str(out / "last.pt"), "--reduce-dim", "16", "--episodes", "1")
    assert code == 2 and "wrong shape" in stderr and "adjust_feature_qry" in stderr


def test_published_checkpoint_layout_loads_and_other_architectures_are_refused(tmp_path):
    # The published layout: {'epoch', 'state_dict' with DataParallel's 'module.' prefix, 'optimizer'}.
    torch.manual_seed(0)
    weights = ipmt_fast.IPMT(reduce_dim=16, num_layers=1).state_dict()
    state = {"epoch": 3, "optimizer": {}, "state_dict": {f"module.{k}": v for k, v in weights.items()}}
    torch.save(state, tmp_path / "published.pth")
    common = ["--checkpoint", str(tmp_path / "published.pth"), "--data", "synthetic", "--image-size", "33",
              "--episodes", "2", "--workers", "0", "--no-progress"]
    code, stdout, stderr = run_cli("eval", *common, "--reduce-dim", "16", "--num-layers", "1")
    assert code == 0, stderr
    assert SUMMARY_LINE.match(stdout.splitlines()[-1])
    code, _, stderr = run_cli("eval", *common, "--reduce-dim", "32", "--num-layers", "2")
    assert code == 2 and "missing: " in stderr and "transformer." in stderr


# A damaged checkpoint given to any command ends in one line naming the file, never a traceback.
GARBAGE = b"\x00\x01not a checkpoint\n" * 64
DAMAGE_REASONS = {
    "truncated": "the file is truncated or corrupt (PytorchStreamReader failed reading zip archive",
    "garbage": "not a PyTorch checkpoint, or corrupt (UnpicklingError",
    "empty": "the file is empty or truncated",
    "list": "it holds a list, not a mapping of names to tensors",
    "incomplete": "incomplete ipmt-fast checkpoint, missing ",
}


def _damaged(kind, last, folder):
    path = folder / f"{kind}.pt"
    data = last.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])  # a real checkpoint cut in half
    elif kind == "garbage":
        path.write_bytes(GARBAGE)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    else:  # our format, with the entries after the architecture lost
        state = torch.load(last, weights_only=True)
        torch.save({k: state[k] for k in ("format", "version", "arch")}, path)
    return path


def _support_files(folder):
    image, label = render_scene(4, 30, 30, np.random.default_rng(0))
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(label).save(folder / "mask.png")
    return str(folder / "image.png"), str(folder / "mask.png")


@pytest.mark.parametrize("kind", list(DAMAGE_REASONS))
def test_damaged_checkpoints_end_in_one_line_naming_the_file(trained, tmp_path, kind):
    out, _ = trained
    path = _damaged(kind, out / "last.pt", tmp_path)
    image, mask = _support_files(tmp_path)
    calls = {"train --resume": ("train", *TINY, "--steps", "1", "--resume", str(path), "--out", str(tmp_path / "r")),
             "eval": ("eval", "--checkpoint", str(path), "--episodes", "1", "--workers", "0"),
             "predict": ("predict", "--checkpoint", str(path), "--query", image, "--support", image,
                         "--support-mask", mask, "--out", str(tmp_path / "p.png"))}
    if kind != "incomplete":  # --weight reads only the weights, of any layout
        calls["train --weight"] = ("train", *TINY, "--steps", "1", "--weight", str(path), "--out", str(tmp_path / "w"))
    for name, argv in calls.items():
        code, _, stderr = run_cli(*argv)
        expected = f"ipmt-fast {argv[0]}: error: cannot read checkpoint {path}: {DAMAGE_REASONS[kind]}"
        assert code == 2 and stderr.startswith(expected) and stderr.count("\n") == 1, (name, stderr)
