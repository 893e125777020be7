"""Whole-iteration CUDA graphs (ipmt_fast.train.graphs): refusals and plumbing on the CPU; on a
GPU, graphed training steps and inference against eager ones."""
import copy

import pytest
import torch

import ipmt_fast
from cli_runner import run_cli
from compare import assert_close, relative_error
from ipmt_fast.cli import _config_for_checkpoint, _overrides, build_parser, main
from ipmt_fast.train.config import load_yaml_config, make_config
from ipmt_fast.train.graphs import (CudaGraphError, GraphedForward, GraphedStep, _WarmupSnapshot,
                                    check_training_support, configure_optimizers_for_graphs)
from ipmt_fast.train.trainer import Trainer

SMALL = dict(layers=50, shot=1, reduce_dim=32, num_layers=1)
SIZE = 33
TINY = ["--data", "synthetic", "--image-size", str(SIZE), "--reduce-dim", "32", "--num-layers", "1",
        "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
# Graphed and eager steps run the same kernels; they may differ only where a kernel accumulates
# with atomics (grid_sample's backward, the deformable sampling's), whose order varies from run
# to run. So a parameter may be off the eager one by this much, or by a few times as much as two
# eager runs are off each other.
GRAPH_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}
NOISE_FACTOR = 4.0
STEPS = 4


def small_config(out, **overrides):
    values = dict(data="synthetic", train_h=SIZE, val_size=SIZE, reduce_dim=32, num_layers=1, batch_size=2,
                  steps=2 * STEPS, eval=False, eval_at_start=False, val_episodes=2, workers=0, progress=False,
                  out=str(out), synthetic_length=16, print_freq=1, aux_weight=1.0)
    values.update(overrides)
    return make_config(**values)


# --------------------------------------------------------------------------- CPU: refusals, plumbing
@pytest.fixture(scope="module")
def published_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "published.pth"
    torch.save({"state_dict": ipmt_fast.IPMT(**SMALL).state_dict()}, path)
    return path


def _assert_one_line_refusal(code, stderr, command):
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"ipmt-fast {command}: error: CUDA graphs (--cuda-graphs) need a CUDA device, got cpu")


def test_cli_refuses_cuda_graphs_on_the_cpu(published_file, tmp_path):
    code, _, stderr = run_cli("train", *TINY, "--steps", "1", "--cuda-graphs", "--out", str(tmp_path))
    _assert_one_line_refusal(code, stderr, "train")
    code, _, stderr = run_cli("eval", "--checkpoint", str(published_file), *TINY, "--episodes", "1", "--cuda-graphs")
    _assert_one_line_refusal(code, stderr, "eval")


def test_predict_refuses_cuda_graphs_on_the_cpu(published_file, tmp_path):
    import numpy as np
    from PIL import Image

    image = tmp_path / "image.png"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.ones((10, 10), np.uint8), 5)).save(mask)
    code, _, stderr = run_cli("predict", "--checkpoint", str(published_file), "--query", str(image), "--support",
                              str(image), "--support-mask", str(mask), "--reduce-dim", "32", "--num-layers", "1",
                              "--image-size", str(SIZE), "--device", "cpu", "--cuda-graphs",
                              "--out", str(tmp_path / "out.png"))
    _assert_one_line_refusal(code, stderr, "predict")


def test_training_settings_a_graph_cannot_take_are_refused():
    cuda = torch.device("cuda")  # only named, never touched
    with pytest.raises(CudaGraphError, match="--amp fp16.*--amp bf16"):
        check_training_support(cuda, amp="fp16")
    with pytest.raises(CudaGraphError, match="torchrun"):
        check_training_support(cuda, distributed=True)
    check_training_support(cuda, amp="bf16")
    with pytest.raises(CudaGraphError, match="CUDA device, got cpu"):
        check_training_support(torch.device("cpu"))


def test_graph_wrappers_refuse_a_cpu_model():
    model = ipmt_fast.IPMT(**SMALL)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CudaGraphError, match="CUDA device, got cpu"):
        GraphedStep(model, [sgd])
    with pytest.raises(CudaGraphError, match="CUDA device, got cpu"):
        GraphedForward(model.eval())


