"""A stand-in for the paper's wavelet layer, for side-by-side speed comparisons only.

It computes the same LL band as ``models.dwt.WaveletDownsample`` but the way the original
WaveCNet layer does its work: on every call the banded matrices are rebuilt in Python loops
(NumPy), converted to tensors, and applied by a custom autograd function whose backward
multiplies by the transposed matrices. Written from the paper's description, not copied.
It requires even sizes, as the original effectively does.
"""

from __future__ import annotations

import numpy as np
import pywt
import torch
from torch import nn


def _rebuild_matrix(filt: list[float], n: int) -> np.ndarray:
    taps = len(filt)
    half = taps // 2
    rows = n // 2
    wide = np.zeros((rows, n + taps - 2))
    for i in range(rows):
        for j in range(taps):
            wide[i, 2 * i + j] = filt[j]
    end = None if half == 1 else -half + 1
    return wide[:, half - 1:end]


class _LowPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, left, right):
        ctx.save_for_backward(left, right)
        return torch.matmul(torch.matmul(left, x), right)

    @staticmethod
    def backward(ctx, grad):
        left, right = ctx.saved_tensors
        return torch.matmul(torch.matmul(left.t(), grad), right.t()), None, None


class PaperStyleDownsample(nn.Module):
    def __init__(self, wavelet: str = "bior2.2"):
        super().__init__()
        self.filt = list(pywt.Wavelet(wavelet).rec_lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        left = torch.Tensor(_rebuild_matrix(self.filt, height)).to(x.device)
        right = torch.Tensor(_rebuild_matrix(self.filt, width).T.copy()).to(x.device)
        return _LowPass.apply(x, left, right)
