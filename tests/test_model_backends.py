"""Full model: every backend against the reference with the same weights and dropout masks, at the
published initialisation (every deformable sampling point on a pixel centre: a kink of bilinear
sampling) and off it."""
import pytest
import torch
from compare import assert_close, assert_low_precision_close

import ipmt_fast

FUSED_BACKENDS = ["torch", "triton", "compiled"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Relative tolerances of the issue: float64 on the torch/compiled backends, float32 for all.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
# The Triton kernels accumulate in float32 even for float64 inputs where tl.dot runs in tf32 on
# GPUs, so Triton is compared in float32 only.
DTYPES = {"torch": [torch.float64, torch.float32], "compiled": [torch.float64, torch.float32],
          "triton": [torch.float32]}
DIM, SIZE = 16, 65


@pytest.fixture(autouse=True)
def exact_gpu_convolutions():
    """Full precision on GPUs. TF32 convolutions and matmuls (cuDNN's default) round inputs to 10
    mantissa bits, which turns float32 rounding differences between backends into 1e-3 ones; and
    cuDNN's float64 convolutions were measured 5e-8 (relative) off the CPU on an H100, with the
    algorithm (and so the result) changing between calls, so float64 runs use PyTorch's own."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.enabled)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.enabled = False
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.enabled) = saved


# "published": the published initialisation as it is (offset and attention-weight layers zero);
# "perturbed": those weights drawn small, so every point samples off the pixel grid.
INITS = ("published", "perturbed")


def build(dtype, device, init="published", num_layers=2, shot=2):
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(reduce_dim=DIM, num_layers=num_layers, shot=shot, backend="reference")
    if init == "perturbed":
        with torch.no_grad():
            for layer in model.transformer.qry_self_layers:
                layer.sampling_offsets.weight.normal_(0, 0.05)
                layer.attention_weights.weight.normal_(0, 0.05)
    return model.to(device=device, dtype=dtype)


def episode(dtype, device, batch=2, shot=2):
    g = torch.Generator().manual_seed(1)
    # Unit-scale images: the random-weight backbone is positively homogeneous, and ImageNet-scale
    # inputs (std ~50) would give support logits spread over hundreds, a saturated softmax whose
    # float32 gradients are rounding noise for every backend alike.
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    s_x = torch.randn(batch, shot, 3, SIZE, SIZE, generator=g)
    s_y = (torch.rand(batch, shot, SIZE, SIZE, generator=g) > 0.6).long()
    s_y[:, 0, -5:] = 255
    y = (torch.rand(batch, SIZE, SIZE, generator=g) > 0.5).long()
    y[:, :, -9:] = 255
    return [t.to(device) for t in (x.to(dtype), s_x.to(dtype), s_y, y)]


def run_transformer(model, dtype, device, train):
    g = torch.Generator().manual_seed(2)
    h = (SIZE - 1) // 8 + 1
    _, _, s_y, y = episode(dtype, device)
    x = torch.randn(2, DIM, h, h, generator=g).to(device, dtype)
    s_x = torch.randn(4, DIM, h, h, generator=g).to(device, dtype)
    init_mask = torch.randint(0, 2, (2, h, h), generator=g).to(device)
    model.transformer.train(train)
    torch.manual_seed(5)
    feats, query_logits, support_logits = model.transformer(x, y.to(dtype), s_x, s_y.to(dtype), init_mask)
    return [feats[0]] + query_logits + support_logits


def run_training_step(model, dtype, device):
    x, s_x, s_y, y = episode(dtype, device)
    model.train()
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks for every backend
    pred, main_loss, aux_loss = model(x, s_x, s_y, y)
    (main_loss + aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        logits = model(x, s_x, s_y, y)
    return pred, main_loss, aux_loss, grads, logits


def _check_available(backend, device):
    for op in ipmt_fast.ops.registry.registered_ops():
        name = ipmt_fast.ops.registry.resolve_backend_name(op, backend)
        try:
            ipmt_fast.ops.registry.get_implementation(op, name, torch.device(device))
        except RuntimeError as err:
            pytest.skip(str(err))


# The compiled backend also with its CPU-only paths off (on the CPU): the ATen compositions and
# library convolutions its CUDA kernels run.
BACKEND_CASES = [pytest.param(b, d, True, id=f"{b}-{d}") for b in FUSED_BACKENDS for d in DTYPES[b]]
BACKEND_CASES += [pytest.param("compiled", d, False, id=f"compiled-without-cpu-paths-{d}") for d in DTYPES["compiled"]]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,dtype,cpu_paths", BACKEND_CASES)
def test_full_model_matches_reference(backend, dtype, cpu_paths, device, init, request):
    _check_available(backend, device)
    if not cpu_paths:
        if device != "cpu":
            pytest.skip("the CPU paths switch changes nothing on CUDA")
        request.getfixturevalue("without_cpu_paths")
    tol = TOLERANCE[dtype]
    # The float64 oracle is the reference on the CPU: on an H100 the CUDA reference's first calls
    # were measured 5e-8 (relative) off it while every later CUDA call, fused or not, agreed with
    # it to 6e-16 (NOTES.md).
    # CPU and CUDA draw different dropout masks, so that comparison runs with dropout off.
    oracle_device = "cpu" if dtype == torch.float64 else device
    oracle, model = build(dtype, oracle_device, init), build(dtype, device, init).set_backend(backend)
    if oracle_device != device:
        for m in (*oracle.modules(), *model.modules()):
            if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
                m.p = 0.0
    expected_maps = [[t.to(device) for t in run_transformer(oracle, dtype, oracle_device, train)]
                     for train in (False, True)]
    expected = [t.to(device) if isinstance(t, torch.Tensor) else {n: g.to(device) for n, g in t.items()}
                for t in run_training_step(oracle, dtype, oracle_device)]
    got_maps = [run_transformer(model, dtype, device, train) for train in (False, True)]
    got = run_training_step(model, dtype, device)

    for mode, exp, out in zip(("eval", "train"), expected_maps, got_maps):
        assert len(out) == 1 + 3 * 2
        for i, (e, o) in enumerate(zip(exp, out)):
            assert_close(o, e, rtol=tol, name=f"{backend} transformer output {i} ({mode})")
    assert_same_training_step(got, expected, tol, backend)


def assert_same_training_step(got, expected, tol, what):
    """``run_training_step`` results: the same prediction, losses, eval logits and gradients."""
    pred, main_loss, aux_loss, grads, logits = got
    assert torch.equal(pred, expected[0])
    assert_close(main_loss, expected[1], rtol=tol, name="main loss")
    assert_close(aux_loss, expected[2], rtol=tol, name="aux loss")
    assert_close(logits, expected[4], rtol=tol, name="eval logits")
    assert grads.keys() == expected[3].keys()
    for name, g in grads.items():
        assert_close(g, expected[3][name], rtol=tol, name=f"{what} gradient of {name}")


def _flat_gradients(grads):
    return torch.cat([g.flatten().double() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_bf16_autocast_training_step(backend):
    """Under bf16 autocast the ops take the autocast dtype (like nn.Linear) and the losses stay
    float32; losses and the whole gradient are within twice the reference form's own bf16 error
    of the float32 oracle."""
    _check_available(backend, "cpu")
    oracle = run_training_step(build(torch.float32, "cpu").set_backend("reference"), torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = run_training_step(build(torch.float32, "cpu").set_backend("reference"), torch.float32, "cpu")
        fused = run_training_step(build(torch.float32, "cpu").set_backend(backend), torch.float32, "cpu")
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32
    for i, name in ((1, "main loss"), (2, "aux loss")):
        assert_low_precision_close(fused[i], reference[i], oracle[i], torch.bfloat16, name=name)
    assert fused[3].keys() == oracle[3].keys()
    assert_low_precision_close(_flat_gradients(fused[3]), _flat_gradients(reference[3]), _flat_gradients(oracle[3]),
                               torch.bfloat16, name="all gradients")


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_recompute_ffn_changes_nothing(backend):
    """Recomputing the FFN hidden activations in backward gives bit-identical losses and gradients."""
    _check_available(backend, "cpu")
    results = [run_training_step(build(torch.float64, "cpu").set_backend(backend).set_recompute_ffn(recompute),
                                 torch.float64, "cpu") for recompute in (False, True)]
    (pred, main_loss, aux_loss, grads, logits), recomputed = results
    assert torch.equal(pred, recomputed[0]) and torch.equal(logits, recomputed[4])
    assert torch.equal(main_loss, recomputed[1]) and torch.equal(aux_loss, recomputed[2])
    assert grads.keys() == recomputed[3].keys()
    assert all(torch.equal(g, recomputed[3][name]) for name, g in grads.items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["reference", "torch", "compiled"])
def test_channels_last_matches_reference(backend, dtype):
    """With ``channels_last`` the maps run channels-last from the backbone's first convolution on
    (checked on its outputs and on the folded weights), and the training step and eval logits
    equal the contiguous reference's to the backends' tolerance; the gradients keep the
    parameters' layout."""
    _check_available(backend, "cpu")
    expected = run_training_step(build(dtype, "cpu"), dtype, "cpu")
    model = build(dtype, "cpu").set_backend(backend).set_channels_last(True)
    layouts = []
    model.backbone.register_forward_hook(lambda _m, _i, outs: layouts.extend(
        o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous() for o in outs))
    got = run_training_step(model, dtype, "cpu")
    assert layouts == [True] * 6  # layer2, layer3, layer4 of the training and the eval forward
    if backend != "reference":
        bn = model.backbone.body.layer1[0].bn2
        assert bn._folded[2].is_contiguous(memory_format=torch.channels_last)
    assert_same_training_step(got, expected, TOLERANCE[dtype], f"{backend} channels-last")
    assert all(g.is_contiguous() for g in got[3].values())
