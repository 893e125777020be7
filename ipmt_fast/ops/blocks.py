"""Sub-layer ops: a fused op with the dropouts, residual and layer norm IPMT's transformer puts
around it, so a transformer layer is a handful of op calls forward and backward.

``prototype_attention_block``
    ``[LN](P + Drop(masked_prototype_attention(P, T, mask)))``, attention dropout inside: the
    support-side mining (with ``layer_norms[2l]``) and the query-side re-attention (no norm).
``feed_forward_block``
    ``[LN](x + Drop(feed_forward(x)))``: IPMT's ``FFN`` and the layer norm after it.
``prediction_head``
    ``E = FFN(LN(P))`` (``decoder_norm``, ``mask_embed``), ``logits = E T^T`` and the next mask:
    the published ``head(P, T)``; with second tokens also ``head(P, T2)``'s logits, as the query
    layers call the head twice with one prototype.
``deformable_self_attention_block``
    ``LN(T + Drop(deformable_self_attention(T + pos, T, ...)))``: the query self-attention layer
    with its residual and norm.
``query_update_block``
    ``U + ReLU(conv(ReLU(conv(U))))`` on the ``h x w`` map with ``U = prototype_query_update(Q, P)``:
    ``update_q[l]`` and ``res_q[l]``.

Backends: ``reference``, ``torch`` and ``triton`` compose the op of that name (``reference``: the
published math) with plain PyTorch dropout, residual and ``F.layer_norm``; ``compiled`` is one C++
op each way (``csrc/blocks.cpp``) whose autograd and autocast rule are C++ too
(``csrc/autograd.cpp``): a call from Python crosses one dispatcher, and its backward runs without
a Python frame.

Dropout masks are drawn inside the op (``dropout_p``, ``train``), by every backend in the same
order with the same calls (``_dropout.py``), so the backends drop the same units from one seed.
Under autocast the matrix products run in the autocast dtype; the compiled ops run their layer
norms in float32 there (CUDA autocast's rule for ``layer_norm``; the compositions follow the
device's autocast rules).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import deform_attention, extension, ffn, prototype_attention, query_activation, registry
from ._checks import check_same_size, check_tensor
from ._dropout import apply_keep, draw_keep, draw_multiplier, lower_dtype
from ._library import contiguous_like, register_compiled_fakes
from .deform_sample import grid_sample_rounds_once

ATTENTION_BLOCK = "prototype_attention_block"
FEED_FORWARD_BLOCK = "feed_forward_block"
PREDICTION_HEAD = "prediction_head"
DEFORMABLE_BLOCK = "deformable_self_attention_block"
QUERY_UPDATE_BLOCK = "query_update_block"
# nn.LayerNorm's default.
LAYER_NORM_EPS = 1e-5


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, h*w, C)`` tokens as a ``(B, C, h, w)`` channels-last view (no copy)."""
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def map_to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` map to ``(B, h*w, C)`` tokens (a view when the map is channels-last)."""
    return fmap.permute(0, 2, 3, 1).reshape(fmap.shape[0], -1, fmap.shape[1])


def _layer_norm(x, weight, bias, eps):
    return x if weight is None else F.layer_norm(x, x.shape[-1:], weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# Compositions (reference, torch, triton): the op of that name inside plain PyTorch
# ---------------------------------------------------------------------------------------------

def _attention_block(backend, prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight,
                     norm_weight=None, norm_bias=None, norm_eps=LAYER_NORM_EPS, dropout_p=0.0, train=False):
    b, m, _ = prototype.shape
    attn_keep = draw_multiplier(prototype, (b, m, tokens.shape[1]), lower_dtype(prototype), dropout_p, train)
    out = prototype_attention.masked_prototype_attention(prototype, tokens, token_mask, q_weight, k_weight, v_weight,
                                                         proj_weight, attn_keep, backend=backend)
    out = apply_keep(out, draw_keep(prototype, out.shape, dropout_p, train), dropout_p)
    return _layer_norm(prototype + out, norm_weight, norm_bias, norm_eps)


def _feed_forward_block(backend, x, hidden_weight, output_weight, norm_weight=None, norm_bias=None,
                        norm_eps=LAYER_NORM_EPS, dropout_p=0.0, train=False, recompute_hidden=False):
    hidden_keep = draw_keep(x, (*x.shape[:-1], hidden_weight.shape[0]), dropout_p, train)
    out = ffn.feed_forward(x, hidden_weight, output_weight, hidden_keep, dropout_p, recompute_hidden,
                           backend=registry.resolve_backend_name(ffn.OP_NAME, backend))
    out = apply_keep(out, draw_keep(x, out.shape, dropout_p, train), dropout_p)
    return _layer_norm(x + out, norm_weight, norm_bias, norm_eps)


def _prediction_head(backend, prototype, tokens, norm_weight, norm_bias, norm_eps, hidden_weight, output_weight,
                     dropout_p=0.0, train=False, second_tokens=None):
    def head(head_tokens):
        embedding = _feed_forward_block(backend, _layer_norm(prototype, norm_weight, norm_bias, norm_eps),
                                        hidden_weight, output_weight, dropout_p=dropout_p, train=train)
        return query_activation.prototype_mask_logits(embedding, head_tokens, backend=backend)

    logits, next_mask = head(tokens)
    if second_tokens is not None:
        logits = torch.cat([logits, head(second_tokens)[0]], -1)
    return logits, next_mask


def _deformable_block(backend, tokens, pos, padding_mask, reference_points, offset_normalizer, height, width,
                      value_weight, value_bias, offset_weight, offset_bias, attention_weight, attention_bias,
                      output_weight, output_bias, heads, points, norm_weight, norm_bias, norm_eps=LAYER_NORM_EPS,
                      dropout_p=0.0, train=False):
    out = deform_attention.deformable_self_attention(
        tokens + pos, tokens, padding_mask, reference_points, offset_normalizer, height, width, value_weight,
        value_bias, offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads,
        points, backend=backend)
    out = apply_keep(out, draw_keep(tokens, out.shape, dropout_p, train), dropout_p)
    return _layer_norm(tokens + out, norm_weight, norm_bias, norm_eps)


def _conv_relu(x, weight):
    """``nn.Conv2d`` (bias-free, "same" padding) then ``nn.ReLU(inplace=True)``."""
    return F.relu(F.conv2d(x, weight, padding=weight.shape[-1] // 2), inplace=True)


def _query_update_block(backend, query, prototype, update_weight, conv1_weight, conv2_weight, height, width):
    updated = query_activation.prototype_query_update(query, prototype, update_weight, backend=backend)
    # One memory layout whatever the op backend returned (convolution algorithms, and so their
    # rounding, depend on it); channels-last is also the fast one for cuDNN.
    fmap = tokens_to_map(updated, height, width).contiguous(memory_format=torch.channels_last)
    return map_to_tokens(fmap + _conv_relu(_conv_relu(fmap, conv1_weight), conv2_weight))


_COMPOSITIONS = {ATTENTION_BLOCK: _attention_block, FEED_FORWARD_BLOCK: _feed_forward_block,
                 PREDICTION_HEAD: _prediction_head, DEFORMABLE_BLOCK: _deformable_block,
                 QUERY_UPDATE_BLOCK: _query_update_block}


def _composition(op: str, backend: str):
    composed = _COMPOSITIONS[op]

    def run(*args, **kwargs):
        return composed(backend, *args, **kwargs)

    run.__name__ = f"{op}_{backend}"
    run.__doc__ = f"``{op}`` composed of the {backend!r} forms of its op and plain PyTorch."
    return run


for _op in _COMPOSITIONS:
    registry.register(_op, "reference", _composition(_op, "reference"))
    registry.register(_op, "torch", _composition(_op, "torch"))
    registry.register(_op, "triton", _composition(_op, "triton"), availability=registry.triton_availability)


# ---------------------------------------------------------------------------------------------
# compiled: one C++ op each way (csrc/blocks.cpp); fake implementations mirror its steps on the
# fake tensors, with the fakes of the ops it calls
# ---------------------------------------------------------------------------------------------

def _lower(t, compute_dtype):
    """``t`` as the C++ op hands it to a matrix product (see ``Precision::lower``)."""
    if compute_dtype is None or t is None or not t.is_floating_point() or t.dtype in (torch.float64, compute_dtype):
        return t
    return t.to(compute_dtype)


def _dropping(dropout_p, train) -> bool:
    return train and dropout_p != 0.0


def _keep_fake(like, shape, dropout_p, train, dtype=torch.bool):
    return like.new_empty(shape if _dropping(dropout_p, train) else (0,), dtype=dtype)


def _norm_fake(x, weight, bias, eps, compute_dtype):
    """``(out, input, mean, rstd)`` of the C++ ``layer_norm`` step."""
    if weight is None:
        return x, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if compute_dtype is not None and x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    out, mean, rstd = torch.ops.aten.native_layer_norm.default(x, [x.shape[-1]], weight, bias, eps)
    return out, x, mean, rstd


def _residual_norm_fake(x, branch, weight, bias, eps, compute_dtype):
    """``(out, source, mean, rstd)`` of the C++ ``residual_layer_norm``: the source for backward is
    the branch where it is narrower than the norm's input (bf16 under autocast), else that input."""
    out, source, mean, rstd = _norm_fake(x + branch, weight, bias, eps, compute_dtype)
    if weight is not None and branch.dtype != source.dtype:
        source = torch.empty_like(branch)
    return out, source, mean, rstd


def _norm_grads_fake(grad_out, norm_weight, norm_bias):
    if norm_weight is None:
        return grad_out.new_empty(0), grad_out.new_empty(0)
    return contiguous_like(norm_weight, norm_bias)


def _attention_block_fake(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, norm_weight,
                          norm_bias, norm_eps, scale, masked_bias, dropout_p, train, compute_dtype=None):
    b, m, c = prototype.shape
    lowered = [_lower(t, compute_dtype) for t in (prototype, tokens, q_weight, k_weight, v_weight, proj_weight)]
    attn_keep = _keep_fake(prototype, (b, m, tokens.shape[1]), dropout_p, train, lowered[0].dtype)
    out, *saved = prototype_attention._compiled_fake(lowered[0], lowered[1], token_mask, *lowered[2:],
                                                     attn_keep if _dropping(dropout_p, train) else None, scale,
                                                     masked_bias)
    proj_keep = _keep_fake(prototype, (b, m, c), dropout_p, train)
    normed, norm_source, mean, rstd = _residual_norm_fake(prototype, out, norm_weight, norm_bias, norm_eps,
                                                          compute_dtype)
    return (normed, attn_keep, proj_keep, *saved, norm_source, mean, rstd)


def _attention_block_backward_fake(grad_out, prototype, tokens, q_weight, k_weight, v_weight, proj_weight,
                                   norm_weight, norm_bias, scale, dropout_p, compute_dtype, attn_keep, proj_keep, query,
                                   query_key, attention, pooled, value, norm_source, norm_mean, norm_rstd):
    return (*contiguous_like(prototype, tokens, q_weight, k_weight, v_weight, proj_weight),
            *_norm_grads_fake(grad_out, norm_weight, norm_bias))


def _feed_forward_block_fake(x, hidden_weight, output_weight, norm_weight, norm_bias, norm_eps, dropout_p, train,
                             recompute_hidden, compute_dtype=None):
    hidden_keep = _keep_fake(x, (*x.shape[:-1], hidden_weight.shape[0]), dropout_p, train)
    lowered = [_lower(t, compute_dtype) for t in (x, hidden_weight, output_weight)]
    out, hidden = ffn._compiled_fake(*lowered, hidden_keep if _dropping(dropout_p, train) else None, 1.0,
                                     recompute_hidden)
    out_keep = _keep_fake(x, out.shape, dropout_p, train)
    normed, norm_source, mean, rstd = _residual_norm_fake(x, out, norm_weight, norm_bias, norm_eps, compute_dtype)
    return normed, hidden_keep, out_keep, hidden, norm_source, mean, rstd


def _feed_forward_block_backward_fake(grad_out, x, hidden_weight, output_weight, norm_weight, norm_bias, dropout_p,
                                      compute_dtype, hidden_keep, out_keep, hidden, norm_source, norm_mean, norm_rstd):
    return (*contiguous_like(x, hidden_weight, output_weight), *_norm_grads_fake(grad_out, norm_weight, norm_bias))


def _prediction_head_fake(prototype, tokens, second_tokens, norm_weight, norm_bias, norm_eps, hidden_weight,
                          output_weight, dropout_p, train, compute_dtype=None):
    normed, _, mean, rstd = _norm_fake(prototype, norm_weight, norm_bias, norm_eps, compute_dtype)
    heads = 1 if second_tokens is None else 2
    rows = normed if heads == 1 else torch.cat([normed, normed])  # LN(P) once per head
    hidden_keep = _keep_fake(prototype, (*rows.shape[:-1], hidden_weight.shape[0]), dropout_p, train)
    out, hidden = ffn._compiled_fake(*[_lower(t, compute_dtype) for t in (rows, hidden_weight, output_weight)],
                                     hidden_keep if _dropping(dropout_p, train) else None, 1.0, False)
    out_keep = _keep_fake(prototype, out.shape, dropout_p, train)
    embedding = rows + out
    first = _lower(embedding[:prototype.shape[0]], compute_dtype)
    logits, next_mask = query_activation._mask_logits_fake(first, _lower(tokens, compute_dtype))
    if heads == 2:
        logits = torch.cat([logits, first @ _lower(second_tokens, compute_dtype).transpose(1, 2)], -1)
    return logits, next_mask, hidden_keep, out_keep, hidden, embedding, rows, mean, rstd


def _prediction_head_backward_fake(grad_logits, prototype, tokens, second_tokens, norm_weight, norm_bias,
                                   hidden_weight, output_weight, dropout_p, compute_dtype, hidden_keep, out_keep,
                                   hidden, embedding, normed, norm_mean, norm_rstd):
    second = grad_logits.new_empty(0) if second_tokens is None else contiguous_like(second_tokens)
    grad_prototype, grad_tokens, *grad_parameters = contiguous_like(prototype, tokens, norm_weight, norm_bias,
                                                                    hidden_weight, output_weight)
    return (grad_prototype, grad_tokens, second, *grad_parameters)


def _deformable_block_fake(tokens, pos, padding_mask, reference_points, offset_normalizer, height, width, value_weight,
                           value_bias, offset_weight, offset_bias, attention_weight, attention_bias, output_weight,
                           output_bias, heads, points, fused_coordinate, norm_weight, norm_bias, norm_eps, dropout_p,
                           train, compute_dtype=None):
    query = tokens + pos
    weights = [_lower(t, compute_dtype) for t in (value_weight, value_bias, offset_weight, offset_bias,
                                                  attention_weight, attention_bias, output_weight, output_bias)]
    out, *saved = deform_attention._compiled_fake(_lower(query, compute_dtype), _lower(tokens, compute_dtype),
                                                  padding_mask, reference_points, offset_normalizer, height, width,
                                                  *weights, heads, points, fused_coordinate)
    keep = _keep_fake(tokens, out.shape, dropout_p, train)
    normed, norm_source, mean, rstd = _residual_norm_fake(tokens, out, norm_weight, norm_bias, norm_eps, compute_dtype)
    return (normed, *saved, keep, norm_source, mean, rstd)


def _deformable_block_backward_fake(grad_out, tokens, pos, padding_mask, offset_normalizer, height, width, value_weight,
                                    value_bias, offset_weight, offset_bias, attention_weight, attention_bias,
                                    output_weight, output_bias, heads, points, fused_coordinate, norm_weight, norm_bias,
                                    dropout_p, compute_dtype, value, locations, weights, sampled, keep, norm_source,
                                    norm_mean, norm_rstd):
    return contiguous_like(tokens, pos, value_weight, value_bias, offset_weight, offset_bias, attention_weight,
                           attention_bias, output_weight, output_bias, norm_weight, norm_bias)


def _channels_last_empty(like, b, c, h, w, dtype):
    return like.new_empty(b, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _query_update_block_fake(query, prototype, update_weight, conv1_weight, conv2_weight, height, width,
                             compute_dtype=None):
    b, n, c = query.shape
    dtype = _lower(query, compute_dtype).dtype
    return (query.new_empty(b, n, c, dtype=dtype), query.new_empty(b, n, c, dtype=dtype),
            _channels_last_empty(query, b, c, height, width, dtype),
            _channels_last_empty(query, b, c, height, width, torch.bool))


def _query_update_block_backward_fake(grad_out, query, prototype, update_weight, conv1_weight, conv2_weight, height,
                                      width, compute_dtype, updated, conv1_out, conv2_passed):
    return contiguous_like(query, prototype, update_weight, conv1_weight, conv2_weight)


def _register_compiled_fakes():
    for op, fake, backward_fake in (
            (ATTENTION_BLOCK, _attention_block_fake, _attention_block_backward_fake),
            (FEED_FORWARD_BLOCK, _feed_forward_block_fake, _feed_forward_block_backward_fake),
            (PREDICTION_HEAD, _prediction_head_fake, _prediction_head_backward_fake),
            (DEFORMABLE_BLOCK, _deformable_block_fake, _deformable_block_backward_fake),
            (QUERY_UPDATE_BLOCK, _query_update_block_fake, _query_update_block_backward_fake)):
        register_compiled_fakes(op, fake, backward_fake)


extension.on_load(_register_compiled_fakes)


def prototype_attention_block_compiled(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight,
                                       norm_weight=None, norm_bias=None, norm_eps=LAYER_NORM_EPS, dropout_p=0.0,
                                       train=False):
    return torch.ops.ipmt_fast.prototype_attention_block(
        prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, norm_weight, norm_bias, norm_eps,
        prototype.shape[-1] ** -0.5, prototype_attention.MASKED_LOGIT_BIAS, dropout_p, train)[0]


def feed_forward_block_compiled(x, hidden_weight, output_weight, norm_weight=None, norm_bias=None,
                                norm_eps=LAYER_NORM_EPS, dropout_p=0.0, train=False, recompute_hidden=False):
    return torch.ops.ipmt_fast.feed_forward_block(x, hidden_weight, output_weight, norm_weight, norm_bias, norm_eps,
                                                  dropout_p, train, recompute_hidden)[0]


def prediction_head_compiled(prototype, tokens, norm_weight, norm_bias, norm_eps, hidden_weight, output_weight,
                             dropout_p=0.0, train=False, second_tokens=None):
    outputs = torch.ops.ipmt_fast.prediction_head(prototype, tokens, second_tokens, norm_weight, norm_bias, norm_eps,
                                                  hidden_weight, output_weight, dropout_p, train)
    return outputs[0], outputs[1]


def deformable_self_attention_block_compiled(tokens, pos, padding_mask, reference_points, offset_normalizer, height,
                                             width, value_weight, value_bias, offset_weight, offset_bias,
                                             attention_weight, attention_bias, output_weight, output_bias, heads,
                                             points, norm_weight, norm_bias, norm_eps=LAYER_NORM_EPS, dropout_p=0.0,
                                             train=False):
    rounds_once = grid_sample_rounds_once(tokens.device.type, reference_points.dtype)
    return torch.ops.ipmt_fast.deformable_self_attention_block(
        tokens, pos, padding_mask, reference_points, offset_normalizer, height, width, value_weight, value_bias,
        offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads, points,
        rounds_once, norm_weight, norm_bias, norm_eps, dropout_p, train)[0]


def query_update_block_compiled(query, prototype, update_weight, conv1_weight, conv2_weight, height, width):
    return torch.ops.ipmt_fast.query_update_block(query, prototype, update_weight, conv1_weight, conv2_weight, height,
                                                  width)[0]


for _op, _fn in ((ATTENTION_BLOCK, prototype_attention_block_compiled),
                 (FEED_FORWARD_BLOCK, feed_forward_block_compiled), (PREDICTION_HEAD, prediction_head_compiled),
                 (DEFORMABLE_BLOCK, deformable_self_attention_block_compiled),
                 (QUERY_UPDATE_BLOCK, query_update_block_compiled)):
    registry.register(_op, "compiled", _fn, availability=extension.unavailable_reason)


# ---------------------------------------------------------------------------------------------
# Public functions: arguments checked, then the backend's form
# ---------------------------------------------------------------------------------------------

def _check_norm(name, weight, bias, c, like):
    if weight is None:
        if bias is not None:
            raise ValueError(f"{name}_bias given without {name}_weight")
        return
    check_tensor(f"{name}_weight", weight, (c,), device=like.device)
    check_tensor(f"{name}_bias", bias, (c,), device=like.device)


def _check_dropout(dropout_p):
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


def prototype_attention_block(prototype: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                              q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                              proj_weight: torch.Tensor, norm_weight: Optional[torch.Tensor] = None,
                              norm_bias: Optional[torch.Tensor] = None, norm_eps: float = LAYER_NORM_EPS,
                              dropout_p: float = 0.0, train: bool = False, backend: str = "auto") -> torch.Tensor:
    """``[LN](P + Drop(masked_prototype_attention(P, T, mask)))`` with attention dropout inside.

    Args:
        prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight: as
            :func:`ipmt_fast.ops.masked_prototype_attention`.
        norm_weight, norm_bias: ``(C,)`` layer norm after the residual, or None for none.
        norm_eps: its epsilon.
        dropout_p: probability of the attention dropout and of the dropout on the output.
        train: draw dropout masks (else none).
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(B, M, C)``.
    """
    check_tensor("prototype", prototype, ("B", "M", "C"))
    b, m, c = prototype.shape
    check_tensor("tokens", tokens, (b, "N", c), dtypes=(prototype.dtype,), device=prototype.device)
    _check_norm("norm", norm_weight, norm_bias, c, prototype)
    _check_dropout(dropout_p)
    fn = registry.get_implementation(ATTENTION_BLOCK, backend, prototype.device)
    # The attention's own checks (mask, weights) run in every backend but compiled: run them here.
    if fn is prototype_attention_block_compiled:
        prototype_attention.check_arguments(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight)
    return fn(prototype, tokens, token_mask, q_weight, k_weight, v_weight, proj_weight, norm_weight, norm_bias,
              norm_eps, dropout_p, train)


def feed_forward_block(x: torch.Tensor, hidden_weight: torch.Tensor, output_weight: torch.Tensor,
                       norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                       norm_eps: float = LAYER_NORM_EPS, dropout_p: float = 0.0, train: bool = False,
                       recompute_hidden: bool = False, backend: str = "auto") -> torch.Tensor:
    """``[LN](x + Drop(Lin2(Drop(ReLU(Lin1(x))))))``: IPMT's FFN and the layer norm after it.

    Args:
        x: ``(B, N, C)``.
        hidden_weight, output_weight: ``(H, C)`` and ``(C, H)`` bias-free linear weights.
        norm_weight, norm_bias: ``(C,)`` layer norm after the residual, or None for none.
        norm_eps: its epsilon.
        dropout_p: probability of both dropouts.
        train: draw dropout masks (else none).
        recompute_hidden: see :func:`ipmt_fast.ops.feed_forward` (memory, not values).
        backend: ``auto``, ``reference``, ``torch``, ``triton`` (its ``torch`` FFN) or ``compiled``.

    Returns:
        ``(B, N, C)``.
    """
    check_tensor("x", x, ("B", "N", "C"))
    c = x.shape[-1]
    check_tensor("hidden_weight", hidden_weight, ("H", c), dtypes=(x.dtype,), device=x.device)
    check_tensor("output_weight", output_weight, (c, hidden_weight.shape[0]), dtypes=(x.dtype,), device=x.device)
    _check_norm("norm", norm_weight, norm_bias, c, x)
    _check_dropout(dropout_p)
    fn = registry.get_implementation(FEED_FORWARD_BLOCK, backend, x.device)
    return fn(x, hidden_weight, output_weight, norm_weight, norm_bias, norm_eps, dropout_p, train, recompute_hidden)


def prediction_head(prototype: torch.Tensor, tokens: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                    norm_eps: float, hidden_weight: torch.Tensor, output_weight: torch.Tensor,
                    dropout_p: float = 0.0, train: bool = False, second_tokens: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The published prediction head: ``E = FFN(LN(P))``, ``logits = E T^T``, next mask.

    Args:
        prototype: ``(B, M, C)``.
        tokens: ``(B, N, C)``.
        norm_weight, norm_bias, norm_eps: the layer norm (``decoder_norm``).
        hidden_weight, output_weight: the FFN's ``(H, C)`` and ``(C, H)`` weights (``mask_embed``).
        dropout_p: probability of the FFN's dropouts.
        train: draw dropout masks (else none).
        second_tokens: ``(B, N2, C)`` or None: also the head of ``(prototype, second_tokens)``, as a
            second call after the first would compute it (its own dropout masks, drawn after the
            first head's), its logits after the first's along the last dimension.
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(logits, next_mask)``: ``(B, M, N)`` each (see :func:`ipmt_fast.ops.prototype_mask_logits`),
        with ``second_tokens`` logits ``(B, M, N + N2)`` and the next mask of ``tokens``.
    """
    check_tensor("prototype", prototype, ("B", "M", "C"))
    b, _, c = prototype.shape
    check_tensor("tokens", tokens, (b, "N", c), dtypes=(prototype.dtype,), device=prototype.device)
    if second_tokens is not None:
        check_tensor("second_tokens", second_tokens, (b, "N2", c), dtypes=(prototype.dtype,),
                     device=prototype.device)
    _check_norm("norm", norm_weight, norm_bias, c, prototype)
    if norm_weight is None:
        raise ValueError("prediction_head needs its layer norm (norm_weight, norm_bias)")
    check_tensor("hidden_weight", hidden_weight, ("H", c), dtypes=(prototype.dtype,), device=prototype.device)
    check_tensor("output_weight", output_weight, (c, hidden_weight.shape[0]), dtypes=(prototype.dtype,),
                 device=prototype.device)
    _check_dropout(dropout_p)
    fn = registry.get_implementation(PREDICTION_HEAD, backend, prototype.device)
    return fn(prototype, tokens, norm_weight, norm_bias, norm_eps, hidden_weight, output_weight, dropout_p, train,
              second_tokens)


def deformable_self_attention_block(tokens: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor,
                                    reference_points: torch.Tensor, offset_normalizer: torch.Tensor, height: int,
                                    width: int, value_weight: torch.Tensor, value_bias: torch.Tensor,
                                    offset_weight: torch.Tensor, offset_bias: torch.Tensor,
                                    attention_weight: torch.Tensor, attention_bias: torch.Tensor,
                                    output_weight: torch.Tensor, output_bias: torch.Tensor, heads: int, points: int,
                                    norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                                    norm_eps: float = LAYER_NORM_EPS, dropout_p: float = 0.0, train: bool = False,
                                    backend: str = "auto") -> torch.Tensor:
    """``LN(T + Drop(deformable_self_attention(T + pos, T, ...)))``: the query self-attention layer.

    Args:
        tokens: ``(B, N, C)`` the map's tokens; ``pos``: their ``(B, N, C)`` positional encoding.
        padding_mask ... points: as :func:`ipmt_fast.ops.deformable_self_attention`.
        norm_weight, norm_bias, norm_eps: the layer norm after the residual.
        dropout_p: probability of the dropout on the attention's output.
        train: draw dropout masks (else none).
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(B, N, C)``.
    """
    check_tensor("tokens", tokens, ("B", "N", "C"))
    check_tensor("pos", pos, tokens.shape, device=tokens.device)
    _check_norm("norm", norm_weight, norm_bias, tokens.shape[-1], tokens)
    if norm_weight is None:
        raise ValueError("deformable_self_attention_block needs its layer norm (norm_weight, norm_bias)")
    _check_dropout(dropout_p)
    fn = registry.get_implementation(DEFORMABLE_BLOCK, backend, tokens.device)
    args = (tokens, pos, padding_mask, reference_points, offset_normalizer, height, width, value_weight, value_bias,
            offset_weight, offset_bias, attention_weight, attention_bias, output_weight, output_bias, heads, points)
    if fn is deformable_self_attention_block_compiled:
        deform_attention.check_arguments(tokens, tokens, *args[2:])  # the query is tokens + pos
    return fn(*args, norm_weight, norm_bias, norm_eps, dropout_p, train)


def query_update_block(query: torch.Tensor, prototype: torch.Tensor, update_weight: torch.Tensor,
                       conv1_weight: torch.Tensor, conv2_weight: torch.Tensor, height: int, width: int,
                       backend: str = "auto") -> torch.Tensor:
    """``U + ReLU(conv2(ReLU(conv1(U))))`` on the ``height x width`` map, ``U`` the update.

    Args:
        query: ``(B, N, C)`` tokens, ``N = height * width``.
        prototype: ``(B, 1, C)``.
        update_weight: ``(C, 2C, 1, 1)`` (see :func:`ipmt_fast.ops.prototype_query_update`).
        conv1_weight, conv2_weight: ``(C, C, k, k)`` bias-free convolutions, odd ``k``, "same" padding.
        height, width: the map's size.
        backend: ``auto``, ``reference``, ``torch``, ``triton`` or ``compiled``.

    Returns:
        ``(B, N, C)``.
    """
    check_tensor("query", query, ("B", "N", "C"))
    b, n, c = query.shape
    if n != height * width:
        raise ValueError(f"query holds {n} tokens but the map is {height} x {width} = {height * width}")
    check_tensor("prototype", prototype, (b, 1, c), dtypes=(query.dtype,), device=query.device)
    check_tensor("update_weight", update_weight, (c, 2 * c, 1, 1), device=query.device)
    for name, weight in (("conv1_weight", conv1_weight), ("conv2_weight", conv2_weight)):
        check_tensor(name, weight, (c, c, "k", "k"), device=query.device)
        check_same_size(f"{name} kernel", height=weight.shape[2], width=weight.shape[3])
        if weight.shape[-1] % 2 == 0:
            raise ValueError(f"{name} must have an odd kernel size (same padding), got {tuple(weight.shape)}")
    fn = registry.get_implementation(QUERY_UPDATE_BLOCK, backend, query.device)
    return fn(query, prototype, update_weight, conv1_weight, conv2_weight, height, width)
