"""Model registry: ``create_model(name, wavelet, num_classes)`` for the WaveCNet ResNets.

>>> import models
>>> net = models.create_model("wave50")          # bior2.2 wavelet, 3 classes
>>> logits, (f1, f2, f3, f4) = net(torch.rand(2, 3, 256, 256))
"""

from __future__ import annotations

from collections.abc import Callable

from common.errors import UserError

from .dwt import DEFAULT_WAVELET, WaveletDownsample
from .seghead import HEAD_STAGES, SegHead
from .wavecnet import BasicBlock, Bottleneck, WaveCNet

# The network halves the image five times: smaller inputs leave layer4 without pixels.
MIN_SIZE = 32
# Largest image side the network is given: at 8192 px the first convolution's output of one
# image alone is 17 GB (64 channels x 8192^2 float32).
MAX_SIZE = 4096

# name -> (block, blocks per stage); keep in sync with ``checkpoint.infer_arch``.
ARCHS: dict[str, tuple[type, tuple[int, int, int, int]]] = {
    "wave18": (BasicBlock, (2, 2, 2, 2)),
    "wave34": (BasicBlock, (3, 4, 6, 3)),
    "wave50": (Bottleneck, (3, 4, 6, 3)),
    "wave101": (Bottleneck, (3, 4, 23, 3)),
}


def list_models() -> list[str]:
    return list(ARCHS)


def create_model(name: str, wavelet: str = DEFAULT_WAVELET, num_classes: int = 3,
                 downsample_layer: Callable[[str], object] = WaveletDownsample, dense: bool = False) -> WaveCNet:
    """Build an untrained network by name (``wave18``, ``wave34``, ``wave50``, ``wave101``); ``dense``
    adds the segmentation head (``net.seg_head``)."""
    if name not in ARCHS:
        raise UserError(f"unknown arch '{name}': choose one of {', '.join(ARCHS)}")
    block, depths = ARCHS[name]
    return WaveCNet(block, depths, wavelet=wavelet, num_classes=num_classes,
                    downsample_layer=downsample_layer, dense=dense)


__all__ = ["ARCHS", "DEFAULT_WAVELET", "HEAD_STAGES", "MAX_SIZE", "MIN_SIZE", "SegHead", "WaveCNet",
           "WaveletDownsample", "create_model", "list_models"]
