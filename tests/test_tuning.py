"""Backends per op: ``set_backend(backend, op_backends)`` and ``tune_backends`` (each op's backend
chosen by timing the user's call), its choices, what it restores and what it refuses."""
import pytest
import torch
from compare import assert_close

import ipmt_fast
from ipmt_fast.constants import OUTPUT_STRIDE
from ipmt_fast.ops import blocks

DIM, SIZE, LAYERS = 16, 33, 2
H = (SIZE - 1) // OUTPUT_STRIDE + 1
ATTENTION, FFN, DEFORMABLE, HEAD, UPDATE = (blocks.ATTENTION_BLOCK, blocks.FEED_FORWARD_BLOCK, blocks.DEFORMABLE_BLOCK,
                                            blocks.PREDICTION_HEAD, blocks.QUERY_UPDATE_BLOCK)
# A mixture of backends, op by op.
MIXED = {ATTENTION: "reference", FFN: "torch", HEAD: "reference"}
FLOAT64_TOLERANCE = 1e-10


def transformer(backend="reference", dtype=torch.float64):
    torch.manual_seed(0)
    return ipmt_fast.IPMTransformer(embed_dims=DIM, num_layers=LAYERS, backend=backend).to(dtype)


def transformer_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, DIM, H, H, generator=g, dtype=dtype, requires_grad=True)
    s_x = torch.randn(2, DIM, H, H, generator=g, dtype=dtype, requires_grad=True)
    labels = (torch.rand(2, SIZE, SIZE, generator=g) > 0.5).to(dtype)
    support_labels = (torch.rand(2, 1, SIZE, SIZE, generator=g) > 0.5).to(dtype)
    init_mask = torch.randint(0, 2, (2, H, H), generator=g)
    return x, labels, s_x, support_labels, init_mask


def forward_backward(model, inputs):
    """Every output and every parameter gradient of one training forward + backward."""
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(3)  # the same dropout masks in every run
    feats, query_logits, support_logits = model(*inputs)
    outputs = [feats[0], *query_logits, *support_logits]
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    # (names as the module has them, not under torch.compile's wrapper)
    return [o.detach() for o in outputs], {n.removeprefix("_orig_mod."): p.grad.clone()
                                           for n, p in model.named_parameters() if p.grad is not None}


def assert_same_run(actual, expected):
    outputs, grads = actual
    want_outputs, want_grads = expected
    for i, (o, w) in enumerate(zip(outputs, want_outputs)):
        assert_close(o, w, rtol=FLOAT64_TOLERANCE, name=f"output {i}")
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], rtol=FLOAT64_TOLERANCE, name=f"gradient of {name}")


def test_set_backend_per_op_runs_each_op_with_its_own_backend():
    model = transformer("torch").set_backend("torch", MIXED)
    for module in model.modules():
        if isinstance(module, ipmt_fast.model.transformer.OpModule):
            assert {op: module.op_backend(op) for op in model.ops} == {**dict.fromkeys(model.ops, "torch"), **MIXED}
    inputs = transformer_inputs()
    assert_same_run(forward_backward(model, inputs), forward_backward(transformer("reference"), inputs))
    model.set_backend("torch")
    assert model.op_backends == {}


def test_network_set_backend_per_op_reaches_the_transformer():
    model = ipmt_fast.IPMT(reduce_dim=DIM, num_layers=1, backend="torch")
    model.set_backend("torch", {FFN: "reference"})
    assert model.op_backends == {FFN: "reference"} and model.backend == "torch"
    assert model.transformer.ffns[0].op_backend(FFN) == "reference"
    assert model.ops == model.transformer.ops == (ATTENTION, FFN, DEFORMABLE, HEAD, UPDATE)


@pytest.mark.parametrize("op_backends,match", [
    ({"feed_forward": "torch"}, "op_backends names 'feed_forward'"),
    ({FFN: "cuda"}, "backend must be 'auto' or one of"),
])
def test_set_backend_refuses_unknown_ops_and_backends(op_backends, match):
    with pytest.raises(ValueError, match=match):
        transformer().set_backend("torch", op_backends)


