"""The segmentation head of dense self-supervision: where is the synthetic anomaly?

A light feature-pyramid head on the backbone's first three stages (strides 4, 8 and 16): each
stage is projected to ``width`` channels by a 1x1 convolution, upsampled onto the stride-4 grid
and summed, then a 3x3 convolution and a 1x1 convolution give one logit per position. Trained
jointly with the classifier on the synthetic anomalies' exact masks (``training.segmentation``),
its gradient also shapes the backbone's features that the nearest-neighbour scoring uses. Its
weights live beside the network's in a checkpoint (``seg_head_state_dict``), so the network's
own state dict still loads into the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Stages the head reads (layer1..layer3).
HEAD_STAGES = 3
# Initial bias of the logit: the prior of a pixel being anomalous, about 5% in a training batch.
PRIOR_LOGIT = -3.0


class SegHead(nn.Module):
    """Per-position anomaly logits from the first three stages.

    Args:
        in_channels: channels of layer1..layer3 (``WaveCNet.feature_channels[:3]``).
        width: channels inside the head.
    """

    def __init__(self, in_channels: Sequence[int], width: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for c in in_channels[:HEAD_STAGES])
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))
        if self.fuse[-1].weight.is_meta:  # built to be loaded (models.checkpoint.empty_network)
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fuse[-1].weight, std=0.01)
        nn.init.constant_(self.fuse[-1].bias, PRIOR_LOGIT)

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[layer1 (N, C_1, S/4, S/4), layer2, layer3, ...]`` -> logits ``(N, 1, S/4, S/4)``."""
        target = stages[0].shape[-2:]
        total = None
        for project, feature in zip(self.lateral, stages[:HEAD_STAGES]):
            x = project(feature)
            if x.shape[-2:] != target:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        return self.fuse(total)
