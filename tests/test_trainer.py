"""Trainer: published optimiser groups and schedule, backend equivalence, exact resume, checkpoints."""
import copy
import functools
import json
import os

import pytest
import torch
from compare import assert_close, assert_low_precision_close

import ipmt_fast
from ipmt_fast.ops import registry
from ipmt_fast.train import trainer as trainer_module
from ipmt_fast.train.config import make_config
from ipmt_fast.train.trainer import Trainer, build_optimizers, load_checkpoint_file

SMALL = dict(layers=50, shot=1, reduce_dim=32, num_layers=1)
SIZE = 33


def small_config(out, **overrides):
    values = dict(data="synthetic", train_h=SIZE, val_size=SIZE, reduce_dim=32, num_layers=1, batch_size=2,
                  steps=4, eval=False, eval_at_start=False, val_episodes=2, workers=0, progress=False,
                  out=str(out), synthetic_length=16, print_freq=1, aux_weight=1.0)
    values.update(overrides)
    return make_config(**values)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return ipmt_fast.IPMT(**SMALL, backend="reference")


def test_optimizer_groups_follow_the_published_recipe(small_model, tmp_path):
    cfg = small_config(tmp_path)
    sgd, adamw = build_optimizers(small_model, cfg)
    names = {id(p): n for n, p in small_model.named_parameters()}
    sgd_names = {names[id(p)] for g in sgd.param_groups for p in g["params"]}
    weight_names = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    bias_names = {names[id(p)] for p in adamw.param_groups[1]["params"]}
    trainable = {n for n, p in small_model.named_parameters() if p.requires_grad}
    assert sgd_names | weight_names | bias_names == trainable
    assert not (sgd_names & weight_names or sgd_names & bias_names or weight_names & bias_names)
    assert all(not n.startswith("transformer.") for n in sgd_names) and sgd_names
    assert all(n.startswith("transformer.") and "bias" not in n for n in weight_names) and weight_names
    assert all(n.startswith("transformer.") and "bias" in n for n in bias_names) and bias_names
    assert not any(n.startswith("backbone.") for n in trainable)
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.9, 1e-4)
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-2, 0.0]
    assert adamw.defaults["lr"] == 1e-4


def _optimizer_trajectory(model, cfg, fast, dtype, steps=3):
    """Weights after ``steps`` SGD + AdamW steps from ``model`` in ``dtype``, on gradients drawn from
    one seed (the same for every call)."""
    model = copy.deepcopy(model).to(dtype)
    optimizers = build_optimizers(model, cfg, fast=fast)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for _, p in trainable:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
        for opt in optimizers:
            opt.step()
    assert all(g.get("fused") is (True if fast else None) for opt in optimizers for g in opt.param_groups)
    return {n: p.detach().clone() for n, p in trainable}


# The fused optimisers order their arithmetic differently from the default forms: after 3 steps
# in float64, measured up to 1.04 ulps of a weight's scale apart (AdamW; SGD 0.23, in one bias).
FUSED_FLOAT64_ULPS = 2


def test_fused_optimizers_step_as_the_published_defaults(small_model, tmp_path):
    """The trainer's fused SGD and AdamW take the default forms' steps: within ``FUSED_FLOAT64_ULPS``
    in float64, and in float32 within the adaptive bound of the default form's own error against
    the float64 trajectory."""
    cfg = small_config(tmp_path)
    cfg.base_lr, cfg.transformer_lr = 0.05, 0.01  # steps large enough to move every weight
    oracle = _optimizer_trajectory(small_model, cfg, False, torch.float64)
    fused64 = _optimizer_trajectory(small_model, cfg, True, torch.float64)
    default32 = _optimizer_trajectory(small_model, cfg, False, torch.float32)
    fused32 = _optimizer_trajectory(small_model, cfg, True, torch.float32)
    initial = dict(small_model.named_parameters())
    for name, expected in oracle.items():
        assert not torch.equal(expected, initial[name].double()), name
        assert_close(fused64[name], expected, rtol=FUSED_FLOAT64_ULPS * torch.finfo(torch.float64).eps, name=name)
        assert_low_precision_close(fused32[name], default32[name], expected, name=name)


def test_poly_schedule_scaled_by_15_and_constant_transformer_lr(small_model, tmp_path):
    trainer = Trainer(small_config(tmp_path, steps=10), model=copy.deepcopy(small_model))
    assert trainer.learning_rates(1) == pytest.approx((0.0025 * 15 * (1 - 1 / 10) ** 0.9, 1e-4))
    assert trainer.learning_rates(5) == pytest.approx((0.0025 * 15 * 0.5 ** 0.9, 1e-4))
    assert trainer.learning_rates(10) == pytest.approx((0.0, 1e-4))
    # One step sets the groups to the iteration-1 rates.
    trainer.model.train()
    trainer.sampler.set_epoch(0)
    trainer.train_step(next(iter(trainer.train_loader)))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0025 * 15 * 0.9 ** 0.9)
    assert [g["lr"] for g in trainer.transformer_optimizer.param_groups] == [1e-4, 1e-4]


