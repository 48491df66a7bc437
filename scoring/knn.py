"""Memory bank search: exact k-nearest-neighbour distances, and greedy k-center coresets.

Two backends give the same Euclidean distances:

- ``torch``: chunked ``|q|^2 - 2 q.b + |b|^2`` matrix products with a running top-k, so
  memory stays bounded (``chunk_mb``) whatever the bank and query sizes; same code on CPU and
  CUDA;
- ``faiss``: ``IndexFlatL2`` (exact), on the GPU when faiss has GPU support and the device is
  CUDA. Selected by ``auto`` whenever faiss is installed: it is faster on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError
from runtime import bf16_available

BACKENDS = ("auto", "torch", "faiss")
PRECISIONS = ("auto", "fp32", "bf16")
# Shortlist length beyond k of the bf16 pass; the exact float32 distances of the shortlist decide.
RERANK_MARGIN = 16


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "faiss" if faiss_available() else "torch"
    if name == "faiss" and not faiss_available():
        raise UserError("--knn faiss: faiss is not installed; pip install faiss-cpu, or use --knn torch")
    return name


class NearestNeighbours:
    """Exact k-NN Euclidean distances from queries to a fixed bank.

    Args:
        bank: ``(B, D)`` float tensor.
        backend: ``torch`` or ``faiss`` (``auto`` resolves to faiss when installed).
        precision: torch backend: ``fp32`` or ``bf16`` products of centred vectors shortlist
            candidates whose exact float32 distances are returned; ``auto`` = bf16 on CUDA and
            on CPUs with native bfloat16.
        device: where the torch backend computes (and the faiss GPU index lives for CUDA).
        chunk_mb: memory budget of one distance block of the torch backend.
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto", device: torch.device | str = "cpu",
                 chunk_mb: int = 256, precision: str = "auto"):
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"bank must be (B, D) with B > 0, got {tuple(bank.shape)}")
        self.backend = resolve_backend(backend)
        self.device = torch.device(device)
        self.size, self.dim = bank.shape
        self.chunk_elems = max(1, chunk_mb * 2**20 // 4)
        if self.backend == "faiss":
            import faiss

            index = faiss.IndexFlatL2(self.dim)
            if self.device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
                self._gpu_res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, index)
            index.add(np.ascontiguousarray(bank.detach().float().cpu().numpy()))
            self.index = index
        else:
            self.bank = bank.detach().to(self.device, torch.float32).contiguous()
            if precision == "auto":
                precision = "bf16" if bf16_available(self.device) else "fp32"
            # Ranked on vectors centred on the bank mean: distances do not change, but ReLU features
            # share a large mean, and |q|^2 - 2 q.b + |b|^2 on uncentred ones cancels catastrophically
            # (float32 distances off by more than 1 on trained wave18 features). bf16 products run on
            # tensor cores (15x the float32 rate on an H200); the shortlist's exact float32 distances
            # are returned either way.
            self.mean = self.bank.mean(0)
            centred = self.bank - self.mean
            self.centred_sq = (centred * centred).sum(1)
            self.bank_low = centred.to(torch.bfloat16 if precision == "bf16" else torch.float32)
            self.precision = precision

    def search(self, queries: torch.Tensor, k: int = 1) -> torch.Tensor:
        """``(M, D)`` queries -> ``(M, k)`` distances to the ``k`` nearest bank rows, ascending."""
        if k > self.size:
            raise UserError(f"--k {k} is larger than the memory bank ({self.size} patches); lower --k")
        if self.backend == "faiss":
            dist_sq, _ = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
            return torch.from_numpy(dist_sq).clamp_min_(0).sqrt_()
        return self._search_rerank(queries.detach().to(self.device, torch.float32), k).cpu()

    def _search_rerank(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Products of centred vectors (bf16 or float32) shortlist ``k + RERANK_MARGIN`` rows per
        query; their exact float32 distances pick ``k``.

        The result misses a true neighbour only if it ranks below the shortlist, i.e. when more
        than ``RERANK_MARGIN`` rows tie with it within the products' rounding (bf16: about 0.4% of
        ``|q| |b|``); even then the distances returned are exact ones.
        """
        keep = min(self.size, k + RERANK_MARGIN)
        q_rows = max(1, min(queries.shape[0], 4096))
        b_rows = max(keep, self.chunk_elems // q_rows)
        out = []
        for q0 in range(0, queries.shape[0], q_rows):
            q = queries[q0:q0 + q_rows]
            q_low = (q - self.mean).to(self.bank_low.dtype)
            best_val = best_idx = None
            for b0 in range(0, self.size, b_rows):
                # |q|^2 is the same for every row of a query: left out of the ranking.
                products = (q_low @ self.bank_low[b0:b0 + b_rows].t()).float()
                approx = products.mul_(-2).add_(self.centred_sq[b0:b0 + b_rows][None, :])
                val, idx = approx.topk(min(keep, approx.shape[1]), dim=1, largest=False)
                idx += b0
                if best_val is not None:
                    val, pick = torch.cat([best_val, val], 1).topk(keep, dim=1, largest=False)
                    idx = torch.cat([best_idx, idx], 1).gather(1, pick)
                best_val, best_idx = val, idx
            shortlist = self.bank[best_idx]  # (q, keep, D)
            exact = (shortlist - q[:, None, :]).square_().sum(-1)
            out.append(exact.topk(k, dim=1, largest=False).values.sqrt_())
        return torch.cat(out)


def greedy_coreset(bank: torch.Tensor, fraction: float, seed: int = 0, proj_dim: int = 32,
                   device: torch.device | str = "cpu", progress: bool = True) -> torch.Tensor:
    """Greedy k-center subset of ``bank`` rows (PatchCore's coreset), as indices.

    The bank is first projected to ``proj_dim`` dimensions by a seeded Gaussian random
    projection (distances roughly kept, the loop much cheaper); the first centre is a seeded
    random row and is always included; each next centre is the row farthest from all chosen.

    Args:
        bank: ``(B, D)``.
        fraction: share of rows kept, in (0, 1].
    Returns:
        ``(ceil(fraction * B),)`` long tensor of row indices, in selection order.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"--coreset {fraction}: must be in (0, 1]; 1 keeps the whole bank")
    count = bank.shape[0]
    keep = max(1, math.ceil(fraction * count))
    if keep >= count:
        return torch.arange(count)
    gen = torch.Generator().manual_seed(seed)
    x = bank.detach().to(device, torch.float32)
    if proj_dim and proj_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], proj_dim, generator=gen).to(x.device) / math.sqrt(proj_dim)
        x = x @ proj
    sq = (x * x).sum(1)
    first = int(torch.randint(0, count, (1,), generator=gen))
    # Kept on the device: reading each new centre back to the host would stall a GPU every step.
    chosen = torch.empty(keep, dtype=torch.long, device=x.device)
    chosen[0] = first
    min_dist = torch.full((count,), float("inf"), device=x.device)
    centre = chosen[0]
    for i in tqdm(range(1, keep), desc="coreset", unit="centre", leave=False, disable=not progress,
                  mininterval=1.0):
        # index_select with a 1-element tensor: indexing with a 0-d tensor would read it on the host.
        c = x.index_select(0, centre.view(1))[0]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one fused matrix-vector product per new centre
        dist = torch.addmv(sq, x, c, alpha=-2).add_(sq.index_select(0, centre.view(1)))
        torch.minimum(min_dist, dist, out=min_dist)
        centre = torch.argmax(min_dist)
        chosen[i] = centre
    return chosen.cpu()
