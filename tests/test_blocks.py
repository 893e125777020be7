"""The sub-layer ops (``ipmt_fast/ops/blocks.py``): every backend against the ``reference``
composition (the published math with plain dropout, residual and layer norm), values and the
gradients of every differentiable argument, in eval and in train mode (dropout drawn inside, the
same units dropped by every backend from one seed); the compiled ops under bf16 autocast, through
``opcheck`` and ``torch.compile``; argument checks; the C++ mask threshold table.

Inputs are built as the model builds its layers (``ipmt_fast/model/transformer.py``): the
published initialisation of the linears (xavier), the deformable layer's own with its offset and
attention weights perturbed off the pixel centres, trained-looking layer norms (weights about 1,
biases about 0), the model's shapes in small (one prototype row per image in the head and the
query update, ``3 x C`` hidden in the FFN, ``C`` in ``mask_embed``, 3 x 3 convolutions).
On the CPU the triton backend runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): the shapes stay small for it.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from compare import assert_close, assert_low_precision_close
from cpu_paths import with_compositions

from ipmt_fast.model.transformer import FFN_EXPANSION, DeformableSelfAttention
from ipmt_fast.ops import blocks, registry
from ipmt_fast.ops.deform_attention import offset_normalizer, pixel_centre_points
from ipmt_fast.ops.deform_sample import grid_sample_rounds_once
from ipmt_fast.ops.prototype_attention import MASKED_LOGIT_BIAS
from ipmt_fast.ops.query_activation import MASK_LOGIT_THRESHOLD

FUSED_BACKENDS = ("torch", "triton", "compiled")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# The Triton attention kernels sum in float32 whatever the inputs' dtype
# (ipmt_fast/kernels/prototype_attention.py): as in tests/test_prototype_attention.py the attention
# block's triton form runs in float32 against the truth, the reference in float64 on the same
# float32 inputs (the float32 reference is the less accurate one: its -1e4 bias on masked logits
# costs it ~1e-3 absolute on a row with every token masked, which the kernels shift away). Its
# attention dropout multiplier is drawn in float32, the reference's in float64: bernoulli_ draws
# the same units in both on the CPU (were it not so, the comparison would fail by the masks).
FLOAT32_ONLY = {(blocks.ATTENTION_BLOCK, "triton")}
# torch.compile (aot_eager: the same eager kernels, traced) against eager, float32.
COMPILE_TOLERANCE = 1e-6
DROPOUT_P = 0.2
DROPOUT_SEED = 1234
# B images, M prototype rows, a 4 x 5 token map (N = 20), C channels, 2 heads of 3 points.
BATCH, ROWS, HEIGHT, WIDTH, CHANNELS, HEADS, POINTS = 2, 3, 4, 5, 8, 2, 3
TOKENS = HEIGHT * WIDTH
# The head's second token set: two shots of the map.
SECOND_TOKENS = 2 * TOKENS

OPS = (blocks.ATTENTION_BLOCK, blocks.FEED_FORWARD_BLOCK, blocks.PREDICTION_HEAD, blocks.DEFORMABLE_BLOCK,
       blocks.QUERY_UPDATE_BLOCK)
PUBLIC = {op: getattr(blocks, op) for op in OPS}
# The ops with dropout (``dropout_p``, ``train``).
WITH_DROPOUT = OPS[:4]


@dataclass
class Case:
    op: str
    kwargs: dict  # the public function's arguments (but dropout_p, train, backend)
    differentiable: tuple  # the names of those with a gradient
    activations: tuple  # ... of which the activations (the rest are parameters)


def _xavier(out_features, in_features, dtype):
    weight = torch.empty(out_features, in_features, dtype=torch.float64)
    return nn.init.xavier_uniform_(weight).to(dtype)


def _trained_norm(channels, dtype, generator):
    """A layer norm's ``(weight, bias)`` off their initial ones and zeros."""
    weight = 1 + 0.2 * torch.randn(channels, generator=generator, dtype=torch.float64)
    bias = 0.2 * torch.randn(channels, generator=generator, dtype=torch.float64)
    return weight.to(dtype), bias.to(dtype)


