"""The loss of dense self-supervision: where the synthetic anomaly is, from its exact mask.

Every synthetic anomaly comes with the mask of the pixels it changed, so the network can learn
*where* it is, not only *that* there is one (as DRAEM and NSA do). The segmentation head's
logits are upsampled to the image size and compared with the masks of the whole batch (normal
images: empty masks) by a focal loss (which keeps the many easy background pixels from
drowning the few anomalous ones) plus a soft Dice loss over the batch (which weighs the
anomalous region as a whole, whatever its size).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def mask_batch(normal: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masks in the order of :func:`training.loop.make_batch`: ``(B, 3, S, S)`` normals (no anomaly)
    and ``(B, G, S, S)`` anomaly masks -> ``((G+1) B, S, S)`` float targets."""
    empty = torch.zeros(normal.shape[0], *masks.shape[-2:], device=masks.device)
    return torch.cat([empty, *[m.float() for m in masks.unbind(1)]])


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Mean binary focal loss of logits and targets of one shape."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_true = prob * target + (1 - prob) * (1 - target)
    return ((1 - p_true) ** gamma * bce).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - Dice`` of the sigmoid probabilities and the targets, summed over the whole batch."""
    prob = torch.sigmoid(logits)
    overlap = (prob * target).sum()
    return 1 - (2 * overlap + smooth) / (prob.sum() + target.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Head logits ``(N, 1, h, w)`` and target masks ``(N, S, S)`` -> focal + soft Dice loss (a scalar).

    The logits are upsampled bilinearly to the masks' size, so thin anomalies count at full resolution.
    """
    full = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return focal_loss(full, target) + soft_dice_loss(full, target)
