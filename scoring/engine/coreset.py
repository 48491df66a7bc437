"""The bank sampler: PatchCore's greedy k-center coreset, exact, at matrix-product speed.

The greedy k-center (farthest-first) traversal adds, one at a time, the row farthest from every
centre chosen so far. Written directly, each new centre is a pass over the whole bank
(``|x - c|^2`` for every row, a running minimum, an argmax): memory-bound, 1.2 ms a step for
200,000 projected rows. :class:`FarthestFirst` chooses the same rows with far less work:

- *a pool*: the rows whose distance to the centres is largest are kept apart, exact, and updated
  every step (a small matrix-vector product); every other row keeps an *upper bound* of its
  distance (its distance when last updated: distances to the centres only shrink);
- while the pool's largest distance is above every bound outside it, that row is the farthest of
  the whole bank, and no other row needs to be touched;
- otherwise the rows are *caught up*, largest bound first: each against the centres added since it
  was last updated, in blocks of rows x centres (matrix products, compute-bound instead of
  memory-bound), until the rows not reached cannot enter the pool (their bounds are below the new
  pool's threshold). The pool holds for about 5% more centres after each catch-up (21 catch-ups
  for 20,000 centres); the rows are reached 4-5 times over in all. The work still grows as rows x
  centres, but as products near the cores' arithmetic speed, not a pass over memory per centre:
  200,000 rows 4.9 s instead of 24-35 s, a million 110 s instead of 15 min (2 cores).

Ties go to the lowest row index, as ``argmax`` over the whole bank. Every squared distance is
computed in float64 (float32 rows: the products are exact) and rounded to float32: the kernels
that sum it (a matrix-vector product for the pool, matrix products for the catch-ups, the direct
loop's pass, another rank's part) differ only far below that rounding, so each path sees the same
float32 distances and takes the same rows in the same order, whatever the pool, the blocks, the
ranks or the CPU. (Summed in float32 as before 2026-12-05, the kernels' rounding alone swapped near
ties: 706 of 20,000 places on the benchmark, and a sharded build differed from one process.)
On a GPU the direct loop runs in float32 (one kernel a step, no host round trip); under torchrun
each rank keeps its own pool and the ranks agree on the farthest row of the whole bank each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.distributed import DistInfo, all_gather, all_reduce_sum, part_offset
from common.errors import SettingError

__all__ = ["FarthestFirst", "GreedyCoresetSampler", "greedy_coreset", "greedy_coreset_direct", "project"]

# Rows projected per product while selecting a coreset: bounds the temporary copies.
PROJECT_ROWS = 65536
# A catch-up multiplies blocks of this many rows by this many centres: few enough blocks that the
# per-block overhead is small, the product compute-bound (float64, K = 32: ~50 GFLOP/s on 2 cores).
CATCH_UP_ROWS = 2048
CATCH_UP_CENTRES = 1024
# The pool: this share of the rows (within the bounds), exact at every step.
POOL_SHARE = 0.01
POOL_MIN, POOL_MAX = 256, 16384
# Rows a catch-up reaches at first (then a quarter more of those reached at each step).
CATCH_UP_CHUNK = 4096


@dataclass(frozen=True)
class GreedyCoresetSampler:
    """The bank sampler: PatchCore's greedy k-center coreset of ``fraction`` of the rows
    (:func:`greedy_coreset`). A sampler of your own has the same :meth:`select` and is passed to
    :func:`scoring.engine.model.bank_states` (as patchcore-inspection passes its sampler)."""

    fraction: float
    proj_dim: int = 32
    seed: int = 0

    def select(self, rows: torch.Tensor, device: torch.device | str = "cpu",
               shards: DistInfo | None = None) -> torch.Tensor:
        """``(B, D)`` rows (this rank's part under ``shards``) -> indices into the whole bank, in selection order."""
        return greedy_coreset(rows, self.fraction, seed=self.seed, proj_dim=self.proj_dim, device=device,
                              shards=shards)


class FarthestFirst:
    """Each row's squared distance to its nearest centre, kept lazily (see the module docstring).

    Args:
        x: ``(B, d)`` float32 rows (a rank's part under torchrun), on the CPU.
        capacity: the most centres that will be added.
    """

    def __init__(self, x: torch.Tensor, capacity: int):
        self.x, self.sq = x, squared_norms(x)
        count = x.shape[0]
        # An upper bound of each row's squared distance to the centres, exact for the centres
        # centres[:synced[row]] it has met (a distance to a centre only lowers it).
        self.bound = torch.full((count,), float("inf"))
        self.synced = torch.zeros(count, dtype=torch.long)
        # Per centre [-2 c, |c|^2]: a row [x, 1] times it is |x - c|^2 - |x|^2 in one product.
        self.centre_terms = torch.empty(capacity, x.shape[1] + 1, dtype=torch.float64)
        self.added = 0
        self.pool_size = min(count, max(POOL_MIN, min(POOL_MAX, int(POOL_SHARE * count))))
        self.pool: torch.Tensor | None = None  # row indices, ascending (argmax then takes the lowest on ties)
        self.pool_rows = self.pool_sq = self.pool_bound = torch.empty(0)  # the pool's [x, 1], |x|^2, bounds
        self.ceiling = float("-inf")  # every bound outside the pool is at most this
        self.catch_ups = 0
        self.rows_caught_up = 0

    def add(self, centre: torch.Tensor) -> None:
        """A new centre ``(d,)`` (a float32 row): the pool's distances are updated now."""
        centre = centre.double()
        terms = self.centre_terms[self.added]
        terms[:-1], terms[-1] = -2 * centre, squared_norms(centre[None])[0]
        self.added += 1
        if self.pool is not None:  # the catch-ups' product, for one centre
            dist = torch.addmv(self.pool_sq, self.pool_rows, terms).float()
            torch.minimum(self.pool_bound, dist, out=self.pool_bound)

    def farthest(self) -> tuple[float, int]:
        """The largest squared distance to the centres and its row (the lowest index on a tie)."""
        found = self.pool_farthest() if self.pool is not None else None
        if found is None:
            self.catch_up()
            found = self.pool_farthest()
        if found is None:  # a row outside the pool may tie with the pool's best: settle it over every row
            self.catch_up(every=True)
            best = int(torch.argmax(self.bound))
            found = float(self.bound[best]), best
        return found

    def pool_farthest(self) -> tuple[float, int] | None:
        """The pool's farthest row and its squared distance, if it is above every bound outside the
        pool (then no row outside is as far), else ``None``."""
        best = int(torch.argmax(self.pool_bound))
        value = float(self.pool_bound[best])
        return (value, int(self.pool[best])) if value > self.ceiling else None

    def catch_up(self, every: bool = False) -> None:
        """Bring rows up to date, largest bound first, until the rows not reached cannot enter the
        pool (``every``: all rows); then choose the pool again and its ceiling."""
        self.catch_ups += 1
        if self.pool is not None:  # the pool is exact: its distances and their step go back
            self.bound[self.pool] = self.pool_bound
            self.synced[self.pool] = self.added
        count, want = self.bound.shape[0], self.pool_size + 1
        outside = float("-inf")  # the largest bound of the rows not reached
        if every or want > count:
            self.meet_centres(torch.nonzero(self.synced < self.added)[:, 0])
        else:
            # Largest bound first, in growing chunks, until the want-th largest distance reached is
            # at least the next bound: the rows not reached cannot enter the pool.
            order = torch.argsort(self.bound, descending=True)
            stale = self.bound[order]
            best, reached = torch.empty(0), 0
            while reached < count:
                chunk = order[reached:reached + max(CATCH_UP_CHUNK, reached // 4)]
                self.meet_centres(chunk[self.synced[chunk] < self.added])
                reached += chunk.numel()
                merged = torch.cat([best, self.bound[chunk]])
                best = merged.topk(min(want, merged.numel())).values
                if reached < count and best.numel() == want and float(best[-1]) >= float(stale[reached]):
                    outside = float(stale[reached])
                    break
        if self.pool_size == count:
            self.pool, self.ceiling = torch.arange(count), float("-inf")
        else:
            top = torch.topk(self.bound, want)
            self.pool = top.indices[:self.pool_size].sort().values
            # On a tie with a bound not reached, the pool may hold a row not yet up to date.
            self.meet_centres(self.pool[self.synced[self.pool] < self.added])
            self.ceiling = max(float(top.values[-1]), outside)
        self.pool_rows, self.pool_sq = self.augmented(self.pool), self.sq[self.pool]
        self.pool_bound = self.bound[self.pool].clone()

    def meet_centres(self, rows: torch.Tensor) -> None:
        """Each of ``rows`` (indices) against the centres added since it was last updated."""
        if rows.numel() == 0:
            return
        self.rows_caught_up += rows.numel()
        since = self.synced[rows]
        for first in torch.unique(since).tolist():  # rows last updated at the same step share their centres
            group = rows[since == first]
            for r0 in range(0, group.numel(), CATCH_UP_ROWS):
                part = group[r0:r0 + CATCH_UP_ROWS]
                self.bound[part] = self.nearest(part, first, self.bound[part])
        self.synced[rows] = self.added

    def nearest(self, rows: torch.Tensor, first: int, bound: torch.Tensor) -> torch.Tensor:
        """``(n,)`` rows' bounds lowered by the centres ``first:`` added (float64 products, rounded)."""
        x, sq = self.augmented(rows), self.sq[rows, None]
        for c0 in range(first, self.added, CATCH_UP_CENTRES):
            dist = torch.addmm(sq, x, self.centre_terms[c0:min(self.added, c0 + CATCH_UP_CENTRES)].t())
            bound = torch.minimum(bound, dist.amin(1).float())
        return bound

    def augmented(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` row indices -> ``(n, d + 1)`` float64 ``[x, 1]``: times a centre's ``[-2 c, |c|^2]``
        it is ``|x - c|^2 - |x|^2``."""
        return torch.cat([self.x[rows].double(), torch.ones(rows.numel(), 1, dtype=torch.float64)], 1)


def greedy_coreset(bank: torch.Tensor, fraction: float, seed: int = 0, proj_dim: int = 32,
                   device: torch.device | str = "cpu", progress: bool = True,
                   shards: DistInfo | None = None) -> torch.Tensor:
    """Greedy k-center subset of ``bank`` rows (PatchCore's coreset), as indices.

    The bank is first projected to ``proj_dim`` dimensions by a seeded Gaussian random
    projection (distances roughly kept, the loop much cheaper); the first centre is a seeded
    random row and is always included; each next centre is the row farthest from all chosen
    (:class:`FarthestFirst` on the CPU, :func:`greedy_coreset_direct`'s loop on a GPU).
    Memory: the projected rows, a bound and a step per row, and the centres (the projection made
    in blocks of :data:`PROJECT_ROWS`, so a million rows need no second copy of the bank).

    Under torchrun with a sharded bank (``shards``), ``bank`` is this rank's part, the parts in
    rank order make the bank, and every rank gets the indices (into the whole bank) one process
    would choose: each step every rank offers its own farthest row (distance, index, projected
    row) in one all-gather and all take the largest (the lowest index on a tie, as ``argmax``).

    Args:
        bank: ``(B, D)``.
        fraction: share of rows kept, in (0, 1].
    Returns:
        ``(ceil(fraction * B_total),)`` long tensor of row indices, in selection order.
    """
    plan = coreset_plan(bank, fraction, seed, proj_dim, device, shards)
    if plan is None:
        return torch.arange(bank.shape[0])
    x, first, keep, offset, shards = plan
    if x.device.type != "cpu":
        return direct_loop(x, first, keep, offset, shards, progress)
    state = FarthestFirst(x, keep)
    chosen = torch.empty(keep, dtype=torch.long)
    chosen[0] = first
    centre = shared_centre(x, first - offset, shards)
    for i in tqdm(range(1, keep), desc="coreset", unit="centre", leave=False, disable=not progress,
                  mininterval=1.0):
        state.add(centre)
        value, local = state.farthest()
        if shards is None:
            chosen[i], centre = local, x[local]
        else:
            chosen[i], centre = offered_farthest(x, value, local, offset, shards)
    return chosen


def greedy_coreset_direct(bank: torch.Tensor, fraction: float, seed: int = 0, proj_dim: int = 32,
                          device: torch.device | str = "cpu", progress: bool = True,
                          shards: DistInfo | None = None) -> torch.Tensor:
    """:func:`greedy_coreset` by the direct loop (a pass over every row per centre): what a GPU runs,
    and the reference the tests and ``benchmarks.coreset_scale --compare`` hold the CPU's to."""
    plan = coreset_plan(bank, fraction, seed, proj_dim, device, shards)
    if plan is None:
        return torch.arange(bank.shape[0])
    return direct_loop(*plan, progress)


def coreset_plan(bank: torch.Tensor, fraction: float, seed: int, proj_dim: int, device: torch.device | str,
                 shards: DistInfo | None):
    """What both loops start from: ``(x, first, keep, offset, shards)``, or ``None`` when every row is kept."""
    if not 0 < fraction <= 1:
        raise SettingError("coreset", fraction, "must be in (0, 1]; 1 keeps the whole bank")
    shards = shards if shards is not None and shards.enabled else None
    offset, count = part_offset(bank.shape[0], shards)
    keep = max(1, math.ceil(fraction * count))
    if keep >= count:
        return None
    gen = torch.Generator().manual_seed(seed)
    x = project(bank, proj_dim, gen, device)
    first = int(torch.randint(0, count, (1,), generator=gen))
    return x, first, keep, offset, shards


def direct_loop(x: torch.Tensor, first: int, keep: int, offset: int, shards: DistInfo | None,
                progress: bool) -> torch.Tensor:
    """The farthest-first traversal, one pass over every row per centre (see :func:`greedy_coreset`):
    on the CPU the distances in float64 rounded to float32, as :class:`FarthestFirst`'s; on a GPU in float32."""
    if x.device.type == "cpu":
        x = x.double()
    sq = squared_norms(x)
    # Kept on the device: reading each new centre back to the host would stall a GPU every step.
    chosen = torch.empty(keep, dtype=torch.long, device=x.device)
    chosen[0] = first
    min_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    centre = chosen[0]
    if shards is not None:  # the centre's projected row, from the rank that holds it
        c = shared_centre(x, first - offset, shards).to(x.dtype)
    for i in tqdm(range(1, keep), desc="coreset", unit="centre", leave=False, disable=not progress,
                  mininterval=1.0):
        if shards is None:
            # index_select with a 1-element tensor: indexing with a 0-d tensor would read it on the host.
            c = x.index_select(0, centre.view(1))[0]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one fused matrix-vector product per new centre
        dist = torch.addmv(sq, x, c, alpha=-2).add_(squared_norms(c[None])).float()
        torch.minimum(min_dist, dist, out=min_dist)
        if shards is None:
            centre = torch.argmax(min_dist)
        else:
            local = int(torch.argmax(min_dist)) if min_dist.numel() else -1
            value = float(min_dist[local]) if local >= 0 else float("-inf")
            centre, c = offered_farthest(x, value, local, offset, shards)
            c = c.to(x.dtype)
        chosen[i] = centre
    return chosen.cpu()


def project(bank: torch.Tensor, proj_dim: int, gen: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """``(B, D)`` -> ``(B, proj_dim)`` float32 on ``device``: a seeded Gaussian random projection, made
    in blocks of :data:`PROJECT_ROWS` rows (the rows as they are when ``proj_dim`` is 0 or >= D)."""
    if not proj_dim or proj_dim >= bank.shape[1]:
        return bank.detach().to(device, torch.float32).contiguous()
    proj = (torch.randn(bank.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)).to(device)
    out = torch.empty(bank.shape[0], proj_dim, device=device)
    for start in range(0, bank.shape[0], PROJECT_ROWS):
        out[start:start + PROJECT_ROWS] = bank[start:start + PROJECT_ROWS].detach().to(device, torch.float32) @ proj
    return out


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` -> ``(n,)`` squared norms, in float64 (on a GPU in ``x``'s dtype)."""
    x = x.double() if x.device.type == "cpu" else x
    return (x * x).sum(1)


def shared_centre(x: torch.Tensor, local: int, shards: DistInfo | None) -> torch.Tensor:
    """The centre's projected row ``(d,)``; under torchrun sent by the rank that holds row ``local``
    of its part (the others add zeros: the sum is the row, exactly)."""
    if shards is None:
        return x[local]
    packed = torch.zeros(x.shape[1], dtype=torch.float64)  # on the host: scoring's process group is gloo
    if 0 <= local < x.shape[0]:
        packed[:] = x[local].cpu().double()
    return all_reduce_sum(packed, shards).to(x.device, torch.float32)


def offered_farthest(x: torch.Tensor, value: float, local: int, offset: int,
                     shards: DistInfo) -> tuple[int, torch.Tensor]:
    """The whole bank's farthest row from every rank's own (``value`` at its row ``local``, -1 when
    its part is empty): the largest, the lowest index on a tie (as ``argmax``), with its projected
    row ``(d,)`` (float32); one all-gather per step."""
    offer = torch.full((x.shape[1] + 2,), float("-inf"), dtype=torch.float64)
    if local >= 0:
        offer[0], offer[1], offer[2:] = value, offset + local, x[local].double()
    offers = torch.stack(all_gather(offer, shards))
    best = offers[offers[:, 0] == offers[:, 0].max()]
    winner = best[best[:, 1].argmin()]  # float64 holds float32 values, rows and row indices exactly
    return int(winner[1]), winner[2:].to(x.device, torch.float32)
