"""A lower bound of every distance to a bank from its principal axes: how the exact search
(:class:`scoring.engine.knn.BankSearch`) ranks a bank with a fraction of the products and still
proves its answer.

For orthonormal axes ``P`` (``D x p``) and a centred vector ``x``, the *projection* is
``x~ = [P^T x, |x - P P^T x|]``: ``p + 1`` values, with ``|x~| = |x|``. For any two vectors,

    |q - b|^2 = |P^T (q - b)|^2 + |R (q - b)|^2 >= |P^T q - P^T b|^2 + (|R q| - |R b|)^2 = |q~ - b~|^2

(``R = I - P P^T``; the inequality is the triangle inequality in ``R``'s space). So the ranking
value ``|b~|^2 - 2 q~.b~`` is at most the true one, ``|b|^2 - 2 q.b``, and a row whose projected
value is above the ``k``-th distance found cannot be nearer: the search ranks by the projection,
re-ranks its candidates with the full vectors, and re-ranks every row the projection cannot rule
out (the band). Any axes keep the bound; principal axes make it tight. Features of trained and
untrained wave networks hold 62-98% of their variance in 16 axes: with 64, the rows a projection
cannot rule out at the exact nearest distance are 0.01-0.3% of the bank on average (docs/speed.md);
:func:`choose_dims` picks how many axes a bank takes.

Rows and queries are projected in float64 from their float32 values (a difference of two float32
numbers is exact in float64) and kept in float32 for the products; :data:`PROJECTION_ROUNDING`
bounds what that adds to a ranking value's rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROJECT_BLOCK_ROWS = 16384  # rows projected at once (float64: bounds memory)
# How many axes: the one of these that minimises the scan's estimated cost (choose_dims). Not 32:
# the estimate preferred it on the untrained latency benchmark (0.73 against 1.10), where
# `predict` ran as fast with 64 and the exported files 25-35% slower with 32 (their groups are
# coarser, so a looser bound makes them compute more again).
DIMS_CHOICES = (64, 128)
# The cost of one exact re-rank (gathering a row: ~0.64 us on 2 cores) in projected values of 66
# numbers (~1 ns each, their product and the group minima), as measured on an Intel Xeon.
PAIR_COST = 640.0
# A brute-force search's cost per (query, row) in the same units (4-9 measured on the development
# sets' banks): where a projection is estimated to cost more (features spread over every axis, whose
# bounds rule little out), a bank of DECIDE_ROWS rows or more is not projected. A smaller one always
# is (one way to search; either costs little there).
BRUTE_FORCE_COST = 4.0
DECIDE_ROWS = 16384
FIRST_PASS_SHARE = 2  # a scan's first pass takes this fraction of the axes (first_pass_rows)
TREE_AXES = 16  # tree_order splits along the first axes (and the residual norm): most of the spread
PROBES = 128  # sampled rows whose nearest other sampled row sets the reach of the estimate
PROBE_SAMPLE = 16384  # rows (evenly spaced) of the estimate


def projection_rounding(dim: int) -> float:
    """Relative rounding a projection adds to ``q~.b~`` (times ``|q| |b|``) for ``D = dim``: both
    operands rounded from float64 to float32 (2 units), and the float64 cancellation in the residual
    norm ``sqrt(|x|^2 - |P^T x|^2)``, off by up to ``sqrt(2 D 2^-53) |x|`` for each of the two."""
    return 2 * 2.0 ** -24 + 2 * math.sqrt(2 * dim * 2.0 ** -53)


def principal_axes(rows: torch.Tensor, offset: torch.Tensor, dims: int, fit_rows: int) -> torch.Tensor:
    """``(B, D)`` rows (minus ``offset`` ``(D,)``) -> ``(D, dims)`` float64 orthonormal axes of largest
    variance, from at most ``fit_rows`` evenly spaced rows."""
    sample = rows[::max(1, rows.shape[0] // fit_rows)].double() - offset
    _, vectors = torch.linalg.eigh(sample.t() @ sample)  # ascending eigenvalues
    return vectors[:, -dims:].flip(1).contiguous()


def residual_norms(squared: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
    """``(n,)`` ``|x|^2`` and ``(n, p)`` ``P^T x`` (float64) -> ``(n,)`` ``|x - P P^T x|``."""
    return (squared - along.pow(2).sum(1)).clamp_min(0).sqrt()


def project(centred: torch.Tensor, axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, D)`` centred vectors and ``(D, p)`` axes, float64 for the bounds (float32 where the values
    only rank rows, :meth:`.knn.BankSearch.nearest_among`) -> ``(n, p + 1)`` projections and ``(n,)``
    squared norms ``|x|^2`` (= ``|x~|^2``), in that dtype."""
    along = centred @ axes
    squared = centred.pow(2).sum(1)
    return torch.cat([along, residual_norms(squared, along)[:, None]], 1), squared


