"""The transformer's feed-forward block without its residual: ``Lin2(Drop(ReLU(Lin1(x))))``.

IPMT's ``FFN`` (``ffns[i]`` and ``mask_embed``) is ``x + Drop(Lin2(Drop(ReLU(Lin1(x)))))`` with
bias-free linears and a hidden width of ``3C``; on the query side it runs over every token, so
its ``(B, N, 3C)`` hidden activation is the largest thing the transformer keeps for backward. The
published layers keep three tensors of that size per FFN (the ReLU output, the dropout mask, which
the CPU stores as floats, and the dropout output). This op keeps at most one:

- ``recompute_hidden=False``: the hidden activation ``h = keep * scale * ReLU(x W1^T)`` itself.
  ``h`` alone gives both backward needs: ``dW2 = dY^T h``, and ``h > 0`` is exactly where the
  gradient passes through the ReLU and the dropout (a dropped or non-positive unit is 0).
- ``recompute_hidden=True``: only the dropout mask, as bools (a quarter of a float32 ``h``); the
  backward recomputes ``h`` with one more ``x W1^T``, the same operations on the same inputs, so
  the same values.

The hidden dropout is given as an explicit boolean ``hidden_keep`` with its probability
``dropout_p`` (kept units are scaled by ``1 / (1 - p)``) so every backend applies the same mask.

Memory-traffic floor, with ``e`` bytes per element, ``T`` tokens (``B*N``), width ``C`` and hidden
width ``H``: forward reads ``x`` and the weights and writes ``Y``, ``e*(2*T*C + 2*C*H)`` (plus the
keep mask, ``T*H`` bytes); the hidden activation has to make a round trip to memory between the two
matmuls, ``2*e*T*H``, unless one kernel keeps a token block's hidden row on chip.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import extension, registry
from ._checks import check_same_size, check_tensor
from ._dropout import keep_scale
from ._library import contiguous_like, follows_autocast, register_compiled_fakes

OP_NAME = "feed_forward"


def feed_forward_reference(x, hidden_weight, output_weight, hidden_keep=None, dropout_p=0.0, recompute_hidden=False):
    """The published layers, literally: linear, ReLU, dropout, linear (``recompute_hidden`` is
    a memory choice of the fused form and does not apply here)."""
    hidden = F.relu(F.linear(x, hidden_weight))
    if hidden_keep is not None:
        hidden = hidden * hidden_keep * keep_scale(dropout_p)
    return F.linear(hidden, output_weight)


def _hidden_activation(x, hidden_weight, hidden_keep, keep_scale):
    """``keep * scale * ReLU(x W1^T)`` in one buffer, updated in place (no autograd here)."""
    hidden = F.linear(x, hidden_weight).relu_()
    if hidden_keep is not None:
        hidden.mul_(hidden_keep).mul_(keep_scale)
    return hidden


class _FeedForward(torch.autograd.Function):
    """Both matmuls with autograd off; backward from the saved hidden activation or its mask."""

    @staticmethod
    def forward(ctx, x, hidden_weight, output_weight, hidden_keep, keep_scale, recompute_hidden):
        hidden = _hidden_activation(x, hidden_weight, hidden_keep, keep_scale)
        ctx.keep_scale, ctx.recompute_hidden = keep_scale, recompute_hidden
        ctx.save_for_backward(x, hidden_weight, output_weight, hidden_keep if recompute_hidden else hidden)
        return F.linear(hidden, output_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, hidden_weight, output_weight, saved = ctx.saved_tensors
        if ctx.recompute_hidden:
            hidden = _hidden_activation(x, hidden_weight, saved, ctx.keep_scale)
        else:
            hidden = saved
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        hidden_rows = hidden.reshape(-1, hidden.shape[-1])
        grad_output_weight = grad_rows.t().mm(hidden_rows) if ctx.needs_input_grad[2] else None
        # Through the dropout (x scale on kept units) and the ReLU: h > 0 exactly where both pass.
        grad_hidden = grad_rows.mm(output_weight)
        if ctx.keep_scale != 1.0:
            grad_hidden.mul_(ctx.keep_scale)
        # ReLU's own backward kernel (zero where h <= 0): one pass, ~10x faster on the CPU than
        # torch.where with a scalar, which materialises a mask first.
        grad_pre = torch.ops.aten.threshold_backward(grad_hidden, hidden_rows, 0.0)
        del grad_hidden, hidden, hidden_rows
        grad_hidden_weight = grad_pre.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_x = grad_pre.mm(hidden_weight).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_hidden_weight, grad_output_weight, None, None, None


def feed_forward_torch(x, hidden_weight, output_weight, hidden_keep=None, dropout_p=0.0, recompute_hidden=False):
    """Two matmuls; backward keeps ``h`` (or only the keep mask and recomputes ``h``)."""
    scale = keep_scale(dropout_p) if hidden_keep is not None else 1.0
    return _FeedForward.apply(x, hidden_weight, output_weight, hidden_keep, scale, recompute_hidden)


def _compiled_fake(x, hidden_weight, output_weight, hidden_keep, keep_scale, recompute_hidden):
    hidden_shape = (*x.shape[:-1], hidden_weight.shape[0])
    return x.new_empty(*x.shape[:-1], output_weight.shape[0]), x.new_empty(0 if recompute_hidden else hidden_shape)


def _compiled_backward_fake(grad_out, x, hidden_weight, output_weight, hidden_keep, keep_scale, hidden):
    return contiguous_like(x, hidden_weight, output_weight)


extension.on_load(lambda: register_compiled_fakes(OP_NAME, _compiled_fake, _compiled_backward_fake))


def feed_forward_compiled(x, hidden_weight, output_weight, hidden_keep=None, dropout_p=0.0, recompute_hidden=False):
    """The torch form's forward and backward, each one C++ op (``csrc/fused_ops.cpp``)."""
    scale = keep_scale(dropout_p) if hidden_keep is not None else 1.0
    return torch.ops.ipmt_fast.feed_forward(x, hidden_weight, output_weight, hidden_keep, scale, recompute_hidden)[0]


