"""The IPMT transformer (published class ``CyCTransformer``, imported there as ``IPMTransformer``).

Support side: a learned prototype mines the support tokens through masked prototype attention,
L times. Query side: deformable self-attention over the query map, the prototype re-attends to
the query tokens under the current mask, the prediction head emits mask logits (and the next
mask), and the query is updated by the prototype-conditioned 1x1 conv plus a 3x3 residual.

Each sub-layer is one op of ``ipmt_fast.ops.blocks`` (attention, FFN, prediction head, deformable
self-attention and query update, each with its dropouts, residual and layer norm), so a layer is a
handful of op calls; the ``backend`` attribute chooses their implementation and never changes what
is computed. Parameter names match the published
checkpoints; the published code's never-used layer norms and FFNs are not created.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import FOREGROUND_LABEL, IGNORE_LABEL
from ..ops import blocks, registry
from ..ops.blocks import map_to_tokens, tokens_to_map
from ..ops.deform_attention import offset_normalizer, pixel_centre_points
from ..ops.registry import BACKENDS, resolve_backend_name

DROPOUT = 0.1
FFN_EXPANSION = 3
POS_TEMPERATURE = 10000
POS_SCALE = 2 * math.pi
POS_EPS = 1e-6
# The published support-mask repair: a mask with no foreground gets its centre 2x2 set, one
# with no background gets its four corners cleared, so attention never sees a uniform mask.
REPAIR_HALF = 1


# The ops a transformer layer calls, one per sub-layer.
MODEL_OPS = (blocks.ATTENTION_BLOCK, blocks.FEED_FORWARD_BLOCK, blocks.DEFORMABLE_BLOCK, blocks.PREDICTION_HEAD,
             blocks.QUERY_UPDATE_BLOCK)


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def child(module: nn.Module, *path: str):
    """``module.<path>``: a submodule, or a parameter at the end of the path, read from the
    modules' own dicts. Attribute access on a module reaches ``nn.Module.__getattr__`` only after
    a failed lookup has raised AttributeError: ~10k instructions per access, 4.8M per transformer
    forward at IPMT's batch at tiny sizes (a tenth of the fused model's host time, NOTES.md)."""
    for name in path[:-1]:
        module = module._modules[name]
    last = path[-1]
    return module._parameters[last] if last in module._parameters else module._modules[last]


def children(module: nn.Module, name: str) -> list:
    """The modules of the container ``module.<name>`` (an ``nn.ModuleList``), as a list."""
    return list(module._modules[name]._modules.values())


def norm_arguments(norm: Optional[nn.LayerNorm]) -> tuple:
    """``(weight, bias, eps)`` of a layer norm, or no norm."""
    if norm is None:
        return None, None, blocks.LAYER_NORM_EPS
    parameters = norm._parameters
    return parameters["weight"], parameters["bias"], norm.eps


class OpModule(nn.Module):
    """A module whose forward calls ``ipmt_fast.ops``; ``backend`` (a model-wide name) picks
    their implementation, resolved once per op and device type (:meth:`implementation`): a call
    then goes straight to the backend's form, its arguments checked where they entered the model."""

    backend = "auto"
    # Per-op exceptions to ``backend`` (op name -> backend name), e.g. chosen by measurement
    # (:func:`ipmt_fast.tune_backends`); replaced, never changed in place, model-wide by
    # :meth:`IPMTransformer.set_backend`.
    op_backends: Mapping[str, str] = {}

    def __init__(self):
        super().__init__()
        self._implementations = {}

    def op_backend(self, op: str) -> str:
        """The backend ``op`` runs with: its per-op name if it has one, else the model-wide name;
        ``torch`` for an op that has no implementation of that name."""
        return resolve_backend_name(op, self.op_backends.get(op, self.backend))

    def implementation(self, op: str, device: torch.device):
        """The function that runs ``op`` on ``device``'s tensors with this module's backend."""
        key = (op, device.type)
        fn = self._implementations.get(key)
        if fn is None:
            fn = registry.get_implementation(op, self.op_backend(op), device)
            if not torch.compiler.is_compiling():  # a trace must not mutate the module
                self._implementations[key] = fn
        return fn

    def forget_implementations(self) -> None:
        """Resolve every op again at its next call (after the backend changed)."""
        self._implementations.clear()


