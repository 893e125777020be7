"""Deep-stem ResNet-50/101 backbone with frozen batch norm and dilation (output stride 8).

The layout is PFENet's ``resnet50_v2`` / ``resnet101_v2``: a three-conv stem (3->64->64->128),
torchvision v1.5 bottlenecks (stride on the 3x3 conv), and layer3 / layer4 dilated by 2 / 4
instead of strided. Every parameter is frozen. Module names follow the published checkpoints
(``backbone.body.layer1.0.conv1.weight`` ...).

Every frozen batch norm follows a convolution. Literally (the ``reference`` backend) it is a
multiply and an add over the conv's output map; folded (every other backend,
:meth:`Backbone.set_folded`) the pair is one convolution with bias whose weights PyTorch's
``fuse_conv_bn_weights`` derives from the conv's and the norm's: two passes over each feature map
fewer, the same function up to rounding. The folded weights are derived, never stored: the state
dict is the same either way. Folded float32 convolutions on the CPU, outside autograd, run in
oneDNN with the ReLU (and, on channels-last maps, the residual add) that follow them as post-ops
(:func:`conv_post_ops_apply`).
"""
from __future__ import annotations

import os
import weakref
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

BN_EPS = 1e-5
STEM_WIDTH = 128
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, no gradients).

    ``after(conv, x)`` is ``self(conv(x))``, computed literally or, with ``fold`` set, as one
    convolution with the norm folded into its weight and bias (:meth:`folded_into`); it also
    takes the residual add and ReLU that follow it in the network."""

    fold = False  # set per instance by Backbone.set_folded
    _folded = None  # the cache of folded_into: (source refs, source states, weight, bias)

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def __getstate__(self):
        # deepcopy and pickling leave the cache behind (it holds weak references).
        return {**self.__dict__, "_folded": None}

    def after(self, conv: nn.Conv2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
              relu: bool = False) -> torch.Tensor:
        """``conv`` then this norm on ``x``, then ``+ residual`` and a ReLU when asked: the published
        operations in turn, or with ``fold`` one convolution with bias, run by oneDNN with its ReLU
        (and, on channels-last maps, its add) as post-ops where :func:`conv_post_ops_apply` (one
        pass over the map instead of three, the same float32 values)."""
        if not self.fold:
            out = self(conv(x))
        else:
            layout = map_layout(x)
            weight, bias = self.folded_into(conv, layout)
            if conv_post_ops_apply(x, residual):
                geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
                # oneDNN fuses an add only into channels-last convolutions; for others PyTorch's
                # binary op falls back to its own convolution choice (im2col on small maps), so
                # those add after a oneDNN convolution.
                if residual is not None and layout == torch.channels_last:
                    return torch.ops.mkldnn._convolution_pointwise.binary(
                        x, residual, weight, bias, *geometry, "add", None, "relu" if relu else None, [], None)
                activation = "relu" if relu and residual is None else "none"
                out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, activation, [], None)
                if residual is None:
                    return out
                out.add_(residual)
                return out.relu_() if relu else out
            out = conv._conv_forward(x, weight, bias)
        if residual is not None:
            out = out + residual
        return out.relu_() if relu else out

    def folded_into(self, conv: nn.Conv2d, layout: torch.memory_format = torch.contiguous_format
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` of the one convolution equal to ``conv`` (no bias) then this norm,
        from PyTorch's ``fuse_conv_bn_weights``, the weight stored in ``layout`` (that of the maps
        it convolves, so the convolution does not convert it on every call).

        Eagerly they are cached and reused while ``conv.weight`` and the four buffers are the same
        tensors (same objects, storage, dtype, device) at the same version, so in-place changes,
        ``load_state_dict`` and ``.to()`` are followed (changes made through ``.data`` bypass the
        version counter and are not). While a CUDA graph captures they are computed anew without
        caching, so a replay follows the weights; while torch.compile traces, by
        :func:`fold_traceable` (the routine's constructor of ``nn.Parameter`` breaks the graph).
        Weights only, cheap either way; no host-side check enters a graph."""
        sources = (conv.weight, self.weight, self.bias, self.running_mean, self.running_var)
        if torch.compiler.is_compiling():
            weight, bias = fold_traceable(*sources, BN_EPS)
            return weight.contiguous(memory_format=layout), bias
        if (conv.weight.is_cuda and torch.cuda.is_current_stream_capturing()) or any(t.is_inference() for t in sources):
            return self._fold(conv, layout)
        states = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in sources) + (layout,)
        cached = self._folded
        if cached is not None and cached[1] == states and all(r() is t for r, t in zip(cached[0], sources)):
            return cached[2], cached[3]
        weight, bias = self._fold(conv, layout)
        self._folded = (tuple(weakref.ref(t) for t in sources), states, weight, bias)
        return weight, bias

    def _fold(self, conv: nn.Conv2d, layout: torch.memory_format) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(conv.weight, None, self.running_mean, self.running_var, BN_EPS,
                                                self.weight, self.bias)
        return weight.detach().contiguous(memory_format=layout), bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of ordinary BatchNorm2d carry a counter this module has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight * (self.running_var + BN_EPS).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def map_layout(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a ``(N, C, H, W)`` map stored channels-last (and not also
    contiguous, as maps with one channel or one pixel are), else ``torch.contiguous_format``."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_post_ops_apply(x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """Whether a folded convolution of ``x`` runs in oneDNN with its ReLU (and add) as post-ops
    (:meth:`FrozenBatchNorm2d.after`): float32 CPU maps with oneDNN on, nothing to differentiate,
    and neither CPU autocast (which runs the convolutions in its own dtype) nor torch.compile
    tracing (Inductor fuses the plain operations itself)."""
    # Tracing first: Dynamo refuses to trace the torch.backends queries.
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled()
                     and (x.requires_grad or (residual is not None and residual.requires_grad))))


def fold_traceable(conv_weight, bn_weight, bn_bias, running_mean, running_var, eps):
    """``fuse_conv_bn_weights(conv_weight, None, ...)``'s arithmetic, operation for operation (the
    same bits; tests/test_backbone_fold.py checks), without its ``nn.Parameter`` results, which
    torch.compile cannot create inside a graph."""
    with torch.no_grad():
        rsqrt = torch.rsqrt(running_var + eps)
        weight = conv_weight * (bn_weight * rsqrt).reshape(-1, 1, 1, 1)
        bias = (torch.zeros_like(running_mean) - running_mean) * rsqrt * bn_weight + bn_bias
    return weight, bias


def _conv3x3(cin, cout, stride=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: 1x1, 3x3 (stride, dilation), 1x1, residual."""

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * EXPANSION)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample[1].after(self.downsample[0], x)
        out = self.bn1.after(self.conv1, x, relu=True)
        out = self.bn2.after(self.conv2, out, relu=True)
        return self.bn3.after(self.conv3, out, residual=identity, relu=True)