class FakeClock:
    """A clock that moves only when the fake call says what it cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# Seconds a call costs, per op and backend: the call's cost is the sum over the ops of their
# current backend's entry.
COSTS = {
    "torch": {ATTENTION: 5.0, FFN: 3.0, DEFORMABLE: 4.0, HEAD: 2.0, UPDATE: 1.0},
    "triton": {ATTENTION: 4.0, FFN: 2.97, DEFORMABLE: 6.0, HEAD: 1.0, UPDATE: 1.0},
    "reference": dict.fromkeys((ATTENTION, FFN, DEFORMABLE, HEAD, UPDATE), 10.0),
}


def fake_call(model, clock, log=None):
    def call():
        backends = {op: model.transformer.ffns[0].op_backend(op) for op in model.ops}
        if log is not None:
            log.append(backends)
        clock.now += sum(COSTS[backends[op]][op] for op in model.ops)
    return call


def test_choices_follow_the_measured_times():
    """Triton saves 20% on the attention and 50% on the head (chosen), 1% on the FFN (under
    min_gain: kept) and nothing on the update (a tie keeps the current backend); each op is timed
    with the ops before it on their choices."""
    model = ipmt_fast.IPMT(reduce_dim=DIM, num_layers=1, backend="torch")
    clock, log = FakeClock(), []
    result = ipmt_fast.tune_backends(model, fake_call(model, clock, log), candidates=["torch", "triton", "reference"],
                                     rounds=3, calls_per_round=2, warmup=1, clock=clock)
    assert result.initial == dict.fromkeys(model.ops, "torch")
    assert result.choices == {ATTENTION: "triton", FFN: "torch", DEFORMABLE: "torch", HEAD: "triton", UPDATE: "torch"}
    assert model.op_backends == result.choices and model.backend == "torch"
    expected = {
        ATTENTION: {"torch": 15.0, "triton": 14.0, "reference": 20.0},
        FFN: {"torch": 14.0, "triton": 13.97, "reference": 21.0},
        DEFORMABLE: {"torch": 14.0, "triton": 16.0, "reference": 20.0},
        HEAD: {"torch": 14.0, "triton": 13.0, "reference": 22.0},
        UPDATE: {"torch": 13.0, "triton": 13.0, "reference": 22.0},
    }
    assert result.timings.keys() == expected.keys()
    for op, times in expected.items():
        assert result.timings[op] == pytest.approx(times)
    # Per op and candidate: the warm-up call, then 3 rounds of 2 calls.
    assert len(log) == len(model.ops) * 3 * (1 + 3 * 2)
    rows = result.table().splitlines()[1:]
    assert len(rows) == 3 * len(model.ops)
    assert sorted(row.split()[:2] for row in rows if "*" in row) == sorted([op, b] for op, b in result.choices.items())


def test_candidates_skip_backends_an_op_cannot_run_and_keep_the_current_one():
    model = ipmt_fast.IPMT(reduce_dim=DIM, num_layers=1, backend="torch")
    clock = FakeClock()
    result = ipmt_fast.tune_backends(model, fake_call(model, clock), candidates=["reference"], rounds=1,
                                     calls_per_round=1, warmup=0, clock=clock)
    assert all(list(times) == ["torch", "reference"] for times in result.timings.values())
    assert result.choices == dict.fromkeys(model.ops, "torch")


def test_tuning_restores_parameters_gradients_and_random_state(compiled_extension):
    """A real tuning on the CPU (compiled against torch, each op) with a call that also steps an
    optimiser: the weights, the gradients and the generator end as they were, the model runs
    the chosen backends, and its results are those of the reference."""
    model = transformer("auto")
    inputs = transformer_inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = forward_backward(transformer("reference"), inputs)
    forward_backward(model, inputs)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()

    def call():
        forward_backward(model, inputs)
        optimizer.step()

    result = ipmt_fast.tune_backends(model, call, candidates=["compiled", "torch"], rounds=2, calls_per_round=1,
                                     warmup=0)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in grads) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    assert result.initial == dict.fromkeys(model.ops, "compiled")
    assert set(result.choices.values()) <= {"compiled", "torch"} and model.op_backends == result.choices
    assert all(set(times) == {"compiled", "torch"} and min(times.values()) > 0 for times in result.timings.values())
    assert_same_run(forward_backward(model, inputs), expected)


def test_a_failing_call_leaves_the_model_as_it_was():
    model = ipmt_fast.IPMT(reduce_dim=DIM, num_layers=1, backend="torch").set_backend("torch", {FFN: "reference"})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def call():
        calls.append(1)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        if len(calls) == 3:
            raise RuntimeError("out of memory in the user's call")

    with pytest.raises(RuntimeError, match="out of memory in the user's call"):
        ipmt_fast.tune_backends(model, call, candidates=["torch", "reference"], rounds=2, calls_per_round=1, warmup=0)
    assert model.op_backends == {FFN: "reference"}
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs,match", [
    ({"rounds": 0}, "rounds must be an int >= 1, got 0"),
    ({"calls_per_round": 1.5}, "calls_per_round must be an int >= 1, got 1.5"),
    ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
    ({"min_gain": 1.0}, r"min_gain must be in \[0, 1\), got 1.0"),
    ({"candidates": ["cuda"]}, r"candidates must be backend names from .*got \['cuda'\]"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    model = transformer("torch")
    with pytest.raises(ValueError, match=match):
        ipmt_fast.tune_backends(model, lambda: None, **kwargs)


def test_a_wrapped_model_or_a_bad_call_is_refused_by_name():
    model = transformer("torch")
    with pytest.raises(TypeError, match="model must be an ipmt_fast.IPMT or IPMTransformer .*got Sequential"):
        ipmt_fast.tune_backends(torch.nn.Sequential(model), lambda: None)
    with pytest.raises(TypeError, match="call must be a function of no arguments, got Tensor"):
        ipmt_fast.tune_backends(model, torch.zeros(1))


def test_per_op_backends_trace_as_one_graph(compiled_extension):
    """A transformer whose ops run different backends traces as one graph, and the traced forward +
    backward (Dynamo + AOT autograd, eager kernels: the same dropout draws) gives eager's results."""
    inputs = transformer_inputs()
    model = transformer("compiled").set_backend("compiled", {FFN: "torch", HEAD: "torch"})
    expected = forward_backward(model, inputs)
    explanation = torch._dynamo.explain(model)(*inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_run(forward_backward(compiled, inputs), expected)
