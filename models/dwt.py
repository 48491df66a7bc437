"""Parameter-free wavelet low-pass (LL band) downsampling, the WaveCNet replacement for stride 2.

For a wavelet whose reconstruction low-pass filter ``h = pywt.Wavelet(name).rec_lo`` has even
length ``2p``, the layer computes, independently for every channel,

    LL[i, j] = sum_a sum_b h[a] h[b] x[2i + a - (p - 1), 2j + b - (p - 1)]

with ``x`` zero outside the image; an ``H x W`` input gives ``floor(H/2) x floor(W/2)``.
For ``haar`` this is half the sum of each 2 x 2 block.

Two equivalent implementations, picked per call by what was measured fastest
(``benchmarks/backbone.py``, 2-core AVX512-BF16 CPU, forward + backward):

- ``conv``: one depthwise stride-2 convolution with the ``2p x 2p`` outer-product kernel
  (padding ``p - 1``). Fastest in float32, especially with ``channels_last`` inputs, and the
  usual choice on CUDA.
- ``matmul``: two banded matrix products, ``LL = A_H @ x @ A_W^T``, ``A_n`` the
  ``floor(n/2) x n`` matrix holding the shifted filter on every row. The only form that gains
  from bfloat16 on the CPU (oneDNN's depthwise bfloat16 kernel is several times slower than its
  float32 one), so it is used under CPU autocast or for half-precision CPU inputs. A
  ``channels_last`` input is multiplied in its own layout (``(N, H, W*C)`` then
  ``(N*H/2, W, C)``): no format conversion forward or backward, so the gradient reaching the
  preceding ReLU / BatchNorm is ``channels_last`` like their saved tensors (mixed layouts made
  those element-wise kernels several times slower). Forward + backward with the preceding ReLU,
  bfloat16, 96 x 64 x 64 x 64: 75 ms against 200 ms through NCHW products.

The filter is a non-persistent buffer (no state-dict key; it follows ``.to(device/dtype)``);
kernels and matrices are derived from it once per (shape, device, dtype) and cached, never
rebuilt per call.
"""

from __future__ import annotations

import pywt
import torch
from torch import nn
from torch.nn import functional as F

from common.errors import UserError

DEFAULT_WAVELET = "bior2.2"


def lowpass_filter(wavelet: str) -> list[float]:
    """The reconstruction low-pass filter ``rec_lo`` of a PyWavelets wavelet (even length)."""
    try:
        filt = list(pywt.Wavelet(wavelet).rec_lo)
    except (ValueError, TypeError):
        known = ", ".join(w for w in pywt.wavelist(kind="discrete")[:12])
        raise UserError(
            f"unknown wavelet '{wavelet}': use a discrete PyWavelets name, e.g. {known}, ... "
            "(full list: python -c \"import pywt; print(pywt.wavelist(kind='discrete'))\")"
        ) from None
    if len(filt) % 2:
        raise UserError(f"wavelet '{wavelet}' has an odd-length low-pass filter; choose another")
    return filt


def banded_matrix(filt: torch.Tensor, n: int) -> torch.Tensor:
    """The ``floor(n/2) x n`` analysis matrix: row ``i`` holds ``filt`` starting at ``2i-(p-1)``.

    Args:
        filt: ``(2p,)`` filter taps.
        n: input length along the axis.
    Returns:
        ``(n // 2, n)`` tensor, same dtype and device as ``filt``; taps that would fall outside
        ``[0, n)`` are dropped, which is the zero padding of the formula.
    """
    taps = filt.numel()
    half = taps // 2
    rows = n // 2
    # Column index of every (row, tap) pair; out-of-range taps are masked out.
    cols = 2 * torch.arange(rows, device=filt.device)[:, None] + torch.arange(taps, device=filt.device)
    cols = cols - (half - 1)
    valid = (cols >= 0) & (cols < n)
    matrix = torch.zeros(rows, n, dtype=filt.dtype, device=filt.device)
    row_idx = torch.arange(rows, device=filt.device)[:, None].expand_as(cols)
    matrix[row_idx[valid], cols[valid]] = filt.expand(rows, taps)[valid]
    return matrix