def _train_losses_and_weights(model, tmp_path, steps):
    return _losses_and_weights(Trainer(small_config(tmp_path, steps=steps, batch_size=1), model=model), steps)


def _losses_and_weights(trainer, steps):
    trainer.model.train()
    trainer.sampler.set_epoch(0)
    losses = []
    for batch in trainer.train_loader:
        losses.append(torch.stack(list(trainer.train_step(batch).values())))
        if len(losses) == steps:
            break
    return torch.stack(losses), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


# Three optimiser steps (SGD and AdamW as published) from the published initialisation, where
# every deformable sampling point lies on a pixel centre (a kink of bilinear sampling): the fused
# backends take grid_sample's one-sided derivatives there, so they follow the reference's
# trajectory from step 0. The Triton interpreter's kernels accumulate in float32.
TRAJECTORY_STEPS = 3
TRAJECTORY_CASES = [("torch", torch.float64, 1e-9), ("compiled", torch.float64, 1e-9),
                    ("torch", torch.float32, 1e-4), ("compiled", torch.float32, 1e-4),
                    ("triton", torch.float32, 1e-4)]


@pytest.mark.parametrize("backend,dtype,rtol", TRAJECTORY_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d, _ in
                                                                       TRAJECTORY_CASES])
def test_fused_backends_follow_the_reference_trajectory_from_the_published_init(small_model, tmp_path, backend,
                                                                                  dtype, rtol):
    for op in registry.registered_ops():
        try:
            registry.get_implementation(op, registry.resolve_backend_name(op, backend), torch.device("cpu"))
        except RuntimeError as error:
            pytest.skip(str(error))
    start = copy.deepcopy(small_model).to(dtype)
    results = []
    for name in ("reference", backend):
        model = copy.deepcopy(start).set_backend(name)
        results.append(_train_losses_and_weights(model, tmp_path / name, TRAJECTORY_STEPS))
    (ref_losses, ref_weights), (fused_losses, fused_weights) = results
    assert_close(fused_losses, ref_losses, rtol=rtol, name="losses")
    for name, ref in ref_weights.items():
        assert_close(fused_weights[name], ref, rtol=rtol, name=name)


def test_tuned_backends_follow_the_same_trajectory(small_model, tmp_path, monkeypatch, compiled_extension):
    """``tune_backends``: the trainer tunes on the first batch before training, the model runs the
    choices, and the run's losses and weights are the untuned run's (tuning leaves the weights
    and the random stream as it found them; the backends agree in float64)."""
    # The Triton interpreter's kernels are minutes of tuning at these sizes: compiled against torch,
    # one timed call each (what is checked is what tuning leaves behind, not how well it times).
    monkeypatch.setattr(ipmt_fast.tuning, "EXCLUDED_BY_DEFAULT", ("reference", "triton"))
    monkeypatch.setattr(trainer_module, "tune_backends",
                        functools.partial(ipmt_fast.tune_backends, rounds=1, calls_per_round=1, warmup=1))
    start = copy.deepcopy(small_model).to(torch.float64).set_backend("auto")
    expected = _train_losses_and_weights(copy.deepcopy(start), tmp_path / "auto", TRAJECTORY_STEPS)
    trainer = Trainer(small_config(tmp_path / "tuned", steps=TRAJECTORY_STEPS, batch_size=1, tune_backends=True),
                      model=copy.deepcopy(start))
    assert trainer.tuning.initial == dict.fromkeys(trainer.model.ops, "compiled")
    assert trainer.model.op_backends == trainer.tuning.choices
    assert all(set(times) == {"compiled", "torch"} for times in trainer.tuning.timings.values())
    losses, weights = _losses_and_weights(trainer, TRAJECTORY_STEPS)
    assert_close(losses, expected[0], rtol=1e-9, name="losses")
    for name, ref in expected[1].items():
        assert_close(weights[name], ref, rtol=1e-9, name=name)


def _state_of(path):
    state = load_checkpoint_file(path)
    return state["state_dict"], state["optimizer"], state["transformer_optimizer"], state["history"]


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _csv_rows(path):
    with open(path) as f:
        return f.read().splitlines()


def test_resume_is_bit_exact_and_keeps_the_best(small_model, tmp_path):
    # Evaluations every 2 steps run inside both runs: they must not disturb training either.
    options = dict(steps=4, eval=True, eval_every=2, eval_at_start=True, val_episodes=2)
    straight = Trainer(small_config(tmp_path / "straight", **options), model=copy.deepcopy(small_model))
    summary = straight.fit()
    first = Trainer(small_config(tmp_path / "resumed", **options), model=copy.deepcopy(small_model))
    first.fit(until=2)
    assert first.iteration == 2
    resumed = Trainer(small_config(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "last.pt"), **options),
                      model=copy.deepcopy(small_model))
    assert resumed.iteration == 2
    resumed.fit()

    _assert_same(_state_of(tmp_path / "straight" / "last.pt"), _state_of(tmp_path / "resumed" / "last.pt"))
    losses = [row.split(",")[4:7] for row in _csv_rows(tmp_path / "straight" / "train_log.csv")]
    assert losses == [row.split(",")[4:7] for row in _csv_rows(tmp_path / "resumed" / "train_log.csv")]
    assert len(losses) == 1 + 4

    # Outputs: last.pt, best.pt (the best validation mIoU), metrics.json, no temporary files.
    out = tmp_path / "straight"
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "metrics.json", "train_log.csv", "val_log.csv"]
    history = summary["evaluations"]
    assert [r["iteration"] for r in history] == [0, 2, 4]
    best = load_checkpoint_file(out / "best.pt")
    best_record = max(history, key=lambda r: r["miou"])
    assert best["iteration"] == best_record["iteration"] and best["best_miou"] == best_record["miou"]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["best"] == best_record and metrics["iteration"] == 4
    last = load_checkpoint_file(out / "last.pt")
    assert last["iteration"] == 4 and last["arch"] == SMALL
    assert set(last["rng"][0]) >= {"python", "numpy", "torch"} and last["sampler"]["epoch"] == 0