def make_case(op, dtype=torch.float64, norm=True, recompute_hidden=False, second_tokens=False, seed=0) -> Case:
    """The inputs of one call of ``op`` in ``dtype`` (float64 oracles: ``.double()`` of them);
    ``second_tokens``: the head's second token set, as the query layers call it (more tokens than
    the first set, as the support's shots are)."""
    torch.manual_seed(seed)  # the initialisers draw from the global generator, as the model's
    g = torch.Generator().manual_seed(seed + 1)
    c = CHANNELS

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    norm_weight, norm_bias = _trained_norm(c, dtype, g) if norm else (None, None)
    if op == blocks.ATTENTION_BLOCK:
        token_mask = torch.rand(BATCH, TOKENS, generator=g) < 0.4
        token_mask[1] = False  # an image with no foreground: every token masked
        kwargs = dict(prototype=randn(BATCH, ROWS, c), tokens=randn(BATCH, TOKENS, c), token_mask=token_mask,
                      **{name: _xavier(c, c, dtype) for name in ("q_weight", "k_weight", "v_weight", "proj_weight")},
                      norm_weight=norm_weight, norm_bias=norm_bias)
        activations = ("prototype", "tokens")
    elif op == blocks.FEED_FORWARD_BLOCK:
        hidden = FFN_EXPANSION * c
        kwargs = dict(x=randn(BATCH, TOKENS, c), hidden_weight=_xavier(hidden, c, dtype),
                      output_weight=_xavier(c, hidden, dtype), norm_weight=norm_weight, norm_bias=norm_bias,
                      recompute_hidden=recompute_hidden)
        activations = ("x",)
    elif op == blocks.PREDICTION_HEAD:
        # decoder_norm then mask_embed (FFN(C, C)); E's scale keeps the logits of order one.
        kwargs = dict(prototype=randn(BATCH, ROWS, c), tokens=randn(BATCH, TOKENS, c) / c ** 0.5,
                      norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=blocks.LAYER_NORM_EPS,
                      hidden_weight=_xavier(c, c, dtype), output_weight=_xavier(c, c, dtype))
        activations = ("prototype", "tokens")
        if second_tokens:
            kwargs["second_tokens"] = randn(BATCH, SECOND_TOKENS, c) / c ** 0.5
            activations += ("second_tokens",)
    elif op == blocks.DEFORMABLE_BLOCK:
        layer = DeformableSelfAttention(c, HEADS, POINTS)
        with torch.no_grad():  # off the published initialisation's pixel centres
            layer.sampling_offsets.weight.normal_(0, 0.05)
            layer.attention_weights.weight.normal_(0, 0.05)
        padding = torch.zeros(BATCH, HEIGHT, WIDTH, dtype=torch.bool)
        padding[:, -1] = True  # a padded band at the bottom of the map
        coordinates = torch.float64 if dtype == torch.float64 else torch.float32
        kwargs = dict(tokens=randn(BATCH, TOKENS, c), pos=randn(BATCH, TOKENS, c), padding_mask=padding.flatten(1),
                      reference_points=pixel_centre_points(HEIGHT, WIDTH, coordinates, "cpu"),
                      offset_normalizer=offset_normalizer([(HEIGHT, WIDTH)], coordinates, "cpu"),
                      height=HEIGHT, width=WIDTH,
                      value_weight=layer.value_proj.weight, value_bias=layer.value_proj.bias,
                      offset_weight=layer.sampling_offsets.weight, offset_bias=layer.sampling_offsets.bias,
                      attention_weight=layer.attention_weights.weight, attention_bias=layer.attention_weights.bias,
                      output_weight=layer.output_proj.weight, output_bias=layer.output_proj.bias,
                      heads=HEADS, points=POINTS, norm_weight=norm_weight, norm_bias=norm_bias)
        for name in ("value_weight", "value_bias", "offset_weight", "offset_bias", "attention_weight",
                     "attention_bias", "output_weight", "output_bias"):
            kwargs[name] = kwargs[name].detach().to(dtype)
        activations = ("tokens", "pos")
    elif op == blocks.QUERY_UPDATE_BLOCK:
        conv = [nn.init.kaiming_uniform_(torch.empty(c, c, 3, 3, dtype=torch.float64), a=5 ** 0.5).to(dtype)
                for _ in range(2)]
        kwargs = dict(query=randn(BATCH, TOKENS, c), prototype=randn(BATCH, 1, c),
                      update_weight=nn.init.kaiming_uniform_(torch.empty(c, 2 * c, 1, 1, dtype=torch.float64),
                                                             a=5 ** 0.5).to(dtype),
                      conv1_weight=conv[0], conv2_weight=conv[1], height=HEIGHT, width=WIDTH)
        activations = ("query", "prototype")
    else:
        raise AssertionError(op)
    differentiable = tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                           and k not in ("reference_points", "offset_normalizer"))
    return Case(op, kwargs, differentiable, activations)


def converted(case: Case, dtype) -> Case:
    """The case with its floating tensors in ``dtype``."""
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in case.kwargs.items()}
    return Case(case.op, kwargs, case.differentiable, case.activations)


def run(case: Case, backend, train=False, dropout_p=0.0, seed=DROPOUT_SEED, cotangent_seed=7):
    """``[(name, tensor)]``: the result(s), then the gradient of every differentiable argument for
    a fixed random cotangent of the (first) result. Dropout masks drawn from ``seed``."""
    kwargs = {k: v.detach().clone().requires_grad_() if k in case.differentiable else v
              for k, v in case.kwargs.items()}
    if case.op in WITH_DROPOUT:
        kwargs.update(dropout_p=dropout_p, train=train)
    torch.manual_seed(seed)
    out = PUBLIC[case.op](**kwargs, backend=backend)
    outputs = [("logits", out[0]), ("next_mask", out[1])] if case.op == blocks.PREDICTION_HEAD else [("out", out)]
    result = outputs[0][1]
    cotangent = torch.randn(result.shape, generator=torch.Generator().manual_seed(cotangent_seed),
                            dtype=torch.float64).to(result.dtype)
    grads = torch.autograd.grad(result, [kwargs[k] for k in case.differentiable], cotangent)
    return outputs + [(f"gradient of {k}", g) for k, g in zip(case.differentiable, grads)]


def _skip_unavailable(op, backend):
    try:
        registry.get_implementation(op, backend, torch.device("cpu"))
    except RuntimeError as error:
        pytest.skip(str(error))


