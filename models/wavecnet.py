"""WaveCNet ResNets: every stride-2 step of a ResNet replaced by a wavelet low-pass band.

Layout (state-dict compatible with the paper's released checkpoints, see ``tests/data``):

- stem: ``conv1`` 7x7 stride 2, ``bn1``, ReLU, then a wavelet downsample instead of max-pool;
- stages ``layer1..layer4``; in the first block of stages 2-4 the residual branch downsamples
  with ``Sequential(dwt, conv)`` (``conv2`` of a basic block, ``conv3`` of a bottleneck) and the
  shortcut with ``Sequential(dwt, conv1x1, bn)``; the parameter-free layer sits at index 0, which
  is why keys read ``conv2.1.weight`` / ``downsample.1.weight``;
- head: global average pool, ``head`` = 3 x (Linear, BatchNorm1d, ReLU) to 512, 512, 128, then
  ``out`` = Linear(128, num_classes). ``fc`` is kept (unused) so state dicts match.

For an ``S x S`` input the stage outputs are ``S/4, S/8, S/16, S/32`` on a side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .dwt import DEFAULT_WAVELET, WaveletDownsample
from .seghead import SegHead

DownsampleFactory = Callable[[], nn.Module]


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, bias=False)


def with_downsample(downsample: DownsampleFactory | None, layer: nn.Module) -> nn.Module:
    """``layer`` alone, or ``Sequential(downsample(), layer)`` when this step halves the grid."""
    return layer if downsample is None else nn.Sequential(downsample(), layer)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; when downsampling, the wavelet layer precedes ``conv2``."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, downsample: DownsampleFactory | None,
                 shortcut: nn.Module | None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = with_downsample(downsample, conv3x3(width, width))
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1; when downsampling, the wavelet layer precedes ``conv3``."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, downsample: DownsampleFactory | None,
                 shortcut: nn.Module | None):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = with_downsample(downsample, conv1x1(width, out_ch))
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WaveCNet(nn.Module):
    """A ResNet with wavelet downsampling and the paper's classification head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        depths: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        wavelet: PyWavelets name of the low-pass filter used by every downsampling step.
        num_classes: logits produced by ``out`` (3: normal, CutPaste, Perlin).
        downsample_layer: factory for the downsampling module (injected, default the DWT).
        dense: also build the segmentation head (:class:`models.seghead.SegHead`, dense
            self-supervision); created after the backbone's initialisation, so the backbone
            starts from the same weights as without it.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, ...],
                 wavelet: str = DEFAULT_WAVELET, num_classes: int = 3,
                 downsample_layer: Callable[[str], nn.Module] = WaveletDownsample, dense: bool = False):
        super().__init__()
        self.wavelet = wavelet
        self.num_classes = num_classes

        def make_downsample() -> nn.Module:
            return downsample_layer(wavelet)

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.stem_downsample = make_downsample()

        in_ch = 64
        self.feature_channels: list[int] = []
        for stage, depth in enumerate(depths):
            width = 64 * 2 ** stage
            step = make_downsample if stage > 0 else None
            blocks, in_ch = self._make_stage(block, in_ch, width, depth, step)
            self.add_module(f"layer{stage + 1}", blocks)
            self.feature_channels.append(in_ch)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)  # unused; kept for state-dict compatibility
        # Frozen so that DistributedDataParallel does not wait for its (never coming) gradient.
        self.fc.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Linear(in_ch, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            nn.Linear(512, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
        )
        self.out = nn.Linear(128, num_classes)
        self._init_weights()
        self.seg_head = SegHead(self.feature_channels) if dense else None

    @staticmethod
    def _make_stage(block, in_ch: int, width: int, depth: int,
                    downsample: DownsampleFactory | None) -> tuple[nn.Sequential, int]:
        out_ch = width * block.expansion
        shortcut = None
        if downsample is not None or in_ch != out_ch:
            parts = [downsample()] if downsample is not None else []
            parts += [conv1x1(in_ch, out_ch), nn.BatchNorm2d(out_ch)]
            shortcut = nn.Sequential(*parts)
        blocks = [block(in_ch, width, downsample, shortcut)]
        blocks += [block(out_ch, width, None, None) for _ in range(1, depth)]
        return nn.Sequential(*blocks), out_ch

    def _init_weights(self) -> None:
        if self.conv1.weight.is_meta:  # built to be loaded (models.checkpoint.empty_network): nothing to draw
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """``(N, 3, S, S)`` -> ``[layer1, layer2, layer3, layer4][:stages]``.

        Shapes: ``(N, C_i, S / 2**(i+1), S / 2**(i+1))`` for stage ``i = 1..4`` with
        ``C = 64, 128, 256, 512`` (wave18/34) or ``256, 512, 1024, 2048`` (wave50/101); odd
        sizes are floored at every halving. ``stages < 4`` skips the deeper stages (scoring
        layers 2 and 3 needs no layer4).
        """
        x = self.stem_downsample(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:stages]:
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, last_feature: torch.Tensor) -> torch.Tensor:
        """``(N, C_4, h, w)`` -> logits ``(N, num_classes)``."""
        pooled = torch.flatten(self.avgpool(last_feature), 1)
        return self.out(self.head(pooled))

    def forward(self, x: torch.Tensor) -> tuple:
        """``(N, 3, S, S)`` -> ``(logits (N, num_classes), [layer1, layer2, layer3, layer4])``, plus the
        segmentation head's logits ``(N, 1, S/4, S/4)`` as a third element when the network has one."""
        features = self.forward_features(x)
        logits = self.forward_head(features[-1])
        if self.seg_head is None:
            return logits, features
        return logits, features, self.seg_head(features)
