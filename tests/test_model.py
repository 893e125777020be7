"""The reference IPMT model: shapes, gradients, edge masks, determinism, checkpoints, bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import ipmt_fast
from ipmt_fast.model.backbone import DeepStemResNet
from ipmt_fast.model.transformer import repair_support_mask, sine_positional_encoding

SMALL_DIM = 32


def episode(batch=2, shot=1, size=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=dtype) * 50
    s_x = torch.randn(batch, shot, 3, size, size, generator=g, dtype=dtype) * 50
    s_y = (torch.rand(batch, shot, size, size, generator=g) > 0.6).long()
    s_y[..., -7:, :] = 255
    y = (torch.rand(batch, size, size, generator=g) > 0.5).long()
    y[:, :, -9:] = 255
    return x, s_x, s_y, y


def small_model(num_layers=2, shot=1, seed=0, **kw):
    torch.manual_seed(seed)
    return ipmt_fast.IPMT(layers=50, shot=shot, reduce_dim=SMALL_DIM, num_layers=num_layers,
                          backend="reference", **kw)


@pytest.mark.parametrize("num_layers", [1, 2, 5])
@pytest.mark.parametrize("shot", [1, 2])
@pytest.mark.parametrize("size", [97, 129])
def test_output_shapes_and_dtypes(num_layers, shot, size):
    model = small_model(num_layers, shot)
    x, s_x, s_y, y = episode(1, shot, size)
    h = (size - 1) // 8 + 1
    model.train()
    pred, main_loss, aux_loss = model(x, s_x, s_y, y)
    assert pred.shape == (1, size, size) and pred.dtype == torch.int64
    assert set(pred.unique().tolist()) <= {0, 1}
    assert main_loss.shape == () and aux_loss.shape == () and main_loss.dtype == torch.float32
    assert torch.isfinite(main_loss) and torch.isfinite(aux_loss)
    model.eval()
    with torch.no_grad():
        logits = model(x, s_x, s_y, y)
        assert logits.shape == (1, 2, size, size) and logits.dtype == torch.float32
        feats, query_logits, support_logits = model.transformer(
            torch.randn(1, SMALL_DIM, h, h), y.float(), torch.randn(shot, SMALL_DIM, h, h), s_y.float(),
            torch.randint(0, 2, (1, h, h)))
    assert len(feats) == 1 and feats[0].shape == (1, SMALL_DIM, h, h)
    assert len(query_logits) == 2 * num_layers and all(q.shape == (1, 1, h, h) for q in query_logits)
    assert len(support_logits) == num_layers and all(s.shape == (1, shot, h, h) for s in support_logits)


def test_published_size_473_default_model():
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(backend="reference").eval()
    x, s_x, s_y, y = episode(1, 1, 473)
    with torch.no_grad():
        logits = model(x, s_x, s_y, y)
    assert logits.shape == (1, 2, 473, 473) and torch.isfinite(logits).all()


def test_non_square_input():
    model = small_model().eval()
    x, s_x, s_y, y = episode(1, 1, 97)
    crop = slice(0, 65)
    with torch.no_grad():
        out = model(x[..., crop], s_x[..., crop], s_y[..., crop], y[..., crop])
    assert out.shape == (1, 2, 97, 65)


def test_gradients_reach_every_used_parameter_and_not_the_backbone():
    model = small_model(num_layers=2, shot=2).train()
    x, s_x, s_y, y = episode(2, 2, 97)
    _, main_loss, aux_loss = model(x, s_x, s_y, y)
    (main_loss + aux_loss).backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, f"no gradient reached {name}"
            assert torch.isfinite(p.grad).all(), name
            # The deformable attention's offset and weight projections start at zero, so their
            # inputs (and the level embedding that only feeds them) may get exactly-zero grads.
            if "qry_self_layers" not in name and name != "transformer.level_embed":
                assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_backbone_maps_are_freed_before_the_transformer_runs(backend):
    """The frozen backbone's three maps (batch and shots together) are read for the query and
    support features and the prior only: by the time the transformer runs they are gone, so the
    step's peak (at the end of the forward or in the backward) does not hold them."""
    import weakref

    model = small_model(num_layers=1).set_backend(backend).train()
    backbone_maps, alive_at_transformer = [], []
    model.backbone.register_forward_hook(
        lambda module, args, maps: backbone_maps.extend(weakref.ref(m) for m in maps))
    model.transformer.register_forward_pre_hook(
        lambda module, args: alive_at_transformer.extend(m() is not None for m in backbone_maps))
    model(*episode(2, 1, 97))
    assert len(backbone_maps) == 3 and alive_at_transformer == [False, False, False]


@pytest.mark.parametrize("case", ["empty_support", "full_support", "all_padding_rows"])
def test_edge_masks_give_finite_outputs(case):
    model = small_model(shot=2).train()
    x, s_x, s_y, y = episode(2, 2, 97)
    if case == "empty_support":
        s_y[:] = 0
    elif case == "full_support":
        s_y[:] = 1
    else:
        y[:, :40, :] = 255
        y[1] = 255
    _, main_loss, aux_loss = model(x, s_x, s_y, y)
    (main_loss + aux_loss).backward()
    assert torch.isfinite(main_loss) and torch.isfinite(aux_loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x, s_x, s_y, y)).all()