def choose_dims(rows: torch.Tensor, offset: torch.Tensor, axes: torch.Tensor,
                choices: tuple[int, ...] = DIMS_CHOICES) -> int | None:
    """The number of ``axes`` (one of ``choices``) for which a scan costs least, estimated on the
    bank itself: in a sample of its rows (evenly spaced, as far apart as a coreset's), ``PROBES`` of
    them with their nearest other sampled row's distance as the reach; the share ``f`` of the
    sample whose bound is within it is what a scan re-ranks, so a query costs about
    ``(p + 2) / 66 + f PAIR_COST`` per row. More axes bound more tightly and cost more to multiply:
    features whose variance lies in few axes take few (wave18's untrained and toothbrush's 64),
    spread ones more (Magnetic Tile's 128). ``None`` where even the cheapest is dearer than brute
    force (:data:`BRUTE_FORCE_COST`) in a bank of :data:`DECIDE_ROWS` rows or more."""
    sample = rows[::max(1, rows.shape[0] // PROBE_SAMPLE)].double() - offset
    probe_index = torch.arange(0, sample.shape[0], max(1, sample.shape[0] // PROBES), device=rows.device)[:PROBES]
    probes = sample[probe_index]
    distance = torch.cdist(probes, sample).pow(2)
    distance[torch.arange(probes.shape[0], device=rows.device), probe_index] = float("inf")  # not itself
    reach = distance.amin(1)
    probe_along, probe_sq = probes @ axes, probes.pow(2).sum(1)
    along, squared = sample @ axes, sample.pow(2).sum(1)
    costs = {}
    for dims in (dims for dims in choices if dims <= axes.shape[1]):
        probe_rest, rest = residual_norms(probe_sq, probe_along[:, :dims]), residual_norms(squared, along[:, :dims])
        bound = torch.cdist(probe_along[:, :dims], along[:, :dims]).pow(2)
        bound += (probe_rest[:, None] - rest[None, :]).pow(2)
        costs[dims] = (dims + 2) / 66 + float((bound <= reach[:, None]).double().mean()) * PAIR_COST
    best = min(costs, key=costs.get)
    return best if costs[best] <= BRUTE_FORCE_COST or rows.shape[0] < DECIDE_ROWS else None


@dataclass
class Projection:
    """A bank's projection: ``axes`` ``(D, p)`` float64, ``offset`` ``(D,)`` float64 (subtracted from rows
    and queries: the bank mean, or zero when the rows are stored centred) and ``rows`` ``(B, p + 2)``
    float32: each row's projection and its ``|b|^2`` (one product with :meth:`queries` ranks them)."""

    axes: torch.Tensor
    offset: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def fit(cls, rows: torch.Tensor, offset: torch.Tensor, fit_rows: int, dims: int | None = None) -> Projection | None:
        """The projection of ``(B, D)`` float32 ``rows`` minus ``offset`` ``(D,)`` on their principal axes
        (``dims`` of them; by default :func:`choose_dims`'s choice, and ``None`` where none pays)."""
        offset = offset.double()
        axes = principal_axes(rows, offset, max(DIMS_CHOICES) if dims is None else dims, fit_rows)
        if dims is None:
            dims = choose_dims(rows, offset, axes)
            if dims is None:
                return None
            axes = axes[:, :dims].contiguous()
        parts = [project(rows[start:start + PROJECT_BLOCK_ROWS].double() - offset, axes)
                 for start in range(0, rows.shape[0], PROJECT_BLOCK_ROWS)]
        return cls(axes, offset, torch.cat([torch.cat([p, n[:, None]], 1) for p, n in parts]).float())

    def queries(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, D)`` float32 queries in the rows' frame -> ``(m, p + 2)`` float64 ``[-2 q~, 1]`` (so that
        ``queries @ rows.T`` are the ranking values ``|b|^2 - 2 q~.b~``) and ``(m,)`` float64 ``|q|^2``."""
        projected, squared = project(frame.double() - self.offset, self.axes)
        return torch.cat([-2.0 * projected, torch.ones_like(squared)[:, None]], 1), squared


def leading_coordinates(rows: torch.Tensor, axes: int) -> torch.Tensor:
    """``(B, p + 2)`` projected rows -> ``(B, a + 1)``: their first ``a = min(axes, p)`` axes and their
    residual norm (where most of a projection's spread is)."""
    return torch.cat([rows[:, :min(axes, rows.shape[1] - 2)], rows[:, -2:-1]], 1)


def tree_order(rows: torch.Tensor, group: int, axes: int = TREE_AXES, sample: int = 4096) -> torch.Tensor:
    """``(B, p + 2)`` projected rows -> ``(B,)`` an order of them in which every ``group`` consecutive
    rows (from the first) lie close together: each range of rows is split in two along its widest
    direction (the principal axis of a sample of it, in the first ``axes`` axes and the residual
    norm, where most of the spread is), at a multiple of ``group`` near its middle, until ranges are
    one group. A scan's groups are then compact, so few of them come within a query's reach."""
    order = torch.arange(rows.shape[0], device=rows.device)
    points = leading_coordinates(rows, axes)  # kept in `order`
    ranges = [(0, rows.shape[0])]
    while ranges:
        low, high = ranges.pop()
        count = high - low
        if count <= group:
            continue
        picked = points[low:high:max(1, count // sample)].double()
        picked = picked - picked.mean(0)
        axis = torch.linalg.eigh(picked.t() @ picked)[1][:, -1].to(points.dtype)
        sorted_ = (points[low:high] @ axis).argsort()
        order[low:high], points[low:high] = order[low:high][sorted_], points[low:high][sorted_]
        cut = low + max(group, min(count - 1, round(count / (2 * group)) * group))
        ranges += [(low, cut), (cut, high)]
    return order


def first_pass_rows(rows: torch.Tensor, axes: int | None = None) -> torch.Tensor:
    """``(B, p + 2)`` projected rows (:class:`Projection`) -> ``(B, s + 2)`` float32 ``[b_s, r_b, |b_s|^2 +
    r_b^2]``: the first ``s`` axes (by default half of them) and the residual norm, for a first pass
    at about half the products. ``|q_s - b_s|^2 + (r_q - r_b)^2`` drops the other axes' terms, so it is
    still a lower bound of ``|q - b|^2``, a looser one."""
    kept = leading_coordinates(rows, axes or (rows.shape[1] - 2) // FIRST_PASS_SHARE)
    return torch.cat([kept, kept.double().pow(2).sum(1, keepdim=True).float()], 1).contiguous()