class DeepStemResNet(nn.Module):
    """The ResNet body: stem, layer1..layer4; returns the layer2, layer3 and layer4 maps."""

    def __init__(self, depth: int = 50):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"layers must be one of {sorted(BLOCKS)}, got {depth}")
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = FrozenBatchNorm2d(64)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = FrozenBatchNorm2d(64)
        self.conv3 = _conv3x3(64, STEM_WIDTH)
        self.bn3 = FrozenBatchNorm2d(STEM_WIDTH)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes, self._dilation = STEM_WIDTH, 1
        blocks = BLOCKS[depth]
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(512, blocks[3], stride=2, dilate=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes, count, stride=1, dilate=False):
        # torchvision's rule: a dilated layer's first block keeps the previous dilation.
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * EXPANSION:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                                       FrozenBatchNorm2d(planes * EXPANSION))
        layers = [Bottleneck(self._inplanes, planes, stride, first_dilation, downsample)]
        self._inplanes = planes * EXPANSION
        layers += [Bottleneck(self._inplanes, planes, dilation=self._dilation) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.bn1.after(self.conv1, x, relu=True)
        x = self.bn2.after(self.conv2, x, relu=True)
        x = self.maxpool(self.bn3.after(self.conv3, x, relu=True))
        layer2 = self.layer2(self.layer1(x))
        layer3 = self.layer3(layer2)
        return layer2, layer3, self.layer4(layer3)


class Backbone(nn.Module):
    """Frozen deep-stem ResNet; ``body`` holds the weights under their published names."""

    def __init__(self, depth: int = 50, weights: Union[str, os.PathLike, dict, None] = None):
        super().__init__()
        self.body = DeepStemResNet(depth)
        if weights is not None:
            load_backbone_weights(self.body, weights)
        self.body.requires_grad_(False)

    @property
    def folded(self) -> bool:
        return any(m.fold for m in self.modules() if isinstance(m, FrozenBatchNorm2d))

    def set_folded(self, folded: bool) -> "Backbone":
        """Run every conv + frozen batch norm as one folded convolution (True) or literally, conv
        then the norm's multiply and add (False: the published form). Same weights, same state
        dict. Returns ``self``."""
        for m in self.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.fold = bool(folded)
                m._folded = None
        return self

    def forward(self, x):
        return self.body(x)


def load_backbone_weights(body: DeepStemResNet, weights) -> None:
    """Load a PFENet-layout ImageNet checkpoint (``resnet50_v2.pth``) into ``body``.

    Accepts a path or a state dict, optionally nested under ``state_dict`` and prefixed by
    ``module.``; the classifier (``fc.*``) and batch-norm counters are dropped.
    """
    state = torch.load(weights, map_location="cpu", weights_only=True) if not isinstance(weights, dict) else weights
    state = state.get("state_dict", state)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = set(body.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"backbone_weights do not match a deep-stem ResNet: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    body.load_state_dict(state)