def test_support_mask_repair_rule():
    fg = torch.zeros(3, 6, 5, dtype=torch.bool)
    fg[1] = True
    fg[2, 0, 0] = True
    repaired = repair_support_mask(fg)
    expected_empty = torch.zeros(6, 5, dtype=torch.bool)
    expected_empty[2:4, 1:3] = True  # centre 2x2: rows h//2-1..h//2, cols w//2-1..w//2
    assert torch.equal(repaired[0], expected_empty)
    expected_full = torch.ones(6, 5, dtype=torch.bool)
    for r, c in ((0, 0), (-1, -1), (0, -1), (-1, 0)):
        expected_full[r, c] = False
    assert torch.equal(repaired[1], expected_full)
    assert torch.equal(repaired[2], fg[2])
    assert not fg[0].any(), "the input must not be modified"


def test_sine_positional_encoding_known_values():
    padding = torch.zeros(1, 2, 3, dtype=torch.bool)
    padding[0, :, 2] = True  # last column is padding
    pos = sine_positional_encoding(padding, 4, torch.float64)
    assert pos.shape == (1, 8, 2, 3)
    # y of row 1 normalised: 2 / (2 + eps) * 2pi; feature 0 is sin(y / 10000^0), feature 1 cos(y / 10000^0)
    y_row1 = 2 / (2 + 1e-6) * 2 * math.pi
    assert pos[0, 0, 1, 0].item() == pytest.approx(math.sin(y_row1), abs=1e-12)
    assert pos[0, 1, 1, 0].item() == pytest.approx(math.cos(y_row1), abs=1e-12)
    # x of column 0 normalised by the 2 valid columns; features 2, 3 use 10000^(2/4)
    x_col0 = 1 / (2 + 1e-6) * 2 * math.pi
    assert pos[0, 6, 0, 0].item() == pytest.approx(math.sin(x_col0 / 100), abs=1e-12)