class FFN(OpModule):
    """``x + Drop(Lin2(Drop(ReLU(Lin1(x)))))`` with bias-free linears (published ``FFN``), and the
    layer norm after it when given, as the ``feed_forward_block`` op.

    ``recompute_hidden`` (see :func:`ipmt_fast.ops.feed_forward`) keeps only the hidden dropout
    mask for backward and recomputes the hidden activation there: less memory, one more matmul.
    """

    recompute_hidden = False

    def __init__(self, dims: int, hidden: int, dropout: float = DROPOUT):
        super().__init__()
        # The published module layout, so checkpoint names (layers.0.0, layers.1) carry over.
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dims, hidden, bias=False), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(hidden, dims, bias=False))
        self.dropout = nn.Dropout(dropout)

    @property
    def weights(self) -> tuple:
        """``(hidden_weight, output_weight)``."""
        return child(self, "layers", "0", "0", "weight"), child(self, "layers", "1", "weight")

    @property
    def dropout_p(self) -> float:
        """The probability of both dropouts (the published FFN builds both with one)."""
        return self._modules["dropout"].p

    def forward(self, x, norm: Optional[nn.LayerNorm] = None):
        """The FFN of ``x`` and, when given, ``norm`` of it."""
        fn = self.implementation(blocks.FEED_FORWARD_BLOCK, x.device)
        return fn(x, *self.weights, *norm_arguments(norm), self.dropout_p, self.training, self.recompute_hidden)


class MaskedPrototypeAttention(OpModule):
    """Single-head attention from prototypes over masked tokens (``MyCrossAttention`` /
    ``QSCrossAttention``), with its output dropout, the residual and, when given, a layer norm:
    ``[norm](P + Drop(attention(P, T)))``, as the ``prototype_attention_block`` op. ``suffix``
    reproduces the published names: ``q_fc``... on the support side, ``q1_fc``... on the query side."""

    def __init__(self, dim: int, dropout: float = DROPOUT, suffix: str = ""):
        super().__init__()
        self._names = tuple(f"{kind}{suffix}_fc" for kind in "qkv") + ("proj",)
        for name in self._names[:3]:
            self.add_module(name, nn.Linear(dim, dim, bias=False))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, prototype, tokens, token_mask, norm: Optional[nn.LayerNorm] = None):
        """Both dropouts use ``attn_drop.p`` (the published layer builds both with one)."""
        modules = self._modules
        q, k, v, proj = (modules[name]._parameters["weight"] for name in self._names)
        fn = self.implementation(blocks.ATTENTION_BLOCK, prototype.device)
        return fn(prototype, tokens, token_mask, q, k, v, proj, *norm_arguments(norm), modules["attn_drop"].p,
                  self.training)


class DeformableSelfAttention(OpModule):
    """Deformable-DETR's multi-scale deformable attention (``MSDeformAttn``) with the one level IPMT
    uses (published parameter names); its forward is the query self-attention layer with the
    transformer's dropout, residual and layer norm around it, as the
    ``deformable_self_attention_block`` op."""

    def __init__(self, d_model: int, n_heads: int = 1, n_points: int = 9):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.n_points = n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Offsets start on a ring (one direction per head, radius = point index + 1)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 2)
        grid = grid.repeat(1, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, tokens, pos, padding_mask, reference_points, offset_normalizer, height: int, width: int,
                norm: nn.LayerNorm, dropout_p: float):
        """``norm(tokens + Drop(attention(tokens + pos, tokens)))`` over one ``height x width`` map:
        ``pos`` the positional encoding, ``padding_mask`` True at padded tokens, the tokens'
        reference points and the ``(W, H)`` normaliser (see
        :func:`ipmt_fast.ops.deformable_self_attention`), ``dropout_p`` the dropout's probability."""
        fn = self.implementation(blocks.DEFORMABLE_BLOCK, tokens.device)
        weights = [self._modules[name]._parameters[kind]
                   for name in ("value_proj", "sampling_offsets", "attention_weights", "output_proj")
                   for kind in ("weight", "bias")]
        return fn(tokens, pos, padding_mask, reference_points, offset_normalizer, height, width, *weights, self.n_heads,
                  self.n_points, *norm_arguments(norm), dropout_p, self.training)