class WaveletDownsample(nn.Module):
    """LL band of a one-level 2-D DWT: ``(N, C, H, W) -> (N, C, H // 2, W // 2)``.

    Works for any ``H, W >= 2`` (odd sizes included), any float dtype, CPU or CUDA, and
    ``channels_last`` inputs (the output keeps the input's memory format).

    Args:
        wavelet: PyWavelets name (even-length filter), default ``bior2.2``.
        impl: ``"auto"`` (measured choice, see module doc), ``"conv"`` or ``"matmul"``.
    """

    IMPLS = ("auto", "conv", "matmul")

    def __init__(self, wavelet: str = DEFAULT_WAVELET, impl: str = "auto"):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, got {impl!r}")
        self.wavelet = wavelet
        self.impl = impl
        self.register_buffer(
            "filt", torch.tensor(lowpass_filter(wavelet), dtype=torch.float64), persistent=False
        )
        self._cache: dict[tuple, object] = {}

    def reset_buffers(self) -> None:
        """The filter again from the wavelet's name (on the filter's device): after ``to_empty``, which
        leaves a non-persistent buffer uninitialised."""
        self.filt = torch.tensor(lowpass_filter(self.wavelet), dtype=torch.float64, device=self.filt.device)
        self._cache = {}

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, impl={self.impl!r}"

    def _apply(self, fn, recurse=True):
        # Device/dtype moves invalidate the cache (everything is rebuilt from ``filt``).
        self._cache = {}
        return super()._apply(fn, recurse)

    def matrices(self, height: int, width: int, dtype: torch.dtype, device: torch.device):
        """Cached ``(A_H, A_W)`` with shapes ``(H//2, H)`` and ``(W//2, W)``."""
        key = ("matmul", height, width, dtype, device)
        cached = self._cache.get(key)
        if cached is None:
            filt = self.filt.to(device=device, dtype=torch.float64)
            cached = (banded_matrix(filt, height).to(dtype), banded_matrix(filt, width).to(dtype))
            self._cache[key] = cached
        return cached

    def kernel(self, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Cached depthwise kernel ``(C, 1, 2p, 2p)``: the outer product ``h h^T`` per channel."""
        key = ("conv", channels, dtype, device)
        cached = self._cache.get(key)
        if cached is None:
            filt = self.filt.to(device=device, dtype=torch.float64)
            taps = filt.numel()
            cached = torch.outer(filt, filt).to(dtype).expand(channels, 1, taps, taps).contiguous()
            self._cache[key] = cached
        return cached

    def choose_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        if x.device.type == "cpu" and (
            x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
        ):
            return "matmul"
        return "conv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)`` -> ``(N, C, H // 2, W // 2)``."""
        if x.dim() != 4:
            raise ValueError(f"WaveletDownsample expects (N, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height < 2 or width < 2:
            raise ValueError(f"WaveletDownsample needs H, W >= 2, got {height} x {width}")
        if self.choose_impl(x) == "conv":
            # Under autocast, conv2d casts input and kernel to the autocast dtype itself. int(): a
            # traced graph (TorchScript / ONNX export) gets a kernel of fixed shape, as ONNX needs.
            channels = int(x.shape[1])
            weight = self.kernel(channels, x.dtype, x.device)
            pad = self.filt.numel() // 2 - 1
            return F.conv2d(x, weight, stride=2, padding=pad, groups=channels)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return self._matmul_channels_last(x)
        a_h, a_w = self.matrices(height, width, x.dtype, x.device)
        return torch.matmul(torch.matmul(a_h, x), a_w.mT)

    def _matmul_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """``channels_last`` ``(N, C, H, W)`` -> ``channels_last`` ``(N, C, H // 2, W // 2)``.

        The memory is ``(N, H, W, C)``: rows are reduced on ``(N, H, W*C)``, then columns on
        ``(N*H/2, W, C)``, both plain views, so neither pass (nor its gradient) copies.
        """
        n, c, height, width = x.shape
        a_h, a_w = self.matrices(height, width, x.dtype, x.device)
        rows = torch.matmul(a_h, x.permute(0, 2, 3, 1).reshape(n, height, width * c))
        out = torch.matmul(a_w, rows.reshape(n * (height // 2), width, c))
        return out.reshape(n, height // 2, width // 2, c).permute(0, 3, 1, 2)
