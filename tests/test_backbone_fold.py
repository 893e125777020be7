"""The backbone with each frozen batch norm folded into its convolution (every backend but
``reference``) against the literal published form: same function, same state dict, cache that
follows the weights, and ``set_backend`` switching between the two."""
import copy
import io

import pytest
import torch
from compare import assert_close, assert_low_precision_close

import ipmt_fast
from ipmt_fast.instrument import DispatchCounter
from ipmt_fast.model import backbone as backbone_module
from ipmt_fast.model.backbone import (BN_EPS, Backbone, Bottleneck, FrozenBatchNorm2d, conv_post_ops_apply,
                                      fold_traceable)
from ipmt_fast.train.trainer import calibrate_frozen_batchnorm

SIZE = 49
FLOAT64_RTOL = 1e-12


def random_statistics(backbone: torch.nn.Module, seed: int = 3) -> None:
    """Give every frozen batch norm non-identity statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def make_backbone(dtype=torch.float64, folded=False, seed=0) -> Backbone:
    torch.manual_seed(seed)
    backbone = Backbone(50)
    random_statistics(backbone, seed + 3)
    return backbone.to(dtype).eval().set_folded(folded)


def images(dtype=torch.float64, size=SIZE, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


@torch.no_grad()
def features(backbone, x):
    return backbone(x)


def assert_same_function(actual, expected, rtol=FLOAT64_RTOL, what="folded"):
    for name, a, e in zip(("layer2", "layer3", "layer4"), actual, expected):
        assert_close(a, e, rtol=rtol, name=f"{what} {name}")


def test_float64_fold_equals_literal():
    literal = make_backbone()
    folded = copy.deepcopy(literal).set_folded(True)
    assert folded.folded and not literal.folded
    x = images()
    expected, actual = features(literal, x), features(folded, x)
    assert_same_function(actual, expected)
    for a, e in zip(actual, expected):  # the layouts the network expects
        assert a.shape == e.shape and a.is_contiguous() and a.dtype == e.dtype


def test_float32_fold_within_adaptive_bound():
    """The folded float32 result is as close to the float64 literal oracle as the literal float32
    form is (the compare.py rule: twice its error plus the floor)."""
    oracle_model = make_backbone(torch.float64)
    literal = copy.deepcopy(oracle_model).float()
    folded = copy.deepcopy(literal).set_folded(True)
    x = images(torch.float32)
    oracle = features(oracle_model, x.double())
    for name, fused, reference, truth in zip(("layer2", "layer3", "layer4"), features(folded, x),
                                             features(literal, x), oracle):
        assert_low_precision_close(fused, reference, truth, torch.float32, name=f"folded {name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_float32_post_ops_replace_the_adds_and_relus(channels_last, monkeypatch):
    """Outside autograd, autocast and tracing, float32 CPU maps run every folded convolution in
    oneDNN with its ReLU as a post-op, and on channels-last maps its residual add too (contiguous
    ones add in place after it), within the adaptive bound of the float64 oracle, in the layout of
    the input; without post-ops (the plain folded path) the ops run one by one."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    oracle_model = make_backbone(torch.float64)
    literal = copy.deepcopy(oracle_model).float()
    folded = copy.deepcopy(literal).set_folded(True)
    x = images(torch.float32)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    counts = {}
    for post_ops in (True, False):
        if not post_ops:
            monkeypatch.setattr(backbone_module, "conv_post_ops_apply", lambda *args: False)
        features(folded, x.contiguous(memory_format=layout))  # folds the weights (cached) first
        with DispatchCounter() as counter:
            results = features(folded, x.contiguous(memory_format=layout))
        counts[post_ops] = counter.ops
        for name, fused, reference, truth in zip(("layer2", "layer3", "layer4"), results,
                                                 features(literal, x), features(oracle_model, x.double())):
            assert fused.is_contiguous(memory_format=layout), name
            assert_low_precision_close(fused, reference, truth, torch.float32, name=f"post-ops {post_ops} {name}")
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in folded.modules())
    assert sum(n for op, n in counts[True].items() if op.startswith("mkldnn::_convolution_pointwise")) == convs
    blocks = sum(isinstance(m, Bottleneck) for m in folded.modules())
    assert "aten::add" not in counts[True]
    adds_after = 0 if channels_last else blocks  # in place, each with its ReLU
    assert counts[True]["aten::add_"] == adds_after and counts[True]["aten::relu_"] == adds_after
    # A ReLU after each stem convolution and three per bottleneck, one residual add per bottleneck.
    assert counts[False]["aten::relu_"] == 3 + 3 * blocks and counts[False]["aten::add"] == blocks


def test_post_ops_only_where_they_change_nothing():
    x = images(torch.float32)
    assert conv_post_ops_apply(x, None)
    assert not conv_post_ops_apply(x.double(), None)
    assert not conv_post_ops_apply(x.requires_grad_(), None)
    assert conv_post_ops_apply(x.detach(), x.detach())
    assert not conv_post_ops_apply(x.detach(), x)  # the residual needs a gradient
    with torch.no_grad():
        assert conv_post_ops_apply(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv_post_ops_apply(x.detach(), None)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not conv_post_ops_apply(x.detach(), None)


def test_fold_traceable_is_fuse_conv_bn_weights_bit_for_bit():
    """The copy torch.compile traces computes what PyTorch's routine does, bit for bit."""
    backbone = make_backbone(torch.float32)
    conv, bn = backbone.body.layer2[0].conv2, backbone.body.layer2[0].bn2
    weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var,
                                                              BN_EPS, bn.weight, bn.bias)
    traced = fold_traceable(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, BN_EPS)
    assert torch.equal(traced[0], weight) and torch.equal(traced[1], bias)
    cached = bn.folded_into(conv)
    assert torch.equal(cached[0], weight) and torch.equal(cached[1], bias)


