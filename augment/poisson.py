"""Seamless (Poisson, gradient-domain) blending of a patch of another image: NSA-style anomalies.

As in *Natural Synthetic Anomalies* (Schlüter et al., 2022): a rectangle of the source image
is pasted into the normal image keeping only its *gradients*; the values inside are solved so
that their discrete Laplacian equals the source patch's and they meet the normal image on the
rectangle's one-pixel border. The patch's texture and structure come across, its mean colour and
any seam do not, so the anomaly is subtler than CutPaste's.

The Dirichlet problem is solved exactly, not iterated: the rectangle's interior Laplacian is
diagonal in the type-I discrete sine basis (:func:`solve_dirichlet`, two small matrix products
per side). The mask is the pixels that changed by more than :data:`CHANGE_THRESHOLD` (in any
channel; pinholes closed), not the whole rectangle.
"""

from __future__ import annotations

import functools
import math

import torch

from .regions import lerp, uniforms

CHANGE_THRESHOLD = 0.04  # about 10 grey levels of 255
MIN_CHANGE = 1 / 255  # below one grey level a change is rounding, never marked
PATCH_SIDE = (0.1, 0.35)  # each side ~ U[0.1 S, 0.35 S), at least 3 px


@functools.lru_cache(maxsize=512)
def _sine_basis(n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(n, n)`` DST-I matrix ``sin(pi j k / (n + 1))`` and the 1-D Laplacian's eigenvalues ``(n,)``."""
    k = torch.arange(1, n + 1, dtype=torch.float64)
    basis = torch.sin(math.pi * k[:, None] * k[None, :] / (n + 1))
    eigen = 2 * torch.cos(math.pi * k / (n + 1)) - 2
    return basis.to(device=device, dtype=dtype), eigen.to(device=device, dtype=dtype)


def solve_dirichlet(rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``T_m X + X T_n = rhs`` for ``X``: the 5-point Laplacian with zero Dirichlet border.

    Args:
        rhs: ``(C, m, n)`` float (``T`` the ``(-2, 1)`` second-difference matrices).
    Returns:
        ``(C, m, n)``, exact up to rounding (the DST-I ``S`` diagonalises ``T`` and ``S S = (n+1)/2 I``).
    """
    m, n = rhs.shape[-2:]
    sm, mu = _sine_basis(m, str(rhs.device), rhs.dtype)
    sn, nu = _sine_basis(n, str(rhs.device), rhs.dtype)
    coeffs = sm @ rhs @ sn * (4 / ((m + 1) * (n + 1)))
    return sm @ (coeffs / (mu[:, None] + nu[None, :])) @ sn


def seamless_clone(target: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)`` target and patch -> ``(C, h, w)``: the patch's Laplacian inside, ``target`` on the border.

    The result is ``patch + d`` inside, ``d`` the harmonic function equal to ``target - patch`` on
    the one-pixel border (which keeps ``target``'s values). Not clamped. Smaller than 3 x 3: ``target``.
    """
    _, h, w = target.shape
    if h < 3 or w < 3:
        return target.clone()
    ring = target - patch
    ring[:, 1:-1, 1:-1] = 0
    boundary = ring[:, :-2, 1:-1] + ring[:, 2:, 1:-1] + ring[:, 1:-1, :-2] + ring[:, 1:-1, 2:]
    out = target.clone()
    out[:, 1:-1, 1:-1] = patch[:, 1:-1, 1:-1] + solve_dirichlet(-boundary)
    return out


def poisson(image: torch.Tensor, source: torch.Tensor,
            rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seamlessly blend a rectangle of ``source`` into ``image`` (gradients replaced, border kept).

    Rectangle sides ``h, w ~ U[0.1 S, 0.35 S)`` each (at least 3 px), cut anywhere in ``source``
    and pasted anywhere in ``image`` (six uniforms from ``rng``).

    Args:
        image, source: ``(3, S, S)`` float in [0, 1].
    Returns:
        ``(anomalous image (3, S, S) in [0, 1], mask (S, S) bool)``: the pixels of the rectangle
        that changed noticeably (:func:`changed_region`; empty only when nothing changed at all).
    """
    _, size, _ = image.shape
    u = uniforms(6, rng)
    low = min(3, size)
    h, w = (max(low, int(lerp(PATCH_SIDE[0], PATCH_SIDE[1], v) * size)) for v in u[:2])
    sy, sx = int(u[2] * (size - h + 1)), int(u[3] * (size - w + 1))
    ty, tx = int(u[4] * (size - h + 1)), int(u[5] * (size - w + 1))
    out = image.clone()
    blended = seamless_clone(image[:, ty:ty + h, tx:tx + w], source[:, sy:sy + h, sx:sx + w])
    out[:, ty:ty + h, tx:tx + w] = blended.clamp(0, 1)
    change = (out - image).abs().amax(0)
    return out, changed_region(change, (ty, tx, h, w))


def changed_region(change: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """``(S, S)`` per-pixel change -> bool mask: above ``CHANGE_THRESHOLD``, closed (3 x 3) in ``box``.

    The closing (dilate, then erode) fills pinholes of textured patches; pixels that did not
    change at all stay out. When no pixel passes the threshold the most changed ones (at least
    half the largest change) are the mask, unless even they changed by under ``MIN_CHANGE``
    (rounding: the mask is then empty).
    """
    top, left, h, w = box
    mask = change > CHANGE_THRESHOLD
    if not mask.any():
        return (change >= 0.5 * change.max()) & (change >= MIN_CHANGE)
    inside = mask[None, None, top:top + h, left:left + w].float()
    closed = -torch.nn.functional.max_pool2d(-torch.nn.functional.max_pool2d(inside, 3, 1, 1), 3, 1, 1)
    mask[top:top + h, left:left + w] = closed[0, 0] > 0
    return mask & (change > 0)