# ---------------------------------------------------------------------------------------------
# Every backend against the reference, float64, eval and train
# ---------------------------------------------------------------------------------------------

VARIANTS = [(blocks.ATTENTION_BLOCK, dict(norm=True)), (blocks.ATTENTION_BLOCK, dict(norm=False))]
VARIANTS += [(blocks.FEED_FORWARD_BLOCK, dict(norm=norm, recompute_hidden=recompute))
             for norm in (True, False) for recompute in (False, True)]
VARIANTS += [(op, {}) for op in OPS[2:]] + [(blocks.PREDICTION_HEAD, dict(second_tokens=True))]


def _variant_id(op, options):
    return "-".join([op] + [f"{k}={v}" for k, v in options.items()])


# Each op once, and the head with its second token set: the bf16, float32 and torch.compile checks.
OP_CASES = [pytest.param(op, options, id=_variant_id(op, options))
            for op, options in [(op, {}) for op in OPS] + [(blocks.PREDICTION_HEAD, dict(second_tokens=True))]]

MATCH_CASES = [pytest.param(op, options, mode, id=f"{_variant_id(op, options)}-{mode}")
               for op, options in VARIANTS for mode in (("eval", "train") if op in WITH_DROPOUT else ("eval",))]


@pytest.mark.parametrize("backend", with_compositions(FUSED_BACKENDS), indirect=True)
@pytest.mark.parametrize("op, options, mode", MATCH_CASES)
def test_matches_reference(op, options, mode, backend):
    """Values and every gradient in float64 (but FLOAT32_ONLY); in train mode the same units
    dropped (from one seed) as the reference composition drops, and dropout changing the result."""
    _skip_unavailable(op, backend)
    dtype = torch.float32 if (op, backend) in FLOAT32_ONLY else torch.float64
    case = make_case(op, dtype, **options)
    train = mode == "train"
    expected = run(converted(case, torch.float64), "reference", train, DROPOUT_P)
    got = run(case, backend, train, DROPOUT_P)
    for (name, g), (_, e) in zip(got, expected):
        assert g.dtype == (e.dtype if name == "next_mask" else dtype) and g.shape == e.shape, name
        if name == "next_mask":
            assert torch.equal(g, e), f"{backend} next_mask"
        else:
            assert_close(g, e, rtol=TOLERANCE[dtype], name=f"{backend} {mode} {name}")
    if train:  # the masks matter: without dropout the result is another one
        without = run(case, "reference")[0][1]
        assert (without - expected[0][1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# bf16 autocast: the compiled ops against the reference composition under the same autocast
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, options", OP_CASES)
def test_compiled_bf16_autocast_within_twice_the_reference_error(op, options, compiled_extension):
    """Float32 inputs (the model's parameters and activations) under CPU bf16 autocast: the result
    and the activations' gradients within twice the reference composition's own error (under the
    same autocast) of the float64 oracle, the parameters' gradients as one vector (each alone is a
    sum of many bf16 terms that largely cancel, rounding noise of 10% and more for the reference
    itself, as in tests/test_deform_attention.py).

    The layer norms: the compiled ops run them in float32 under autocast (CUDA autocast's rule),
    while CPU autocast leaves ``F.layer_norm`` of a bf16 tensor in bf16. With float32 inputs the
    residual sum ``x + Drop(branch)`` promotes to float32 in both, and the head's ``LN(P)`` takes the
    float32 prototype: both normalise float32 tensors, so this is a like-for-like comparison (the
    result dtypes below agree; with bf16 inputs the compiled op would return float32 and the
    reference bf16, and only a one-sided bound would be honest)."""
    case = make_case(op, torch.float32, recompute_hidden=True, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(case, "compiled")
        reference = run(case, "reference")
    oracle = run(converted(case, torch.float64), "reference")
    expected_dtype = torch.bfloat16 if op in (blocks.PREDICTION_HEAD, blocks.QUERY_UPDATE_BLOCK) else torch.float32
    assert fused[0][1].dtype == reference[0][1].dtype == expected_dtype
    activations = {f"gradient of {k}" for k in case.activations}
    parameters = []
    for (name, f), (_, r), (_, o) in zip(fused, reference, oracle):
        if name == "next_mask":
            continue
        if name.startswith("gradient of"):
            assert f.dtype == torch.float32, name  # in the argument's dtype
        if name in activations or not name.startswith("gradient of"):
            assert_low_precision_close(f, r, o, torch.bfloat16, name=f"compiled {op} {name}")
        else:
            parameters.append((f, r, o))
    assert_low_precision_close(*(torch.cat([t[i].double().flatten() for t in parameters]) for i in range(3)),
                               torch.bfloat16, name=f"compiled {op} parameter gradients")


@pytest.mark.parametrize("op, options", [case for case in OP_CASES if case.values[0] in WITH_DROPOUT])
def test_compiled_float32_train_within_twice_the_reference_error(op, options, either_cpu_paths):
    """Float32 in train mode (the same units dropped from one seed): every result and gradient of
    the compiled op within twice the float32 reference composition's own error of the float64
    oracle. On the CPU the compiled blocks close with one loop for the residual, dropout and layer
    norm (csrc/cpu_loops.cpp), whose statistics are not at::native_layer_norm's; without the CPU
    paths they run at::native_layer_norm as on CUDA."""
    case = make_case(op, torch.float32, **options)
    fused = run(case, "compiled", True, DROPOUT_P)
    reference = run(case, "reference", True, DROPOUT_P)
    oracle = run(converted(case, torch.float64), "reference", True, DROPOUT_P)
    for (name, f), (_, r), (_, o) in zip(fused, reference, oracle):
        if name != "next_mask":
            assert f.dtype == torch.float32, name
            assert_low_precision_close(f, r, o, torch.float32, name=f"compiled {op} train {name}")


@pytest.mark.parametrize("op, argument", [(blocks.FEED_FORWARD_BLOCK, "hidden_weight"),
                                          (blocks.ATTENTION_BLOCK, "prototype"), (blocks.DEFORMABLE_BLOCK, "tokens")])
def test_compiled_nan_spreads_as_in_the_reference(op, argument, either_cpu_paths):
    """One NaN in an argument, in train mode: the compiled op's result has NaN exactly where the
    reference's has (assert_close matches NaN positions). A NaN in the FFN's hidden weight makes
    one hidden unit NaN in every row, and dropout as the published math computes it
    (x * keep * scale) leaves a dropped NaN NaN: every row is NaN. Against the compiled ops before
    this test, which zeroed dropped units (where / masked_fill_), the rows that dropped the unit
    came out finite; so did, without the CPU paths, their ATen compositions (what CUDA runs)."""
    case = make_case(op)
    case.kwargs[argument] = case.kwargs[argument].clone()
    case.kwargs[argument].view(-1)[10] = float("nan")
    got = run(case, "compiled", True, DROPOUT_P)[0][1]
    expected = run(case, "reference", True, DROPOUT_P)[0][1]
    assert torch.isnan(expected).any()
    assert_close(got, expected, rtol=TOLERANCE[torch.float64], name=f"compiled {op} with a NaN")


# Maps on both sides of the compiled query update's patch-row convolution limit (B h w <= 256
# output pixels, csrc/patch_conv.h; oneDNN's convolution above it): 1 x 1 (every tap but the centre
# off the map), the suite's 4 x 5, 2 x 12 x 12 = 288 pixels.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch, height, width", [(2, 1, 1), (BATCH, HEIGHT, WIDTH), (2, 12, 12)])
def test_compiled_query_update_on_small_and_large_maps(batch, height, width, dtype, either_cpu_paths):
    """The compiled query update's result and gradients against the reference's: float64 to the
    suite's tolerance, float32 within twice the float32 reference's own error of the oracle; with
    the CPU paths off every map takes the library convolution."""
    g = torch.Generator().manual_seed(5)
    c = CHANNELS

    def kaiming(*shape):
        return nn.init.kaiming_uniform_(torch.empty(*shape, dtype=torch.float64), a=5 ** 0.5).to(dtype)

    kwargs = dict(query=torch.randn(batch, height * width, c, generator=g, dtype=torch.float64).to(dtype),
                  prototype=torch.randn(batch, 1, c, generator=g, dtype=torch.float64).to(dtype),
                  update_weight=kaiming(c, 2 * c, 1, 1), conv1_weight=kaiming(c, c, 3, 3),
                  conv2_weight=kaiming(c, c, 3, 3), height=height, width=width)
    case = Case(blocks.QUERY_UPDATE_BLOCK, kwargs,
                ("query", "prototype", "update_weight", "conv1_weight", "conv2_weight"), ("query", "prototype"))
    fused, reference = run(case, "compiled"), run(case, "reference")
    oracle = run(converted(case, torch.float64), "reference")
    for (name, f), (_, r), (_, o) in zip(fused, reference, oracle):
        assert f.dtype == dtype and f.shape == r.shape, name
        if dtype == torch.float64:
            assert_close(f, r, rtol=TOLERANCE[dtype], name=f"compiled query update {name}")
        else:
            assert_low_precision_close(f, r, o, dtype, name=f"compiled query update {name}")


# Dropout probabilities for the masks' check: IPMT's, the suite's, and ones whose keep probability
# is not a multiple of 2^-53 (the loop's threshold rounds up).
DRAW_PROBABILITIES = (0.1, DROPOUT_P, 0.5, 1 / 3, 1.0)


# 32-bit words taken from the generator before the masks' draws (one per element of a small
# randint): the draws take two words an element, so an odd count starts them between pairs.
WORDS_BEFORE_DRAWS = (0, 3)


@pytest.mark.parametrize("p", DRAW_PROBABILITIES, ids=lambda p: f"p{p:.3g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("words_before", WORDS_BEFORE_DRAWS, ids=lambda k: f"after{k}words")
def test_compiled_masks_are_bernoullis(p, dtype, words_before, either_cpu_paths):
    """The masks the compiled attention and FFN blocks draw (a multiplier in the matrix products'
    dtype, then bool masks; csrc/dropout_draws.cpp on the CPU) equal, bit for bit, what
    ipmt_fast/ops/_dropout.py draws with bernoulli_ from the same seed, in the same order, and leave
    the generator where it leaves it, on maps large enough for many turns of the generator's
    624-word state, from the generator's first word or from within a state."""
    from ipmt_fast.ops._dropout import draw_keep, draw_multiplier

    b, m, n, c = 3, 2, 1500, 8
    prototype, tokens = torch.randn(b, m, c, dtype=dtype), torch.randn(b, n, c, dtype=dtype)
    weights = [torch.randn(c, c, dtype=dtype) for _ in range(4)]
    ffn_weights = torch.randn(3 * c, c, dtype=dtype), torch.randn(c, 3 * c, dtype=dtype)
    token_mask = torch.ones(b, n, dtype=torch.bool)
    torch.manual_seed(DROPOUT_SEED)
    torch.randint(0, 2, (words_before,))
    out = torch.ops.ipmt_fast.prototype_attention_block(prototype, tokens, token_mask, *weights, None, None,
                                                        blocks.LAYER_NORM_EPS, c ** -0.5, MASKED_LOGIT_BIAS, p, True)
    hidden = torch.ops.ipmt_fast.feed_forward_block(tokens, *ffn_weights, None, None, blocks.LAYER_NORM_EPS, p,
                                                    True, False)
    after = torch.rand(4)
    torch.manual_seed(DROPOUT_SEED)
    torch.randint(0, 2, (words_before,))
    expected = [draw_multiplier(prototype, (b, m, n), dtype, p, True), draw_keep(prototype, (b, m, c), p, True),
                draw_keep(tokens, (b, n, 3 * c), p, True), draw_keep(tokens, (b, n, c), p, True)]
    for got, want, name in zip((out[1], out[2], hidden[1], hidden[2]), expected,
                               ("attention multiplier", "projection mask", "hidden mask", "output mask")):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert torch.equal(after, torch.rand(4)), "the generator's state after the draws"


# What each switched-off CPU path leaves to ATen: the blocks' layer norms, the query update's
# convolutions and the dropout draws.
CPU_PATH_STAND_INS = {blocks.FEED_FORWARD_BLOCK: "aten::native_layer_norm_backward",
                      blocks.QUERY_UPDATE_BLOCK: "aten::convolution_backward",
                      blocks.ATTENTION_BLOCK: "aten::bernoulli_"}


@pytest.mark.parametrize("op", list(CPU_PATH_STAND_INS))
def test_cpu_paths_switch_takes_the_aten_composition(op, compiled_extension):
    """With the CPU paths off the compiled ops call the ATen ops their CUDA kernels call, and with
    them on (the default, restored after the block) they do not."""
    from torch.profiler import profile

    from ipmt_fast.ops.extension import cpu_paths

    case = make_case(op, torch.float64)

    def aten_ops():
        run(case, "compiled", train=True, dropout_p=DROPOUT_P)  # once unprofiled: first-use checks
        with profile() as prof:
            run(case, "compiled", train=True, dropout_p=DROPOUT_P)
        return {event.key for event in prof.key_averages()}

    with cpu_paths(False):
        assert CPU_PATH_STAND_INS[op] in aten_ops()
    assert CPU_PATH_STAND_INS[op] not in aten_ops()


@pytest.mark.parametrize("op", OPS)
def test_compiled_double_backward_raises(op, compiled_extension):
    """create_graph=True through a compiled op fails naming it: its backward op has no derivative,
    and recording it would cut the second derivative short without a word."""
    case = make_case(op)
    kwargs = {k: v.detach().clone().requires_grad_() if k in case.differentiable else v
              for k, v in case.kwargs.items()}
    out = PUBLIC[op](**kwargs, backend="compiled")
    result = out[0] if op == blocks.PREDICTION_HEAD else out
    with pytest.raises(RuntimeError, match=f"{op}_backward: the compiled ops have no double backward"):
        torch.autograd.grad(result.sum(), [kwargs[k] for k in case.differentiable], create_graph=True)


# ---------------------------------------------------------------------------------------------
# The compiled ops: opcheck (schema, aliasing, fakes, autograd registration, AOT dispatch) and
# torch.compile
# ---------------------------------------------------------------------------------------------

def op_arguments(case: Case, train=False, dropout_p=0.0):
    """``torch.ops.ipmt_fast.<op>``'s arguments for the case (by the schema's names; the autocast
    rule's ``compute_dtype`` left to its default), as the ``compiled`` form passes them."""
    c = case.kwargs.get("prototype", case.kwargs.get("x", case.kwargs.get("tokens"))).shape[-1]
    extras = dict(scale=c ** -0.5, masked_bias=MASKED_LOGIT_BIAS, dropout_p=dropout_p, train=train,
                  norm_eps=blocks.LAYER_NORM_EPS, recompute_hidden=False)
    if case.op == blocks.DEFORMABLE_BLOCK:
        extras["fused_coordinate"] = grid_sample_rounds_once("cpu", case.kwargs["reference_points"].dtype)
    values = {"second_tokens": None, **extras, **case.kwargs}
    schema = getattr(torch.ops.ipmt_fast, case.op).default._schema
    return [values[a.name] for a in schema.arguments if a.name != "compute_dtype"]


OPCHECK_CASES = [pytest.param(op, options, torch.float64, id=f"{_variant_id(op, options)}-float64")
                 for op, options in ((blocks.ATTENTION_BLOCK, dict(norm=False)),
                                     (blocks.FEED_FORWARD_BLOCK, dict(norm=False, recompute_hidden=True)))]
OPCHECK_CASES += [pytest.param(op, {}, dtype, id=f"{op}-{str(dtype)[6:]}")
                  for op in OPS for dtype in (torch.float32, torch.float64)]
OPCHECK_CASES += [pytest.param(blocks.PREDICTION_HEAD, dict(second_tokens=True), torch.float32,
                               id=f"{blocks.PREDICTION_HEAD}-second_tokens=True-float32")]


@pytest.mark.parametrize("op, options, dtype", OPCHECK_CASES)
def test_compiled_op_passes_opcheck(op, options, dtype, either_cpu_paths):
    """Every opcheck test, the forward op in eval mode with its differentiable arguments requiring
    gradients (the ops are tagged nondeterministic_seeded: in train mode two runs draw two masks),
    then its backward op on the forward's own saved tensors. test_schema fails an output that
    aliases an input or another output: against the code before d18550c it fails prediction_head
    (its layer-norm input output was the prototype itself) and, without a norm, the attention and
    feed-forward blocks (their three empty norm outputs were one tensor). Also with the CPU paths
    off: the outputs' strides of the compositions CUDA runs against the fake's."""
    case = make_case(op, dtype, **options)
    forward = getattr(torch.ops.ipmt_fast, op).default
    args = op_arguments(case, train=False, dropout_p=DROPOUT_P)  # as the model calls it in eval mode
    differentiable = {id(case.kwargs[k]) for k in case.differentiable}
    with_grad = [a.detach().requires_grad_() if id(a) in differentiable else a for a in args]
    torch.library.opcheck(forward, with_grad)
    # The backward op: its arguments are the gradient, then forward arguments and outputs by name.
    outputs = forward(*args)
    names = {a.name: v for a, v in zip(forward._schema.arguments, args)}
    names.update({r.name: v for r, v in zip(forward._schema.returns, outputs)})
    names["compute_dtype"] = None
    backward = getattr(torch.ops.ipmt_fast, f"{op}_backward").default
    cotangent = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    torch.library.opcheck(backward, [cotangent] + [names[a.name] for a in backward._schema.arguments[1:]])


# The blocks with a residual layer norm: the residual's input and the branch's dropout mask.
RESIDUAL_INPUT = {blocks.ATTENTION_BLOCK: ("prototype", "proj_keep"), blocks.FEED_FORWARD_BLOCK: ("x", "out_keep"),
                  blocks.DEFORMABLE_BLOCK: ("tokens", "keep")}


@pytest.mark.parametrize("op", OPS)
def test_compiled_op_passes_opcheck_in_bf16_compute(op, compiled_extension):
    """As autocast calls them (float32 tensors, products in bf16: ``compute_dtype``), in train
    mode: the fakes' outputs (a block keeps its bf16 branch for the layer norm's backward, not the
    float32 sum) match the real ones', forward and backward."""
    case = make_case(op, torch.float32)
    forward = getattr(torch.ops.ipmt_fast, op).default
    args = op_arguments(case, train=True, dropout_p=DROPOUT_P)
    torch.library.opcheck(forward, args, {"compute_dtype": torch.bfloat16},
                          test_utils=("test_schema", "test_faketensor"))
    outputs = forward(*args, compute_dtype=torch.bfloat16)
    names = {a.name: v for a, v in zip(forward._schema.arguments, args)}
    names.update({r.name: v for r, v in zip(forward._schema.returns, outputs)})
    names["compute_dtype"] = torch.bfloat16
    backward = getattr(torch.ops.ipmt_fast, f"{op}_backward").default
    cotangent = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3), dtype=outputs[0].dtype)
    backward_args = [cotangent] + [names[a.name] for a in backward._schema.arguments[1:]]
    torch.library.opcheck(backward, backward_args, test_utils=("test_schema", "test_faketensor"))
    if op in RESIDUAL_INPUT:
        # The narrow branch, not the float32 sum it rebuilds: the same gradients, bit for bit, as
        # from that sum formed as the forward formed it (x + the branch's dropout, type-promoted).
        residual, keep = (names[name] for name in RESIDUAL_INPUT[op])
        branch = names["norm_source"]
        assert branch.dtype == torch.bfloat16 and residual.dtype == torch.float32
        norm_input = residual + torch.ops.aten.native_dropout_backward(branch, keep, 1 / (1 - DROPOUT_P))
        sources = [a.name == "norm_source" for a in backward._schema.arguments]
        from_sum = backward(*[norm_input if is_source else a for a, is_source in zip(backward_args, sources)])
        for got, want in zip(backward(*backward_args), from_sum):
            assert torch.equal(got, want)


@pytest.mark.parametrize("op, options", OP_CASES)
def test_torch_compile_fullgraph_matches_eager(op, options, compiled_extension):
    """One compiled block op traced forward and backward as one graph (``aot_eager``: Dynamo and
    AOTAutograd over the op's fake, eager kernels) gives eager's values and gradients."""
    case = make_case(op, torch.float32, **options)
    fn = PUBLIC[op]

    def call(*leaves):
        return fn(**dict(case.kwargs, **dict(zip(case.differentiable, leaves))), backend="compiled")

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    cotangent = None
    results = []
    for f in (call, compiled):
        leaves = [case.kwargs[k].detach().clone().requires_grad_() for k in case.differentiable]
        out = f(*leaves)
        outputs = list(out) if isinstance(out, tuple) else [out]
        if cotangent is None:
            cotangent = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(5))
        results.append(outputs + list(torch.autograd.grad(outputs[0], leaves, cotangent)))
    eager, traced = results
    assert len(eager) == len(traced)
    for name, t, e in zip(["result"] + (["next_mask"] if op == blocks.PREDICTION_HEAD else []) +
                          [f"gradient of {k}" for k in case.differentiable], traced, eager):
        assert t.dtype == e.dtype, name
        if e.dtype == torch.bool:
            assert torch.equal(t, e), name
        else:
            assert_close(t, e, rtol=COMPILE_TOLERANCE, name=f"torch.compile {op} {name}")


# ---------------------------------------------------------------------------------------------
# Argument checks: errors naming the argument
# ---------------------------------------------------------------------------------------------

def _on_meta(t):
    return t.to("meta")


BAD_INPUTS = {
    blocks.ATTENTION_BLOCK: [
        ("prototype", lambda k: dict(k, prototype=k["prototype"][0])),
        ("prototype", lambda k: dict(k, prototype=k["prototype"].long())),
        ("tokens", lambda k: dict(k, tokens=k["tokens"][..., :-1])),
        ("tokens", lambda k: dict(k, tokens=k["tokens"][:1])),
        ("tokens", lambda k: dict(k, tokens=k["tokens"].float())),
        ("tokens", lambda k: dict(k, tokens=_on_meta(k["tokens"]))),
        ("token_mask", lambda k: dict(k, token_mask=k["token_mask"].double())),
        ("token_mask", lambda k: dict(k, token_mask=k["token_mask"][:, :-1])),
        ("q_weight", lambda k: dict(k, q_weight=k["q_weight"][:, :-1])),
        ("k_weight", lambda k: dict(k, k_weight=_on_meta(k["k_weight"]))),
        ("v_weight", lambda k: dict(k, v_weight=k["v_weight"].long())),
        ("proj_weight", lambda k: dict(k, proj_weight=k["proj_weight"][0])),
        ("norm_weight", lambda k: dict(k, norm_weight=k["norm_weight"][:-1])),
        ("norm_weight", lambda k: dict(k, norm_weight=_on_meta(k["norm_weight"]))),
        ("norm_bias", lambda k: dict(k, norm_bias=k["norm_bias"].long())),
        ("norm_bias given without norm_weight", lambda k: dict(k, norm_weight=None)),
    ],
    blocks.FEED_FORWARD_BLOCK: [
        ("x", lambda k: dict(k, x=k["x"][0])),
        ("x", lambda k: dict(k, x=k["x"].long())),
        ("hidden_weight", lambda k: dict(k, hidden_weight=k["hidden_weight"][:, :-1])),
        ("hidden_weight", lambda k: dict(k, hidden_weight=k["hidden_weight"].float())),
        ("output_weight", lambda k: dict(k, output_weight=k["output_weight"][:, :-1])),
        ("output_weight", lambda k: dict(k, output_weight=_on_meta(k["output_weight"]))),
        ("norm_weight", lambda k: dict(k, norm_weight=k["norm_weight"][None])),
        ("norm_bias", lambda k: dict(k, norm_bias=k["norm_bias"][:-1])),
        ("norm_bias given without norm_weight", lambda k: dict(k, norm_weight=None)),
    ],
    blocks.PREDICTION_HEAD: [
        ("prototype", lambda k: dict(k, prototype=k["prototype"][0])),
        ("tokens", lambda k: dict(k, tokens=k["tokens"][..., :-1])),
        ("tokens", lambda k: dict(k, tokens=k["tokens"].float())),
        ("tokens", lambda k: dict(k, tokens=_on_meta(k["tokens"]))),
        ("second_tokens", lambda k: dict(k, second_tokens=k["tokens"][..., :-1])),
        ("second_tokens", lambda k: dict(k, second_tokens=k["tokens"][:1])),
        ("second_tokens", lambda k: dict(k, second_tokens=k["tokens"].float())),
        ("prediction_head needs its layer norm", lambda k: dict(k, norm_weight=None, norm_bias=None)),
        ("norm_bias given without norm_weight", lambda k: dict(k, norm_weight=None)),
        ("norm_weight", lambda k: dict(k, norm_weight=k["norm_weight"][:-1])),
        ("hidden_weight", lambda k: dict(k, hidden_weight=k["hidden_weight"][:, :-1])),
        ("hidden_weight", lambda k: dict(k, hidden_weight=_on_meta(k["hidden_weight"]))),
        ("output_weight", lambda k: dict(k, output_weight=k["output_weight"].float())),
        ("output_weight", lambda k: dict(k, output_weight=k["output_weight"][:-1])),
    ],
    blocks.DEFORMABLE_BLOCK: [
        ("tokens", lambda k: dict(k, tokens=k["tokens"][0])),
        ("tokens", lambda k: dict(k, tokens=k["tokens"].long())),
        ("pos", lambda k: dict(k, pos=k["pos"][:, :-1])),
        ("pos", lambda k: dict(k, pos=_on_meta(k["pos"]))),
        ("padding_mask", lambda k: dict(k, padding_mask=k["padding_mask"].double())),
        ("reference_points", lambda k: dict(k, reference_points=k["reference_points"].half())),
        ("value_weight", lambda k: dict(k, value_weight=k["value_weight"][:, :-1])),
        ("offset_weight", lambda k: dict(k, offset_weight=k["offset_weight"][:-1])),
        ("attention_bias", lambda k: dict(k, attention_bias=k["attention_bias"].float())),
        ("output_bias", lambda k: dict(k, output_bias=_on_meta(k["output_bias"]))),
        ("deformable_self_attention_block needs its layer norm", lambda k: dict(k, norm_weight=None, norm_bias=None)),
        ("norm_weight", lambda k: dict(k, norm_weight=k["norm_weight"][:-1])),
        ("norm_bias", lambda k: dict(k, norm_bias=_on_meta(k["norm_bias"]))),
    ],
    blocks.QUERY_UPDATE_BLOCK: [
        ("query", lambda k: dict(k, query=k["query"][0])),
        ("query", lambda k: dict(k, query=k["query"].long())),
        ("query holds 20 tokens", lambda k: dict(k, height=HEIGHT + 1)),
        ("prototype", lambda k: dict(k, prototype=k["prototype"].expand(-1, 2, -1))),
        ("prototype", lambda k: dict(k, prototype=k["prototype"].float())),
        ("prototype", lambda k: dict(k, prototype=_on_meta(k["prototype"]))),
        ("update_weight", lambda k: dict(k, update_weight=k["update_weight"][:, :-1])),
        ("update_weight", lambda k: dict(k, update_weight=k["update_weight"].long())),
        ("conv1_weight", lambda k: dict(k, conv1_weight=k["conv1_weight"][..., :2, :2])),
        ("conv1_weight", lambda k: dict(k, conv1_weight=_on_meta(k["conv1_weight"]))),
        ("conv2_weight", lambda k: dict(k, conv2_weight=k["conv2_weight"][..., :1])),
        ("conv2_weight", lambda k: dict(k, conv2_weight=k["conv2_weight"][:-1])),
    ],
}
BAD_INPUT_CASES = [pytest.param(op, message, corrupt, id=f"{op}-{i}-{message.split()[0]}")
                   for op, cases in BAD_INPUTS.items() for i, (message, corrupt) in enumerate(cases)]


@pytest.fixture(scope="module")
def cases():
    """One case per op (built once: the argument checks only read it)."""
    return {op: make_case(op) for op in OPS}


@pytest.mark.parametrize("backend", ("reference", "compiled"))
@pytest.mark.parametrize("op, message, corrupt", BAD_INPUT_CASES)
def test_bad_arguments_raise_value_error_naming_them(op, message, corrupt, backend, cases):
    """Wrong rank, size, dtype or device of an input or weight: a ValueError naming it, on the
    compiled path too (its op checks nothing the Python side has not)."""
    with pytest.raises(ValueError, match=message):
        PUBLIC[op](**corrupt(cases[op].kwargs), backend=backend)


@pytest.mark.parametrize("p", [-0.1, 1.5])
@pytest.mark.parametrize("op", WITH_DROPOUT)
def test_dropout_probability_outside_zero_one_raises(op, p, cases):
    with pytest.raises(ValueError, match="dropout_p"):
        PUBLIC[op](**cases[op].kwargs, dropout_p=p, train=True, backend="compiled")


# ---------------------------------------------------------------------------------------------
# The mask threshold: the C++ table (csrc/blocks.cpp) against the Python one
# ---------------------------------------------------------------------------------------------

SWEEP_ULPS = 3


@pytest.mark.parametrize("dtype", list(MASK_LOGIT_THRESHOLD), ids=str)
def test_compiled_head_mask_threshold_is_the_python_constant(dtype, compiled_extension):
    """The compiled head's next mask keeps exactly the logits at or above MASK_LOGIT_THRESHOLD[dtype]
    (proven to be torch's sigmoid >= 0.5 boundary in tests/test_query_activation.py), over the
    values of ``dtype`` a few ulps either side of it: its C++ table holds the same constant.
    A zero norm weight with bias [1, 0] and a zero FFN make the embedding [1, 0] and the logits
    exactly the tokens' first channel."""
    threshold = torch.tensor([MASK_LOGIT_THRESHOLD[dtype]], dtype=dtype)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[threshold.element_size()]
    magnitudes = (-threshold).view(as_int) + torch.arange(-SWEEP_ULPS, SWEEP_ULPS + 1, dtype=as_int)
    values = -magnitudes.view(dtype)  # from above the threshold, through it, to below it
    tokens = torch.stack([values, torch.ones_like(values)], dim=-1)[None]
    zeros = torch.zeros(2, 2, dtype=dtype)
    args = (torch.randn(1, 1, 2).to(dtype), tokens, torch.zeros(2, dtype=dtype), torch.tensor([1.0, 0.0], dtype=dtype),
            blocks.LAYER_NORM_EPS, zeros, zeros)
    logits, mask = blocks.prediction_head(*args, backend="compiled")
    assert torch.equal(logits[0, 0], values)
    expected = torch.arange(2 * SWEEP_ULPS + 1) <= SWEEP_ULPS  # the threshold and above kept
    assert torch.equal(values >= MASK_LOGIT_THRESHOLD[dtype], expected)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask, blocks.prediction_head(*args, backend="reference")[1])