def test_unsupported_optimisers_are_refused():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(CudaGraphError, match="SGD and Adam/AdamW.*RMSprop"):
        configure_optimizers_for_graphs([torch.optim.RMSprop(params)], True)
    with pytest.raises(CudaGraphError, match="dampening"):
        configure_optimizers_for_graphs([torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)], True)


def test_undone_warmup_leaves_the_steps_of_a_fresh_start():
    """GraphedStep's warm-up steps are undone before capture: the weights restored and the state the
    warm-up created zeroed. From there SGD (fused, momentum) and AdamW take exactly the steps they
    would have taken with no warm-up at all."""
    torch.manual_seed(0)
    start = [torch.randn(5, 4), torch.randn(7)]
    warmup_grads, grads = ([[torch.randn_like(t) for t in start] for _ in range(3)] for _ in range(2))

    def take_steps(optimizers, params, grad_sets):
        for step_grads in grad_sets:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            for opt in optimizers:
                opt.step()

    def trained(warmup: bool):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizers = [torch.optim.SGD(params[:1], lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True),
                      torch.optim.AdamW(params[1:], lr=1e-2, weight_decay=1e-2)]
        if warmup:
            snapshot = _WarmupSnapshot(optimizers)
            take_steps(optimizers, params, warmup_grads)
            snapshot.restore()
        take_steps(optimizers, params, grads)
        return [p.detach() for p in params]

    for warmed, fresh in zip(trained(warmup=True), trained(warmup=False)):
        assert_close(warmed, fresh)


def test_cuda_graphs_config_key_and_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("cuda_graphs: true\namp: bf16\n")
    assert load_yaml_config(str(path)) == {"cuda_graphs": True, "amp": "bf16"}
    assert make_config(str(path)).cuda_graphs is True
    for command in ("train", "eval"):
        extra = ["--checkpoint", "x.pt"] if command == "eval" else []
        for flag, expected in (([], None), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)):
            assert build_parser().parse_args([command, *extra, *flag]).cuda_graphs is expected
    assert make_config(None, **_overrides(build_parser().parse_args(["train", "--cuda-graphs"]))).cuda_graphs


def test_eval_does_not_inherit_cuda_graphs_from_the_checkpoint(tmp_path):
    # A checkpoint of a graphed GPU run must evaluate anywhere: the flag belongs to the run.
    trainer = Trainer(small_config(tmp_path, steps=1), model=ipmt_fast.IPMT(**SMALL))
    trainer.cfg.cuda_graphs = True
    trainer.save_checkpoint(str(tmp_path / "graphed.pt"))
    args = build_parser().parse_args(["eval", "--checkpoint", str(tmp_path / "graphed.pt")])
    assert _config_for_checkpoint(args)[1].cuda_graphs is False


