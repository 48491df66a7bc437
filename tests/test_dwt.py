"""The wavelet low-pass layer against a direct NumPy evaluation of its formula (models/dwt.py)."""

import numpy as np
import pytest
import pywt
import torch

from common.errors import UserError
from models.dwt import WaveletDownsample


def lowpass_reference(x: np.ndarray, wavelet: str) -> np.ndarray:
    """LL[i, j] = sum_a sum_b h[a] h[b] x[2i + a - (p-1), 2j + b - (p-1)], zero outside."""
    h = np.asarray(pywt.Wavelet(wavelet).rec_lo, dtype=np.float64)
    p = len(h) // 2
    *lead, height, width = x.shape
    out = np.zeros((*lead, height // 2, width // 2))
    for i in range(height // 2):
        for j in range(width // 2):
            for a in range(2 * p):
                for b in range(2 * p):
                    r, c = 2 * i + a - (p - 1), 2 * j + b - (p - 1)
                    if 0 <= r < height and 0 <= c < width:
                        out[..., i, j] += h[a] * h[b] * x[..., r, c]
    return out


WAVELETS = ["haar", "bior2.2", "db2", "sym4"]
SIZES = [(8, 8), (15, 17), (7, 4), (2, 3), (16, 11)]


@pytest.mark.parametrize("impl", ["conv", "matmul"])
@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_matches_formula(wavelet, size, impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *size))
    layer = WaveletDownsample(wavelet, impl=impl).double()
    out = layer(torch.from_numpy(x)).numpy()
    assert out.shape == (2, 3, size[0] // 2, size[1] // 2)
    np.testing.assert_allclose(out, lowpass_reference(x, wavelet), rtol=1e-10, atol=1e-12)


def test_odd_size_shape():
    assert WaveletDownsample()(torch.rand(1, 2, 15, 17)).shape == (1, 2, 7, 8)


@pytest.mark.parametrize("impl", ["conv", "matmul"])
def test_haar_is_half_block_sum(impl):
    x = torch.rand(2, 4, 10, 12, dtype=torch.float64)
    block_sum = x.unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(-1, -2))
    torch.testing.assert_close(WaveletDownsample("haar", impl=impl).double()(x), 0.5 * block_sum)


@pytest.mark.parametrize("impl", ["conv", "matmul"])
@pytest.mark.parametrize("size", [(6, 6), (7, 9)])
def test_gradcheck(impl, size):
    layer = WaveletDownsample("bior2.2", impl=impl).double()
    x = torch.rand(1, 2, *size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_no_state_dict_keys_and_follows_dtype():
    layer = WaveletDownsample("db2")
    assert layer.state_dict() == {}
    assert layer.filt.dtype == torch.float64
    layer = layer.to(torch.float32)
    assert layer.filt.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["auto", "conv", "matmul"])
def test_low_precision_close_to_float32(dtype, impl):
    x = torch.rand(2, 8, 16, 16)
    layer = WaveletDownsample(impl=impl)
    ref = layer(x)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_autocast_and_channels_last():
    x = torch.rand(2, 8, 16, 12)
    layer = WaveletDownsample()
    ref = layer(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = layer(x_cl)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.choose_impl(x) == "matmul"
        out = layer(x_cl)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("wavelet", ["haar", "bior2.2"])
@pytest.mark.parametrize("size", SIZES)
def test_matmul_in_channels_last_layout(wavelet, size):
    """The channels_last matmul path (no layout conversion) gives the formula, keeps the layout,
    and its gradient comes back channels_last too."""
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((2, 5, *size))
    x = torch.from_numpy(x_np).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = WaveletDownsample(wavelet, impl="matmul").double()
    inner = x * 1  # not a leaf: its gradient arrives in whatever layout the layer's backward makes
    grads = []
    inner.register_hook(grads.append)
    out = layer(inner)
    np.testing.assert_allclose(out.detach().numpy(), lowpass_reference(x_np, wavelet), rtol=1e-10, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(torch.ones_like(out).contiguous(memory_format=torch.channels_last))
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    small = torch.rand(1, 3, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(layer, (small.requires_grad_(),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda(dtype):
    x = torch.rand(2, 8, 15, 16)
    ref = WaveletDownsample()(x)
    out = WaveletDownsample().cuda()(x.cuda().to(dtype))
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)


def test_unknown_wavelet_is_user_error():
    with pytest.raises(UserError, match="unknown wavelet 'nope'"):
        WaveletDownsample("nope")
