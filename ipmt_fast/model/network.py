"""The IPMT network (published ``IPMTnetwork``): backbone, prototype/prior features, the IPMT
transformer, segmentation head and losses. One definition for every backend."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .losses import duplex_segmentation_loss, weighted_dice_loss
from ..constants import FOREGROUND_LABEL, OUTPUT_STRIDE, VALID_LABELS
from .transformer import IPMTransformer

MID_LEVEL_CHANNELS = 512 + 1024  # layer2 + layer3
HIGH_LEVEL_CHANNELS = 2048  # layer4
FEATURE_DROPOUT = 0.5
HEAD_DROPOUT = 0.1
GAP_EPS = 0.0005
COSINE_EPS = 1e-7
NUM_CLASSES = 2
# Main loss: 0.7 * dice(final logits) + 0.3 * dice(initial logits).
FINAL_DICE_WEIGHT = 0.7


def _conv_relu(cin, cout, kernel=1):
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.ReLU(inplace=True)]


def _classifier(dim):
    return nn.Sequential(*_conv_relu(dim, dim, 3), nn.Dropout2d(HEAD_DROPOUT), nn.Conv2d(dim, NUM_CLASSES, 1))


def _tracing_or_capturing(t: torch.Tensor) -> bool:
    """Whether device values cannot be read now: torch.compile is tracing, or a CUDA graph capturing."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def weighted_gap(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average ``sum(f m) / (sum(m) + 0.0005)`` over the map, computed as published
    (average pools rescaled by the area) -> ``(N, C, 1, 1)``."""
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + GAP_EPS
    return F.avg_pool2d(feat * mask, (h, w)) * h * w / area


class IPMT(nn.Module):
    """Intermediate Prototype Mining Transformer for few-shot segmentation.

    Args:
        layers: backbone depth, 50 or 101.
        shot: support images per episode (S).
        reduce_dim: hidden width C.
        num_layers: transformer layers L (>= 1).
        backend: op backend for the hot paths: ``auto`` (default), ``reference``, ``torch``,
            ``triton`` or ``compiled`` (see ``ipmt_fast.ops.registry``); every backend but
            ``reference`` also runs the backbone with its batch norms folded into the convolutions.
            Switch later with :meth:`set_backend`; the weights and the result do not change.
        backbone_weights: path (or state dict) of PFENet's deep-stem ImageNet ResNet
            (``resnet50_v2.pth``); random initialisation when None.
        recompute_ffn: in training, keep only the transformer FFNs' dropout masks (bools) for
            backward and recompute their hidden activations there: less memory for one more
            matmul per FFN; same values. Switch later with :meth:`set_recompute_ffn`.
        check_values: check in every forward that the labels hold only 0, 1 and 255 and the
            images are finite. That reads device values on the host (one sync per forward), so it
            is skipped while ``torch.compile`` traces or a CUDA graph captures; the trainer,
            evaluator and ``predict`` check their data on the host instead and turn it off
            (attribute ``check_values``). Shapes and dtypes are always checked.
        channels_last: run the feature maps in ``torch.channels_last`` layout (and fold the
            backbone's weights into it) instead of PyTorch's default contiguous one: the same
            function up to rounding, faster where the device's convolutions prefer it (measured in
            NOTES.md: large images on a CPU; slower on small maps). The parameters keep their
            layout, so the state dict and the optimisers do not change. Switch later with
            :meth:`set_channels_last`.

    ``forward(x, s_x, s_y, y=None)`` takes ImageNet-normalised images ``x (B, 3, H, W)`` and
    ``s_x (B, S, 3, H, W)`` with ``(H - 1) % 8 == 0``, support labels ``s_y (B, S, H, W)`` and
    query labels ``y (B, H, W)`` in {0, 1, 255}. In training mode it returns
    ``(prediction (B, H, W), main_loss, aux_loss)`` and needs ``y``; in eval mode it returns the
    2-channel logits ``(B, 2, H, W)`` and reads ``y`` only for its 255 (padding) pixels.
    """

    def __init__(self, layers: int = 50, shot: int = 1, reduce_dim: int = 384, num_layers: int = 5,
                 backend: str = "auto", backbone_weights=None, recompute_ffn: bool = False,
                 check_values: bool = True, channels_last: bool = False):
        super().__init__()
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        self.shot, self.reduce_dim = shot, reduce_dim
        self.check_values = check_values
        self.set_channels_last(channels_last)
        c = reduce_dim
        self.adjust_feature_supp = nn.Sequential(*_conv_relu(MID_LEVEL_CHANNELS, c), nn.Dropout2d(FEATURE_DROPOUT))
        self.adjust_feature_qry = nn.Sequential(*_conv_relu(MID_LEVEL_CHANNELS, c), nn.Dropout2d(FEATURE_DROPOUT))
        self.high_avg_pool = nn.AdaptiveAvgPool1d(c)
        self.qry_merge_feat = nn.Sequential(*_conv_relu(2 * c + 1, c))  # + 1 prior channel
        self.supp_merge_feat = nn.Sequential(*_conv_relu(2 * c, c))
        self.transformer = IPMTransformer(embed_dims=c, num_layers=num_layers, shot=shot, backend=backend,
                                          recompute_ffn=recompute_ffn)
        self.merge_multi_lvl_reduce = nn.Sequential(*_conv_relu(c, c))
        self.merge_multi_lvl_sum = nn.Sequential(*_conv_relu(c, c, 3), *_conv_relu(c, c, 3))
        self.merge_res = nn.Sequential(*_conv_relu(c, c, 3), *_conv_relu(c, c, 3))
        self.ini_cls = _classifier(c)
        self.cls = _classifier(c)
        self.backbone = Backbone(layers, backbone_weights)
        self.set_backend(backend)

    @property
    def backend(self) -> str:
        """The model-wide backend name (:meth:`set_backend`)."""
        return self.transformer.backend

    @property
    def op_backends(self) -> Mapping[str, str]:
        """The transformer ops that run with a backend of their own (op name -> backend name): a
        copy; :meth:`set_backend` changes them."""
        return dict(self.transformer.op_backends)

    @property
    def ops(self) -> tuple:
        """The names of the ops the transformer calls."""
        return self.transformer.ops

    def op_backend(self, op: str) -> str:
        """The backend name the transformer's ``op`` runs with (see :meth:`set_backend`)."""
        return self.transformer.op_backend(op)

    def set_backend(self, backend: str, op_backends: Optional[Mapping[str, str]] = None) -> "IPMT":
        """Route every op through ``backend`` (same weights, same math): the transformer's ops (those
        named in ``op_backends`` through theirs, see :meth:`IPMTransformer.set_backend`), and the
        backbone literal (``reference``, the published conv then batch norm) or with each batch
        norm folded into its conv (any other). Returns ``self``."""
        self.transformer.set_backend(backend, op_backends)
        self.backbone.set_folded(backend != "reference")
        return self

    def set_recompute_ffn(self, recompute: bool) -> "IPMT":
        """Recompute (True) or keep (False) the transformer FFNs' hidden activations for backward
        (memory and time only; same values). Returns ``self``."""
        self.transformer.set_recompute_ffn(recompute)
        return self

    def set_channels_last(self, enabled: bool) -> "IPMT":
        """Run the feature maps channels-last (True) or contiguous (False, the default); see the
        class docstring. Returns ``self``."""
        self.map_layout = torch.channels_last if enabled else torch.contiguous_format
        return self

    # ----------------------------------------------------------------------------------------
    def _check_inputs(self, x, s_x, s_y, y):
        def fail(name, t, expected):
            raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)} dtype {t.dtype}")

        for name, t in (("x", x), ("s_x", s_x), ("s_y", s_y), ("y", y)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            fail("x", x, "a float tensor (B, 3, H, W)")
        b, _, h, w = x.shape
        if (h - 1) % OUTPUT_STRIDE or (w - 1) % OUTPUT_STRIDE:
            raise ValueError(f"x must have (H - 1) % 8 == 0 and (W - 1) % 8 == 0 (e.g. 473, 97), got H={h}, W={w}")
        if s_x.dim() != 5 or s_x.shape[0] != b or s_x.shape[2:] != x.shape[1:] or s_x.dtype != x.dtype:
            fail("s_x", s_x, f"(B, S, 3, H, W) = ({b}, {self.shot}, 3, {h}, {w}) of dtype {x.dtype}")
        if s_x.shape[1] != self.shot:
            raise ValueError(f"s_x has {s_x.shape[1]} shots but the model was built with shot={self.shot}")
        if s_y.shape != (b, self.shot, h, w):
            fail("s_y", s_y, f"(B, S, H, W) = ({b}, {self.shot}, {h}, {w})")
        if y is not None and y.shape != (b, h, w):
            fail("y", y, f"(B, H, W) = ({b}, {h}, {w})")
        if self.check_values and not _tracing_or_capturing(x):
            self._check_values(x, s_x, s_y, y)

    @staticmethod
    def _check_values(x, s_x, s_y, y):
        # One host sync for all value checks.
        labels = [s_y] + ([y] if y is not None else [])
        label_ok = torch.stack([sum((t == v) for v in VALID_LABELS).bool().all() for t in labels]).all()
        finite = torch.isfinite(x).all() & torch.isfinite(s_x).all()
        label_ok, finite = torch.stack([label_ok, finite]).tolist()
        if not finite:
            raise ValueError("x and s_x must be finite: found NaN or inf pixel values")
        if not label_ok:
            raise ValueError(f"s_y and y must hold labels in {VALID_LABELS} (0 background, 1 target, 255 ignore)")

    def generate_prior(self, query_high, support_high, support_masks):
        """PFENet's training-free prior: per shot, the max cosine similarity of each query token
        to the masked support tokens (layer4 pooled to C channels), min-max normalised; mean over
        shots -> ``(B, 1, h, w)``."""
        b, shot = support_masks.shape[:2]
        h, w = query_high.shape[-2:]
        q = self.high_avg_pool(query_high.flatten(2).transpose(-2, -1)).transpose(1, 2)  # (B, C, hw)
        q_norm = torch.norm(q, 2, 1, True)
        priors = []
        for st in range(shot):
            s = self.high_avg_pool((support_high[:, st] * support_masks[:, st]).flatten(2).transpose(-2, -1))
            s_norm = torch.norm(s, 2, 2, True)
            similarity = torch.bmm(s, q) / (torch.bmm(s_norm, q_norm) + COSINE_EPS)
            similarity = similarity.max(1)[0]
            low, high = similarity.min(1, keepdim=True)[0], similarity.max(1, keepdim=True)[0]
            priors.append(((similarity - low) / (high - low + COSINE_EPS)).view(b, 1, h, w))
        return torch.cat(priors, 1).mean(1, keepdim=True)

    def forward(self, x, s_x, s_y, y=None):
        self._check_inputs(x, s_x, s_y, y)
        if self.training and y is None:
            raise ValueError("y (B, H, W) query labels are required in training mode")
        b, _, img_h, img_w = x.shape
        shot = self.shot
        with torch.no_grad():  # frozen backbone
            images = torch.cat([x, s_x.flatten(0, 1)], 0)
            # Every map after the backbone's first convolution follows its input's layout.
            layer2, layer3, layer4 = self.backbone(images.contiguous(memory_format=self.map_layout))
        query_feat = self.adjust_feature_qry(torch.cat([layer2[:b], layer3[:b]], 1))
        supp_feat = self.adjust_feature_supp(torch.cat([layer2[b:], layer3[b:]], 1))  # (B*S, C, h, w)
        h, w = query_feat.shape[-2:]

        support_masks = F.interpolate((s_y == FOREGROUND_LABEL).flatten(0, 1).unsqueeze(1).to(x.dtype),
                                      size=(h, w), mode="bilinear", align_corners=True)  # (B*S, 1, h, w)
        shot_prototypes = weighted_gap(supp_feat, support_masks)  # (B*S, C, 1, 1)
        per_shot = shot_prototypes.view(b, shot, -1, 1, 1)
        global_prototype = sum(per_shot[:, st] for st in range(shot)) / shot

        prior = self.generate_prior(layer4[:b], layer4[b:].view(b, shot, *layer4.shape[1:]),
                                    support_masks.view(b, shot, 1, h, w))
        # The backbone's maps are read for the last time above: freed here rather than at return,
        # they are not part of the step's peak (saved tensors and all, at the end of the forward).
        del images, layer2, layer3, layer4
        query_feat = self.qry_merge_feat(torch.cat([query_feat, global_prototype.expand(-1, -1, h, w), prior], 1))
        init_out = self.ini_cls(self.merge_res(query_feat) + query_feat)
        init_mask = init_out.max(1)[1]
        supp_feat = self.supp_merge_feat(torch.cat([supp_feat, shot_prototypes.expand(-1, -1, h, w)], 1))

        padding_labels = y if y is not None else torch.zeros(b, img_h, img_w, device=x.device)
        feats, query_logits, support_logits = self.transformer(query_feat, padding_labels.to(x.dtype), supp_feat,
                                                               s_y.to(x.dtype), init_mask.detach())
        fused = self.merge_multi_lvl_reduce(feats[0])
        fused = self.merge_multi_lvl_sum(fused) + fused
        out = F.interpolate(self.cls(fused), size=(img_h, img_w), mode="bilinear", align_corners=True)
        if not self.training:
            return out
        # Losses in at least float32 whatever the autocast dtype.
        loss_dtype = torch.promote_types(out.dtype, torch.float32)
        init_out = F.interpolate(init_out, size=(img_h, img_w), mode="bilinear", align_corners=True)
        main_loss = (FINAL_DICE_WEIGHT * weighted_dice_loss(out.to(loss_dtype), y)
                     + (1 - FINAL_DICE_WEIGHT) * weighted_dice_loss(init_out.to(loss_dtype), y))
        aux_loss = duplex_segmentation_loss([q.to(loss_dtype) for q in query_logits],
                                            [s.to(loss_dtype) for s in support_logits], y, s_y)
        return out.max(1)[1], main_loss, aux_loss