registry.register(OP_NAME, "reference", feed_forward_reference)
registry.register(OP_NAME, "torch", feed_forward_torch)
registry.register(OP_NAME, "compiled", feed_forward_compiled, availability=extension.unavailable_reason)


@follows_autocast("lower_precision")
def feed_forward(x: torch.Tensor, hidden_weight: torch.Tensor, output_weight: torch.Tensor,
                 hidden_keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0, recompute_hidden: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    """``Lin2(Drop(ReLU(Lin1(x))))`` with bias-free linears (the FFN of IPMT without its residual).

    Args:
        x: ``(B, N, C)`` tokens (or ``(B, M, C)`` prototypes).
        hidden_weight: ``(H, C)`` weight of the first linear (``layers.0.0.weight``).
        output_weight: ``(C_out, H)`` weight of the second linear (``layers.1.weight``).
        hidden_keep: optional ``(B, N, H)`` bool mask of the hidden units dropout keeps (None: no
            dropout, e.g. in eval mode).
        dropout_p: the dropout probability ``hidden_keep`` was drawn with; kept units are scaled
            by ``1 / (1 - dropout_p)``.
        recompute_hidden: keep only ``hidden_keep`` for backward and recompute the hidden
            activation there (one more ``x W1^T``) instead of keeping it: a quarter of the bytes
            in training, none in eval. Does not change any value.
        backend: ``auto``, ``reference`` or ``torch`` (``triton`` and ``compiled`` use ``torch``
            through the model's backend mapping).

    Returns:
        ``(B, N, C_out)``, in ``x``'s dtype.
    """
    check_tensor("x", x, ("B", "N", "C"))
    check_tensor("hidden_weight", hidden_weight, ("H", "C"), dtypes=(x.dtype,), device=x.device)
    check_same_size("input channel", x=x.shape[-1], hidden_weight=hidden_weight.shape[1])
    check_tensor("output_weight", output_weight, ("C_out", hidden_weight.shape[0]), dtypes=(x.dtype,),
                 device=x.device)
    if hidden_keep is not None:
        check_tensor("hidden_keep", hidden_keep, (*x.shape[:2], hidden_weight.shape[0]), dtypes=(torch.bool,),
                     device=x.device)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    fn = registry.get_implementation(OP_NAME, backend, x.device)
    return fn(x, hidden_weight, output_weight, hidden_keep, dropout_p, recompute_hidden)
