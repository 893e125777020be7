"""Data parallelism on the CPU: two gloo processes on loopback against one process."""
import functools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from compare import assert_close

import ipmt_fast
from ipmt_fast.model.transformer import MODEL_OPS
from ipmt_fast.train.config import make_config
from ipmt_fast.train import trainer as trainer_module
from ipmt_fast.train.trainer import Trainer

SMALL = dict(layers=50, shot=1, reduce_dim=32, num_layers=1)
QUICK_TUNING = dict(rounds=1, calls_per_round=1, warmup=1)
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step(out_dir, global_batch, tune=False):
    """Build the same float64 model (dropout off: ranks draw other masks than one process would),
    take one training step on the first global batch, return this process's gradients and weights
    (and with ``tune``, the backends the trainer tuned)."""
    if tune:  # compiled against torch (the Triton interpreter's kernels would take minutes), one
        # timed call each: what is checked is which choices the ranks run, not how well they time.
        ipmt_fast.tuning.EXCLUDED_BY_DEFAULT = ("reference", "triton")
        trainer_module.tune_backends = functools.partial(ipmt_fast.tune_backends, **QUICK_TUNING)
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(**SMALL, backend="torch").double()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    cfg = make_config(data="synthetic", train_h=33, val_size=33, reduce_dim=32, num_layers=1,
                      batch_size=global_batch, steps=3, eval=False, workers=0, progress=False, out=str(out_dir),
                      synthetic_length=8, aux_weight=1.0, tune_backends=tune)
    trainer = Trainer(cfg, model=model)
    model.train()
    trainer.sampler.set_epoch(0)
    losses = trainer.train_step(next(iter(trainer.train_loader)))
    return {"loss": losses["loss"],
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "op_backends": model.op_backends, "tuned": trainer.tuning.choices if tune else None}


def rank_worker(rank, world_size, port, out_dir, tune):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    result = one_step(out_dir, global_batch=2, tune=tune)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


# Tuned: each rank times its own share of the first batch, and every rank runs rank 0's choices.
@pytest.mark.parametrize("tune", [False, True], ids=["", "tune-backends"])
def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path, monkeypatch, tune):
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    mp.spawn(rank_worker, args=(2, free_port(), str(tmp_path), tune), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = one_step(tmp_path / "single", global_batch=2)
    if tune:
        assert ranks[0]["op_backends"] == ranks[1]["op_backends"] == ranks[0]["tuned"]
        assert set(ranks[0]["tuned"]) == set(MODEL_OPS) and set(ranks[0]["tuned"].values()) <= {"compiled", "torch"}

    assert ranks[0]["grads"].keys() == single["grads"].keys() == ranks[1]["grads"].keys()
    for name, grad in single["grads"].items():
        # DDP averages the ranks' gradients: every rank holds the combined-batch gradient.
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        assert_close(ranks[0]["grads"][name], grad, rtol=1e-9, name=f"gradient of {name}")
    for name, weight in single["weights"].items():
        assert_close(ranks[0]["weights"][name], weight, rtol=1e-9, name=name)
    # Each rank's loss is its half of the batch; their mean is the single process's loss.
    assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"], rtol=1e-12, name="loss")


def test_torchrun_trains_and_evaluates_like_one_process(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    args = ["--data", "synthetic", "--image-size", "33", "--reduce-dim", "32", "--num-layers", "1", "--workers", "0",
            "--backend", "torch", "--no-progress"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "ipmt_fast"]
    train = subprocess.run(command + ["train", *args, "--batch-size", "2", "--steps", "1", "--no-eval-at-start",
                                      "--val-episodes", "5", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert {"last.pt", "best.pt", "metrics.json"} <= set(os.listdir(out))
    with open(out / "metrics.json") as f:
        last = json.load(f)["last"]
    assert last["episodes"] == 5  # rank 0 scored episodes 0, 2, 4 and rank 1 episodes 1, 3: summed
    # The same checkpoint evaluated by one process gives the same line.
    from test_cli import run_cli

    code, stdout, stderr = run_cli("eval", "--checkpoint", str(out / "last.pt"), "--episodes", "5", "--workers", "0",
                                   "--backend", "torch")
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == f"mIoU {100 * last['miou']:.2f} FB-IoU {100 * last['fb_iou']:.2f}"