def sine_positional_encoding(padding: torch.Tensor, num_feats: int, dtype: torch.dtype) -> torch.Tensor:
    """DETR's normalised sine encoding of a ``(B, h, w)`` padding mask -> ``(B, 2*num_feats, h, w)``
    (y features, then x features)."""
    valid = ~padding
    y_embed = valid.cumsum(1, dtype=dtype)
    x_embed = valid.cumsum(2, dtype=dtype)
    y_embed = y_embed / (y_embed[:, -1:, :] + POS_EPS) * POS_SCALE
    x_embed = x_embed / (x_embed[:, :, -1:] + POS_EPS) * POS_SCALE
    dim_t = torch.arange(num_feats, dtype=dtype, device=padding.device)
    dim_t = POS_TEMPERATURE ** (2 * (dim_t // 2) / num_feats)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def repair_support_mask(fg: torch.Tensor) -> torch.Tensor:
    """Per ``(h, w)`` map: no foreground -> centre 2x2 set; all foreground -> corners cleared.

    Written with whole-map masks rather than slice assignments: one expression Inductor compiles
    (its CPU code generator failed on the masked slice updates)."""
    h, w = fg.shape[-2:]
    rows = torch.arange(h, device=fg.device)
    cols = torch.arange(w, device=fg.device)
    centre = (((rows >= h // 2 - REPAIR_HALF) & (rows < h // 2 + REPAIR_HALF))[:, None]
              & ((cols >= w // 2 - REPAIR_HALF) & (cols < w // 2 + REPAIR_HALF))[None, :])
    corners = ((rows == 0) | (rows == h - 1))[:, None] & ((cols == 0) | (cols == w - 1))[None, :]
    empty = ~fg.any(-1, keepdim=True).any(-2, keepdim=True)
    fg = fg | (centre & empty)
    full = fg.all(-1, keepdim=True).all(-2, keepdim=True)
    return fg & ~(corners & full)


class IPMTransformer(OpModule):
    """The IPMT transformer.

    Args:
        embed_dims: token width C.
        num_layers: L, mining / activation layers (>= 1).
        num_points: deformable sampling points.
        shot: support images per episode.
        backend: op backend (see ``ipmt_fast.ops.registry``).
        recompute_ffn: recompute the FFNs' hidden activations in backward instead of keeping
            them (see :class:`FFN`); changes memory and time, not values.
    """

    def __init__(self, embed_dims: int = 384, num_heads: int = 1, num_layers: int = 5, num_levels: int = 1,
                 num_points: int = 9, dropout: float = DROPOUT, shot: int = 1, backend: str = "auto",
                 recompute_ffn: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_levels != 1:
            raise ValueError(f"IPMT's transformer uses one feature level, got num_levels={num_levels}")
        self.embed_dims, self.num_layers, self.shot = embed_dims, num_layers, shot
        c, hidden = embed_dims, embed_dims * FFN_EXPANSION
        self.cross_layers = nn.ModuleList(MaskedPrototypeAttention(c, dropout) for _ in range(num_layers))
        self.decoder_cross_attention_layers = nn.ModuleList(
            MaskedPrototypeAttention(c, dropout, suffix="1") for _ in range(num_layers))
        self.qry_self_layers = nn.ModuleList(
            DeformableSelfAttention(c, num_heads, num_points) for _ in range(num_layers))
        # Support side uses norms 0..2L-1 and FFNs 0..L-1; query side norms 2L..4L-1, FFNs L..2L-1.
        self.layer_norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(4 * num_layers))
        self.ffns = nn.ModuleList(FFN(c, hidden, dropout) for _ in range(2 * num_layers))
        self.update_q = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.ReLU(inplace=True)) for _ in range(num_layers - 1))
        self.res_q = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                          nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(inplace=True))
            for _ in range(num_layers - 1))
        self.level_embed = nn.Parameter(torch.empty(num_levels, c))
        self.proj_drop = nn.Dropout(dropout)
        self.mask_embed = FFN(c, c, dropout)
        self.decoder_norm = nn.LayerNorm(c)
        self.prototype = nn.Embedding(1, c)
        self.set_backend(backend)
        self.set_recompute_ffn(recompute_ffn)
        self.reset_parameters()

    @property
    def ops(self) -> tuple:
        """The names of the ops this transformer calls (``ipmt_fast.ops.blocks``)."""
        return MODEL_OPS

    def set_backend(self, backend: str, op_backends: Optional[Mapping[str, str]] = None) -> "IPMTransformer":
        """Route every op of this transformer through ``backend`` (same weights, same math), or the
        ops named in ``op_backends`` (op name -> backend name, ops from :attr:`ops`) through theirs.
        Returns ``self``."""
        check_backend_name(backend)
        exceptions = dict(op_backends or {})
        for op, name in exceptions.items():
            if op not in MODEL_OPS:
                raise ValueError(f"op_backends names {op!r}, which this transformer does not call; its ops are "
                                 f"{MODEL_OPS}")
            check_backend_name(name)
        for m in self.modules():
            if isinstance(m, OpModule):
                m.backend = backend
                m.op_backends = exceptions
                m.forget_implementations()
        return self

    def set_recompute_ffn(self, recompute: bool) -> "IPMTransformer":
        """Recompute (True) or keep (False) every FFN's hidden activation for backward. Returns ``self``."""
        for m in self.modules():
            if isinstance(m, FFN):
                m.recompute_hidden = bool(recompute)
        return self

    def reset_parameters(self):
        """The published initialisation: xavier for every linear (zero bias), then the
        deformable layers' own reset, xavier for the level embedding."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.qry_self_layers:
            m.reset_parameters()
        nn.init.xavier_uniform_(self.level_embed)

    def prediction_head(self, prototype, tokens, second_tokens=None):
        """Mask logits ``(B, 1, N)`` of ``tokens`` and the next attention mask ``(B, N)``: the
        ``prediction_head`` op over ``decoder_norm`` and ``mask_embed``; with ``second_tokens``
        ``(B, N2, C)`` the logits ``(B, 1, N + N2)`` of both heads, as two calls make them."""
        fn = self.implementation(blocks.PREDICTION_HEAD, prototype.device)
        mask_embed = self._modules["mask_embed"]
        logits, next_mask = fn(prototype, tokens, *norm_arguments(self._modules["decoder_norm"]), *mask_embed.weights,
                               mask_embed.dropout_p, self.training, second_tokens)
        return logits, next_mask[:, 0]

    def update_query(self, l: int, query, prototype, h: int, w: int):
        """``update_q[l]`` then the ``res_q[l]`` residual on the ``h x w`` map (``query_update_block``)."""
        fn = self.implementation(blocks.QUERY_UPDATE_BLOCK, query.device)
        index = str(l)
        return fn(query, prototype, child(self, "update_q", index, "0", "weight"),
                  child(self, "res_q", index, "0", "weight"), child(self, "res_q", index, "2", "weight"), h, w)

    def forward(self, x, qry_masks, s_x, supp_mask, init_mask):
        """Run the transformer.

        Args:
            x: ``(B, C, h, w)`` query features (or a one-element list of them).
            qry_masks: ``(B, H, W)`` query labels (only the 255 padding is read) or None.
            s_x: ``(B*S, C, h, w)`` support features.
            supp_mask: ``(B, S, H, W)`` support labels.
            init_mask: ``(B, h, w)`` initial query mask (1 = foreground).

        Returns:
            ``([query feature map (B, C, h, w)], query mask logits (2L maps of (B, 1, h, w)),
            support mask logits (L maps of (B, S, h, w)))``.
        """
        if isinstance(x, (list, tuple)):
            if len(x) != 1:
                raise ValueError(f"x must be one feature map (one level), got a list of {len(x)}")
            x = x[0]
        b, c, h, w = x.shape
        shot = s_x.shape[0] // b
        if s_x.shape != (b * shot, c, h, w) or supp_mask.shape[:2] != (b, shot):
            raise ValueError(f"s_x must be (B*S, C, h, w) = ({b}*S, {c}, {h}, {w}) and supp_mask (B, S, H, W); "
                             f"got s_x {tuple(s_x.shape)}, supp_mask {tuple(supp_mask.shape)}")
        L = self.num_layers
        if qry_masks is None:
            padding = torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
        else:
            padding = F.interpolate(qry_masks.unsqueeze(1).float(), size=(h, w), mode="nearest")[:, 0] == IGNORE_LABEL
        # Position features and reference points in at least float32, whatever the autocast dtype.
        coord_dtype = torch.promote_types(x.dtype, torch.float32)
        pos = (sine_positional_encoding(padding, c // 2, coord_dtype).flatten(2).transpose(1, 2)
               + child(self, "level_embed")[0])
        padding = padding.flatten(1)
        support_labels = F.interpolate(supp_mask.float(), size=(h, w), mode="nearest")
        support_fg = repair_support_mask(support_labels == FOREGROUND_LABEL).flatten(1)  # shots along tokens
        support = s_x.view(b, shot, c, h * w).transpose(2, 3).reshape(b, shot * h * w, c)
        query = map_to_tokens(x)
        reference_points = pixel_centre_points(h, w, coord_dtype, x.device)
        normalizer = offset_normalizer([(h, w)], coord_dtype, x.device)

        query_logits, support_logits, mined = [], [], []
        # The layers as lists (ModuleList indexing is Python code of its own).
        norms = children(self, "layer_norms")
        ffns = children(self, "ffns")
        prototype = child(self, "prototype", "weight").unsqueeze(0).expand(b, 1, c)
        for l, cross_layer in enumerate(children(self, "cross_layers")):
            prototype = cross_layer(prototype, support, support_fg, norms[2 * l])
            prototype = ffns[l](prototype, norms[2 * l + 1])
            mined.append(prototype)
            query_logits.append(self.prediction_head(prototype, query)[0].view(b, 1, h, w))

        attn_mask = init_mask.flatten(1) == FOREGROUND_LABEL
        dropout_p = child(self, "proj_drop").p
        layers = zip(children(self, "qry_self_layers"), children(self, "decoder_cross_attention_layers"))
        for l, (self_layer, cross_layer) in enumerate(layers):
            query = self_layer(query, pos, padding, reference_points, normalizer, h, w, norms[2 * L + 2 * l], dropout_p)
            query = ffns[L + l](query, norms[2 * L + 2 * l + 1])
            prototype = cross_layer(mined[l], query, attn_mask)
            # The published head of the query, then of the support: one op call.
            logits, attn_mask = self.prediction_head(prototype, query, support)
            logits, s_logits = logits.split([h * w, shot * h * w], dim=-1)
            query_logits.append(logits.view(b, 1, h, w))
            support_logits.append(s_logits.view(b, shot, h, w))
            if l < L - 1:
                query = self.update_query(l, query, prototype, h, w)
        return [tokens_to_map(query, h, w)], query_logits, support_logits