def test_weighted_dice_loss_known_answer():
    logits = torch.zeros(1, 2, 1, 2)  # sigmoid = 0.5 everywhere
    target = torch.tensor([[[0, 255]]])
    # channel bg: p*t = 0.5, p^2 = 0.5, t^2 = 1 -> 1 - 1/1.5; channel fg: 1 - 0/0.5 = 1
    expected = (1 - 2 * 0.5 / 1.5) + 1.0
    assert ipmt_fast.weighted_dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_duplex_segmentation_loss_known_answer():
    y = torch.tensor([[[1, 0], [0, 255]]])
    s_y = torch.tensor([[[[1, 1], [0, 0]]]])
    q = [torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)]
    s = [torch.zeros(1, 1, 2, 2)]
    bce = F.binary_cross_entropy_with_logits
    qgt = torch.tensor([[[[1.0, 0], [0, 0]]]])
    sgt = torch.tensor([[[[1.0, 1], [0, 0]]]])
    expected = 0.3 * (bce(q[0], qgt) + bce(q[1], qgt)) / 2 + 0.7 * bce(s[0], sgt)
    got = ipmt_fast.duplex_segmentation_loss(q, s, y, s_y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_determinism_same_seed_same_outputs_in_train_mode():
    x, s_x, s_y, y = episode(1, 1, 97)
    results = []
    for _ in range(2):
        model = small_model(seed=3).train()
        torch.manual_seed(11)
        pred, main_loss, aux_loss = model(x, s_x, s_y, y)
        (main_loss + aux_loss).backward()
        results.append((pred, main_loss, aux_loss, model.transformer.prototype.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_end_to_end():
    model = small_model().to(torch.float64).train()
    x, s_x, s_y, y = episode(1, 1, 97, dtype=torch.float64)
    pred, main_loss, aux_loss = model(x, s_x, s_y, y)
    (main_loss + aux_loss).backward()
    assert main_loss.dtype == torch.float64
    assert model.transformer.prototype.weight.grad.dtype == torch.float64
    model.eval()
    with torch.no_grad():
        assert model(x, s_x, s_y, y).dtype == torch.float64


def _published_format(state, num_layers):
    """What the published code saves: DataParallel prefix and the never-used norms and FFNs."""
    state = dict(state)
    c = state["transformer.layer_norms.0.weight"].shape[0]
    for i in range(4 * num_layers, 6 * num_layers):
        state[f"transformer.layer_norms.{i}.weight"] = torch.ones(c)
        state[f"transformer.layer_norms.{i}.bias"] = torch.zeros(c)
    for i in range(2 * num_layers, 3 * num_layers):
        state[f"transformer.ffns.{i}.layers.0.0.weight"] = torch.zeros(3 * c, c)
        state[f"transformer.ffns.{i}.layers.1.weight"] = torch.zeros(c, 3 * c)
    return {"epoch": 200, "state_dict": {"module." + k: v for k, v in state.items()}}


def test_state_dict_round_trip_and_published_format(tmp_path):
    source = small_model(seed=1).eval()
    x, s_x, s_y, y = episode(1, 1, 97)
    with torch.no_grad():
        expected = source(x, s_x, s_y, y)
    path = tmp_path / "published.pth"
    torch.save(_published_format(source.state_dict(), 2), path)
    for checkpoint in (source.state_dict(), str(path)):
        target = small_model(seed=2).eval()
        ipmt_fast.load_published_checkpoint(target, checkpoint)
        with torch.no_grad():
            assert torch.equal(target(x, s_x, s_y, y), expected)


def test_wrong_checkpoint_is_refused_with_names():
    source = small_model(num_layers=2).state_dict()
    del source["transformer.prototype.weight"]
    source["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing: transformer\.prototype\.weight.*unexpected: head\.extra\.weight"):
        ipmt_fast.load_published_checkpoint(small_model(num_layers=2), source)
    other_width = ipmt_fast.IPMT(reduce_dim=16, num_layers=2, backend="reference").state_dict()
    with pytest.raises(ValueError, match="wrong shape"):
        ipmt_fast.load_published_checkpoint(small_model(num_layers=2), other_width)


def test_backbone_loads_pfenet_layout_file(tmp_path):
    body = DeepStemResNet(50)
    state = {k: torch.randn_like(v) for k, v in body.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    state["bn1.num_batches_tracked"] = torch.tensor(5)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    model = ipmt_fast.IPMT(reduce_dim=SMALL_DIM, num_layers=1, backbone_weights=str(path))
    assert torch.equal(model.backbone.body.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # layer3 / layer4 are dilated (2 / 4) instead of strided; their first blocks keep the previous dilation.
    assert model.backbone.body.layer3[0].conv2.dilation == (1, 1) and model.backbone.body.layer3[1].conv2.dilation == (2, 2)
    assert model.backbone.body.layer4[0].conv2.dilation == (2, 2) and model.backbone.body.layer4[1].conv2.dilation == (4, 4)
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"backbone_weights .*missing \['layer1\.0\.conv1\.weight'\]"):
        ipmt_fast.IPMT(reduce_dim=SMALL_DIM, num_layers=1, backbone_weights=str(path))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_constructor_backend_reaches_every_op(backend, monkeypatch):
    """``IPMT(backend=...)`` alone (no ``set_backend``) routes every op call through that backend."""
    from ipmt_fast.ops import registry
    requested = []
    get_implementation = registry.get_implementation

    def recording(op, name, device):
        requested.append((op, name))
        return get_implementation(op, name, device)

    monkeypatch.setattr(registry, "get_implementation", recording)
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(reduce_dim=SMALL_DIM, num_layers=2, backend=backend).train()
    model(*episode(1, 1, 97))
    ops = {op for op, _ in requested}
    # Every op but ms_deform_sample, which the deformable self-attention layer's backends run inside.
    assert ops == set(registry.registered_ops()) - {"ms_deform_sample"}, ops
    assert {name for _, name in requested} == {backend}


def test_set_backend_switches_and_validates():
    model = small_model()
    assert model.set_backend("torch") is model and model.backend == "torch"
    assert all(m.backend == "torch" for m in model.modules() if hasattr(m, "backend") and not isinstance(m, type))
    with pytest.raises(ValueError, match="backend must be"):
        model.set_backend("cuda-fast")
    with pytest.raises(ValueError, match="backend must be"):
        ipmt_fast.IPMT(reduce_dim=SMALL_DIM, num_layers=1, backend="nope")


@pytest.mark.parametrize("mutate, message", [
    (lambda e: (e[0][0], *e[1:]), r"x must be a float tensor \(B, 3, H, W\)"),
    (lambda e: (e[0][..., :96, :96], e[1][..., :96, :96], e[2][..., :96, :96], e[3][..., :96, :96]), r"\(H - 1\) % 8 == 0"),
    (lambda e: (e[0], torch.cat([e[1], e[1]], 1), torch.cat([e[2], e[2]], 1), e[3]), "2 shots but the model was built with shot=1"),
    (lambda e: (e[0], e[1], e[2][:, 0], e[3]), r"s_y must be \(B, S, H, W\)"),
    (lambda e: (e[0], e[1], e[2], e[3][:, :50]), r"y must be \(B, H, W\)"),
    (lambda e: (e[0], e[1], e[2] * 3, e[3]), r"labels in \(0, 1, 255\)"),
    (lambda e: (e[0].index_fill(2, torch.tensor([3]), float("nan")), *e[1:]), "NaN or inf"),
    (lambda e: (e[0], e[1].double(), *e[2:]), r"s_x must be \(B, S, 3, H, W\)"),
])
def test_bad_inputs_raise_value_errors(mutate, message):
    model = small_model(num_layers=1).eval()
    with pytest.raises(ValueError, match=message):
        model(*mutate(episode(1, 1, 97)))


def test_training_mode_requires_query_labels():
    model = small_model(num_layers=1).train()
    x, s_x, s_y, _ = episode(1, 1, 97)
    with pytest.raises(ValueError, match="y .* required in training mode"):
        model(x, s_x, s_y)