def test_a_checkpoint_of_a_graphed_run_resumes_eagerly(tmp_path):
    """A graphed run saves its optimisers in their graph-safe forms (fused SGD, capturable AdamW
    with device step counters); an eager run resuming from it gets the trainer's eager forms back
    (fused SGD and AdamW) and continues exactly as from the same checkpoint written eagerly."""
    torch.manual_seed(0)
    start = ipmt_fast.IPMT(**SMALL, backend="reference")
    first = Trainer(small_config(tmp_path / "first", steps=3), model=copy.deepcopy(start))
    first.fit(until=1)
    eager_path = tmp_path / "first" / "last.pt"
    state = torch.load(eager_path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    for group in state["transformer_optimizer"]["param_groups"]:
        group["capturable"], group["fused"] = True, None
    graphed_path = tmp_path / "graphed.pt"
    torch.save(state, graphed_path)

    results = []
    for path in (eager_path, graphed_path):
        resumed = Trainer(small_config(tmp_path / path.stem, steps=3, resume=str(path)), model=copy.deepcopy(start))
        assert [g["fused"] for g in resumed.optimizer.param_groups] == [True]
        assert [(g["capturable"], g["fused"]) for g in resumed.transformer_optimizer.param_groups] == \
            [(False, True), (False, True)]
        resumed.fit()
        results.append({n: p.detach().clone() for n, p in resumed.model.named_parameters()})
    for name, expected in results[0].items():
        assert_close(results[1][name], expected, name=name)


# --------------------------------------------------------------------------- CUDA
@pytest.fixture
def exact_gpu_arithmetic():
    """No TF32, and PyTorch's own convolutions instead of cuDNN's (whose float64 algorithm choice,
    and so result, was seen to change between calls on an H100; see test_model_backends)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.enabled)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.enabled = False
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.enabled) = saved


def _start_model(dtype, dropout: bool, backend="reference"):
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(**SMALL, backend=backend).to(dtype)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0
    # Off the bilinear kinks of the published init (see test_trainer): no one-sided derivatives.
    with torch.no_grad():
        for layer in model.transformer.qry_self_layers:
            layer.sampling_offsets.bias.add_(torch.linspace(0.01, 0.03, layer.sampling_offsets.bias.numel(),
                                                            dtype=dtype))
    return model


def _train(model, out, graphs, steps=STEPS, seed=None, **overrides):
    """``steps`` training steps on the same batches; returns (losses (steps, 3), parameters, trainer)."""
    trainer = Trainer(small_config(out, device="cuda", cuda_graphs=graphs, **overrides), model=copy.deepcopy(model))
    trainer.model.train()
    trainer.sampler.set_epoch(0)
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    for batch in trainer.train_loader:
        losses.append(torch.stack(list(trainer.train_step(batch).values())))
        if len(losses) == steps:
            break
    return torch.stack(losses), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer


@CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend,clip,channels_last", [("reference", None, False), ("auto", 0.5, False),
                                                        ("auto", None, True)])
def test_graphed_steps_match_eager_steps(tmp_path, exact_gpu_arithmetic, dtype, backend, clip, channels_last):
    model = _start_model(dtype, dropout=False, backend=backend).set_channels_last(channels_last)
    eager, eager_again, graphed = (_train(model, tmp_path / name, graphs, clip_grad_norm=clip)
                                   for name, graphs in (("eager", False), ("eager2", False), ("graphed", True)))
    assert graphed[2].graphed_step.captures == 1
    rtol = GRAPH_RTOL[dtype]
    assert_close(graphed[0], eager[0], rtol=max(rtol, NOISE_FACTOR * relative_error(eager_again[0], eager[0])),
                 name="losses")
    for name, expected in eager[1].items():
        noise = relative_error(eager_again[1][name], expected)
        assert_close(graphed[1][name], expected, rtol=max(rtol, NOISE_FACTOR * noise), name=name)


@CUDA
def test_dropout_masks_are_fresh_at_every_replay_and_losses_track_eager(tmp_path):
    model = _start_model(torch.float32, dropout=True)
    masks = []

    def hook(module, inputs, output):
        # Channels Dropout2d zeroed, per image. The hook runs while capturing, so its result is a
        # tensor of the graph that every replay rewrites.
        masks.append((output == 0).flatten(2).all(-1))

    trainer = Trainer(small_config(tmp_path / "graphed", device="cuda", cuda_graphs=True), model=copy.deepcopy(model))
    handle = trainer.model.adjust_feature_qry[-1].register_forward_hook(hook)
    trainer.model.train()
    trainer.sampler.set_epoch(0)
    replayed, graphed_losses = [], []
    for batch in trainer.train_loader:
        graphed_losses.append(trainer.train_step(batch)["loss"])
        replayed.append(masks[-1].clone())
        if len(replayed) == 2 * STEPS:
            break
    handle.remove()
    assert trainer.graphed_step.captures == 1
    for earlier, later in zip(replayed, replayed[1:]):
        assert not torch.equal(earlier, later), "a replay reused the previous replay's dropout mask"
    assert all(0.2 < m.float().mean().item() < 0.8 for m in replayed)  # Dropout2d(0.5) drops half the channels
    eager = [_train(model, tmp_path / f"eager{seed}", False, steps=2 * STEPS, seed=seed)[0][:, 0] for seed in (1, 2)]
    graphed = torch.stack(graphed_losses)
    noise = (eager[0] - eager[1]).abs().mean()
    assert (graphed - eager[0]).abs().mean() <= 3 * noise, (graphed, eager)


@CUDA
def test_bf16_graphed_steps_train_like_eager(tmp_path):
    model = _start_model(torch.float32, dropout=False)
    eager, _, _ = _train(model, tmp_path / "eager", False, amp="bf16")
    graphed, _, _ = _train(model, tmp_path / "graphed", True, amp="bf16")
    assert torch.isfinite(graphed).all()
    assert_close(graphed, eager, rtol=2e-2, name="bf16 losses")


@CUDA
def test_shape_change_recaptures_or_is_refused():
    model = _start_model(torch.float32, dropout=True).cuda().train()
    optimizers = [torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)]

    def batch(size):
        labels = torch.zeros(2, size, size)
        labels[:, size // 4: size // 2, size // 4: size // 2] = 1
        return {"image": torch.randn(2, 3, size, size), "support_images": torch.randn(2, 1, 3, size, size),
                "support_labels": labels[:, None].clone(), "label": labels}

    strict = GraphedStep(model, optimizers, recapture_on_shape_change=False)
    strict.step(batch(SIZE))
    with pytest.raises(CudaGraphError, match=r"\[2, 3, 33, 33\].*got \[2, 3, 41, 41\]"):
        strict.step(batch(SIZE + 8))
    flexible = GraphedStep(model, optimizers)
    for size in (SIZE, SIZE + 8, SIZE + 8):
        losses = flexible.step(batch(size))
    assert flexible.captures == 2 and all(torch.isfinite(v) for v in losses.values())
    assert flexible.pool_bytes > 0


@CUDA
def test_resume_recaptures_and_continues_the_run(tmp_path, exact_gpu_arithmetic):
    model = _start_model(torch.float64, dropout=False)
    straight = _train(model, tmp_path / "straight", True, steps=2 * STEPS)[1]
    options = dict(device="cuda", cuda_graphs=True, steps=2 * STEPS)
    first = Trainer(small_config(tmp_path / "resumed", **options), model=copy.deepcopy(model))
    first.fit(until=STEPS)
    assert first.graphed_step.captures == 1
    first.load_checkpoint(str(tmp_path / "resumed" / "last.pt"))  # replaces the optimiser state: recapture
    assert first.graphed_step.pool_bytes is None
    resumed = Trainer(small_config(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "last.pt"), **options),
                      model=copy.deepcopy(model))
    resumed.fit()
    assert resumed.graphed_step.captures == 1 and resumed.iteration == 2 * STEPS
    for name, expected in straight.items():
        assert_close(resumed.model.state_dict()[name], expected, rtol=GRAPH_RTOL[torch.float64] * 1e3, name=name)


@CUDA
def test_graphed_forward_matches_eager_per_shape(exact_gpu_arithmetic):
    model = _start_model(torch.float32, dropout=True).cuda().eval()
    graphed = GraphedForward(model, max_shapes=1)
    for size in (SIZE, SIZE + 8, SIZE):
        torch.manual_seed(size)
        x, s_x = torch.randn(1, 3, size, size, device="cuda"), torch.randn(1, 1, 3, size, size, device="cuda")
        s_y = (torch.rand(1, 1, size, size, device="cuda") > 0.5).float()
        with torch.no_grad():
            expected = model(x, s_x, s_y)
        assert_close(graphed(x, s_x, s_y), expected, rtol=GRAPH_RTOL[torch.float32], name=f"logits {size}")
    assert graphed.captures == 1  # max_shapes=1: the latest shape only


@CUDA
def test_cli_train_and_eval_with_cuda_graphs(tmp_path):
    gpu = [a if a != "cpu" else "cuda" for a in TINY]
    code, stdout, stderr = run_cli("train", *gpu, "--steps", "3", "--val-episodes", "3", "--eval-every", "3",
                                   "--cuda-graphs", "--out", str(tmp_path))
    assert code == 0, stderr
    results = [run_cli("eval", "--checkpoint", str(tmp_path / "last.pt"), *gpu, "--episodes", "3", *flag)
               for flag in ([], ["--cuda-graphs"])]
    assert all(code == 0 for code, _, _ in results), results
    assert results[0][1].splitlines()[-1] == results[1][1].splitlines()[-1] == stdout.splitlines()[-1]