def test_resume_refuses_another_architecture(small_model, tmp_path):
    trainer = Trainer(small_config(tmp_path, steps=1), model=copy.deepcopy(small_model))
    trainer.save_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(ValueError, match="reduce_dim"):
        Trainer(small_config(tmp_path, steps=1, reduce_dim=16, resume=str(tmp_path / "ckpt.pt")))


def test_unreadable_training_files_are_skipped_and_reported(tmp_path):
    from test_data import write_layout

    pairs = write_layout(str(tmp_path), [(6,), (6,), (6,), (7,), (7,), (7,)])
    (tmp_path / "train.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    broken = tmp_path / pairs[1][0]
    broken.write_bytes(b"\x89PNG broken")
    torch.manual_seed(0)
    cfg = small_config(tmp_path / "run", data="pascal", data_root=str(tmp_path),
                       train_list=str(tmp_path / "train.txt"), steps=3)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        summary = Trainer(cfg, model=ipmt_fast.IPMT(**SMALL)).fit()
    assert list(summary["skipped_files"]) == [str(broken)]
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["skipped_files"] == summary["skipped_files"]


def test_calibration_normalises_a_random_backbone(small_model):
    from ipmt_fast.model.backbone import FrozenBatchNorm2d
    from ipmt_fast.train.trainer import calibrate_frozen_batchnorm

    backbone = copy.deepcopy(small_model.backbone)
    images = torch.randn(3, 3, SIZE, SIZE) * 50
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.clone())) for m in backbone.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    calibrate_frozen_batchnorm(backbone, images)
    outputs.clear()
    with torch.no_grad():
        backbone(images)
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 3 + 16 * 3 + 4  # stem, bottlenecks, downsample branches of ResNet-50
    for out in outputs:
        assert_close(out.mean((0, 2, 3)), torch.zeros(out.shape[1]), atol=1e-3, name="channel means")
        assert_close(out.var((0, 2, 3), unbiased=False), torch.ones(out.shape[1]), atol=1e-2, name="channel variances")
    assert all(torch.equal(a, b) for a, b in zip(backbone.parameters(), small_model.backbone.parameters()))


def _autocast_step(small_model, out, amp, backend):
    """Losses and the whole gradient vector of one trainer step under ``amp`` with ``backend``."""
    trainer = Trainer(small_config(out, steps=2, batch_size=1, amp=amp),
                      model=copy.deepcopy(small_model).set_backend(backend))
    trainer.model.train()
    trainer.sampler.set_epoch(0)
    torch.manual_seed(0)
    losses = trainer.train_step(next(iter(trainer.train_loader)))
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    gradients = torch.cat([p.grad.flatten().double() for _, p in sorted(trainer.model.named_parameters())
                           if p.grad is not None])
    return torch.stack(list(losses.values())), gradients


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step(small_model, tmp_path, amp):
    """A bf16 / fp16 step of the default backend against the float32 oracle: losses and the whole
    gradient within twice the reference backend's own error in that precision. In fp16 the
    scaler's first scale (2**16) overflows the half-precision gradients, so it skips the step for
    both backends alike: their gradients are then compared for that, not for values."""
    oracle = _autocast_step(small_model, tmp_path / "oracle", "none", "reference")
    reference = _autocast_step(small_model, tmp_path / "reference", amp, "reference")
    fused = _autocast_step(small_model, tmp_path / "auto", amp, "auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert_low_precision_close(fused[0], reference[0], oracle[0], dtype, name="losses")
    fused_finite, reference_finite = bool(fused[1].isfinite().all()), bool(reference[1].isfinite().all())
    assert fused_finite == reference_finite == (amp == "bf16")
    if reference_finite:
        assert_low_precision_close(fused[1], reference[1], oracle[1], dtype, name="gradients")


def test_gradient_clipping_bounds_the_step(small_model, tmp_path):
    trainer = Trainer(small_config(tmp_path, steps=2, batch_size=1, clip_grad_norm=1e-3),
                      model=copy.deepcopy(small_model))
    trainer.model.train()
    trainer.sampler.set_epoch(0)
    trainer.train_step(next(iter(trainer.train_loader)))
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 1e-3 * (1 + 1e-5)