def test_cache_follows_in_place_changes_load_state_dict_and_dtype():
    folded = make_backbone(torch.float64, folded=True)
    x = images()
    before = features(folded, x)
    assert features(folded, x)[2].equal(before[2])  # cached: the same bits

    # An in-place change of a norm's buffer and of a conv weight.
    with torch.no_grad():
        folded.body.layer3[1].bn2.running_var.mul_(3.0)
        folded.body.conv2.weight.mul_(0.5)
    changed = features(folded, x)
    assert not torch.allclose(changed[2], before[2])
    assert_same_function(changed, features(copy.deepcopy(folded).set_folded(False), x))

    # load_state_dict (copies into the same tensors).
    other = make_backbone(torch.float64, seed=1)
    folded.load_state_dict(other.state_dict())
    assert_same_function(features(folded, x), features(other, x))

    # .to(dtype): new tensors; float32 folded within the adaptive bound of float32 literal.
    folded.float()
    literal32 = copy.deepcopy(other).float()
    for name, fused, reference, truth in zip(("layer2", "layer3", "layer4"), features(folded, x.float()),
                                             features(literal32, x.float()), features(other, x)):
        assert fused.dtype == torch.float32
        assert_low_precision_close(fused, reference, truth, torch.float32, name=f"after .float() {name}")
    folded.double()
    assert_same_function(features(folded, x), features(other, x))


def test_state_dict_unchanged_by_folding_and_switching():
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(reduce_dim=16, num_layers=1, backend="reference")
    random_statistics(model.backbone)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "backbone.body.layer1.0.conv1.weight" in state and "backbone.body.layer1.0.bn1.running_mean" in state
    model.eval()
    x, s_x = images(torch.float32, 33, 1), images(torch.float32, 33, 1).unsqueeze(1)
    s_y = torch.zeros(1, 1, 33, 33, dtype=torch.long)
    for backend in ("torch", "auto", "reference"):
        model.set_backend(backend)
        with torch.no_grad():
            model(x, s_x, s_y)
        now = model.state_dict()
        assert list(now) == list(state), backend
        assert all(torch.equal(now[k], v) for k, v in state.items()), backend
    torch.manual_seed(0)
    fresh = ipmt_fast.IPMT(reduce_dim=16, num_layers=1, backend="torch")
    assert list(fresh.state_dict()) == list(state)
    # deepcopy and pickling work after a folded forward and carry no cache.
    model.set_backend("torch")
    with torch.no_grad():
        model(x, s_x, s_y)
    buffer = io.BytesIO()
    torch.save(model.backbone, buffer)  # (the transformer holds resolved op functions)
    assert copy.deepcopy(model).backbone.body.layer1[0].bn1._folded is None


@pytest.mark.parametrize("backend, folded", [("reference", False), ("torch", True), ("auto", True),
                                             ("compiled", True)])
def test_constructor_and_set_backend_choose_the_form(backend, folded):
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(reduce_dim=16, num_layers=1, backend=backend)
    assert model.backbone.folded is folded
    assert all(m.fold is folded for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d))
    assert model.set_backend("reference").backbone.folded is False
    assert model.set_backend(backend).backbone.folded is folded


def test_set_backend_reference_is_the_literal_path_bit_for_bit():
    x = images(torch.float32)
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(reduce_dim=16, num_layers=1, backend="torch").eval()
    random_statistics(model.backbone)
    folded = features(model.backbone, x)
    model.set_backend("reference")
    torch.manual_seed(0)
    fresh = ipmt_fast.IPMT(reduce_dim=16, num_layers=1, backend="reference").eval()
    random_statistics(fresh.backbone)
    expected = features(fresh.backbone, x)
    got = features(model.backbone, x)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert not all(torch.equal(f, e) for f, e in zip(folded, expected))  # the fold did change the rounding


def test_compiled_fold_follows_the_weights():
    """Under torch.compile the fold is computed in the graph: an in-place change after compiling
    reaches the output without recompiling."""
    folded = make_backbone(torch.float64, folded=True)
    x = images(size=33)
    compiled = torch.compile(folded, backend="eager", fullgraph=True)
    assert_same_function(features(compiled, x), features(folded, x))
    with torch.no_grad():
        folded.body.layer4[2].bn3.weight.mul_(2.0)
    assert_same_function(features(compiled, x), features(copy.deepcopy(folded).set_folded(False), x))


def test_calibration_measures_the_literal_inputs_whatever_the_form():
    """calibrate_frozen_batchnorm hooks the norms, which a folded backbone never calls: it runs
    them literally meanwhile and leaves the form as it was."""
    x = images(size=33)
    literal, folded = make_backbone(), make_backbone(folded=True)
    calibrate_frozen_batchnorm(literal, x)
    calibrate_frozen_batchnorm(folded, x)
    assert folded.folded
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(), literal.state_dict().values()))
