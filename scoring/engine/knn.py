"""Memory bank search: exact k-nearest-neighbour distances (the coreset sampler is :mod:`.coreset`).

:class:`BankSearch` is an ``nn.Module`` holding one bank as buffers. A bank of
:data:`PROJECT_MIN_DIMS` dimensions or more (every wave network's) is searched by a *scan of its
projection* (:meth:`BankSearch._scan`, :mod:`.projection`): each row's projection on the bank's
principal axes (64 or 128 of them, :func:`.projection.choose_dims`) plus one residual norm
gives a lower bound of its distance to a query, at a sixth to a third of the products. A first
pass (on half the axes: a looser bound at half the products) finds, for each query, the group of
rows of lowest bound, and in it a reach (an exact distance no smaller than the ``k``-th nearest);
only the rows whose bound is within the reach are re-ranked exactly, and no other row can be
nearer. The projected rows are kept in a tree order (:func:`.projection.tree_order`), so that a
group holds near rows and a reach takes in few groups. On trained and untrained wave features that
re-ranks ~0.05-0.5% of the rows (``benchmarks/pruning.py``).

A narrower bank is searched in two steps:

1. *shortlist*: the ``k + SHORTLIST`` best candidates by ``|b|^2 - 2 q.b`` on vectors centred on
   the bank mean, computed per chunk of bank rows with a running top-k (memory bounded, and
   traceable: the number of chunks is fixed by the bank). The products run in float32, or in
   bfloat16 (``precision``; ``auto`` where it pays: CUDA, CPUs with AMX). faiss
   (``backend="faiss"``, ``IndexFlatL2`` on the centred rows) is an optional accelerator of this
   step only;
2. *exact re-rank*: the shortlist's distances computed directly, ``|b - q|``, in float32; the
   ``k`` smallest are returned.

So every path returns the same exact distances. A bfloat16 product can be off
by ~2^-8 |q| |b|, far more than the gap between near neighbours of trained features (a 16-row
shortlist missed the nearest row often enough to move image scores by 6% on toothbrush): a
bfloat16 shortlist is therefore checked against that bound, and every query it cannot certify
is searched again in float32. A float32 shortlist misses a neighbour only when more than
``SHORTLIST`` rows tie with it within float32 rounding, and then returns the exact distance of a
row as near within that rounding. Inside a traced graph (``torch.jit.trace``, ONNX export) the
torch shortlist in float32 is used; the projected scan runs traced as it runs eagerly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from common.distributed import DistInfo, all_gather, all_reduce_sum
from common.errors import SettingError
from common.runtime import PRECISIONS, bf16_matmul_pays

from ..config import BACKENDS
from .projection import Projection, first_pass_rows, project, projection_rounding, tree_order

# Candidates beyond k whose exact distances decide, for float32 and for bfloat16 products.
SHORTLIST = 8
SHORTLIST_BF16 = 16
# faiss scans fewer queries than this without BLAS (138 ms against torch's 22 ms for 16 queries x
# 214,000 rows x 384): the torch shortlist takes them.
FAISS_MIN_QUERIES = 32
# faiss 1.15 scans up to 128,000 queries without BLAS (its distance_compute_blas_threshold): 256
# queries x 49,000 rows x 384 took 416 ms so, 64 ms with BLAS (2 cores of an AMD EPYC). Our
# searches set it to this while they run. The rounding bound of _shortlist_holds is the BLAS
# form's (|q|^2 + |b|^2 - 2 q.b), the worse of the two.
FAISS_BLAS_QUERIES = 20
BAND_ROWS = 4096  # an unsure query with more rows than this within rounding of its k-th goes finer
# Fewer queries than this take float32 products under precision "auto" (see BankSearch._dtype); at
# most FAISS_MIN_QUERIES, so these are always ranked by the torch shortlist.
FEW_QUERIES = FAISS_MIN_QUERIES
# A float32 pass for few queries multiplies the rows as stored, in blocks of this many (no centred
# float32 copy of the bank beside the rows; see BankSearch._uncentred_products).
UNCENTRED_BLOCK_ROWS = 8192
# Bank rows compared with the queries in one product, and queries per product in eager mode:
# bounds memory (rows x queries x 4 bytes = 64 MB); a traced graph takes all its queries at once
# against chunks of CHUNK_ROWS. In eager mode few queries take longer chunks (up to CHUNK_ELEMENTS
# products each): 16 queries against 214,000 rows are one product, not 52 with a merge each.
CHUNK_ROWS = 4096
QUERY_ROWS = 4096
CHUNK_ELEMENTS = CHUNK_ROWS * QUERY_ROWS
GPU_CHUNK_FACTOR = 16  # on CUDA: blocks of up to 268 M products (1 GB of float32 scores)
FAISS_ADD_ROWS = 65536
# Banks of at least these many dimensions are searched in a projection on their principal axes
# plus one residual norm (see BankSearch._scan): a lower bound of every distance that leaves
# ~0.05-0.5% of the rows of trained and untrained wave features to re-rank (docs/speed.md). Every
# such bank, however small: one way to search, whatever the bank's size.
PROJECT_MIN_DIMS = 256
PROJECTION_FIT_ROWS = 65536  # rows (evenly spaced) whose covariance gives the axes: any axes keep the bound
# Pairs gathered at once for their exact distances in eager mode: small enough to stay in cache
# (100,000 pairs: 64 ms in blocks of 2,048, 138 in blocks of 65,536, 235 in one).
PAIR_ROWS = 2048
# Projected values per block of a scan: 16 MB, one buffer reused (see BankSearch._scan_block).
SCAN_ELEMENTS = 1 << 22
# Rows per group of a scan's first pass (its lowest value per query is kept; see BankSearch._scan).
SCAN_GROUP_ROWS = 512
TREE_ORDER = True  # projected rows in projection.tree_order (False: the bank's order; for comparisons)
TRACED_GROUPS = 24  # a traced graph's scan groups (and blocks): at most this many, of SCAN_GROUP_ROWS or more
# nearest_among on a projected bank: a query's listed rows are ranked by their first-pass projection
# (34 floats a row with 64 axes, 66 with 128; against 384), and only the lowest this many measured
# exactly. KolektorSDD's 64 listed rows a patch, 2 cores of an AMD EPYC: 32 -> 6.5 ms a test image
# (docs/speed.md, "Cell lists ranked by their projection").
WINDOW_EXACT_ROWS = 8  # (toothbrush: 4 rows 93% of values as every row's, 8 rows 97.5%, 16 rows 99%)

__all__ = ["BACKENDS", "SHORTLISTS", "BankSearch", "FaissShortlist", "Shortlist", "TorchShortlist",
           "faiss_available", "resolve_backend"]


@contextlib.contextmanager
def faiss_blas_threshold(queries: int) -> Iterator[None]:
    """faiss's ``distance_compute_blas_threshold`` (the fewest queries it ranks with BLAS) set to
    ``queries`` while the block runs, restored after it."""
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = queries
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


@contextlib.contextmanager
def paused_tracing() -> Iterator[None]:
    """No tracing inside the block: what it computes from a module's buffers enters a traced graph
    as constants, not as operations run on every call (PyTorch's own trace helpers do the same)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def k_smallest_per_query(query_index: torch.Tensor, values: torch.Tensor, count: int, k: int,
                         payload: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(n,)`` pairs (a query in ``0..count-1``, a value) -> ``(count, k)`` each query's ``k`` smallest
    values, ascending, ``inf`` where it has fewer. Traceable (ONNX exports no stable sort): one sort
    by value, then one by ``query x n + place by value`` (distinct keys), give each pair its rank
    within its query. With ``payload`` ``(n,)`` (e.g. each pair's bank row) also the ``(count, k)``
    payloads of those values, ``-1`` where a query has fewer."""
    pairs = values.shape[0]
    by_value = values.argsort()
    place = torch.empty_like(by_value).scatter_(0, by_value, torch.arange(pairs, device=values.device))
    grouped = (query_index * pairs + place).argsort()
    grouped_query, grouped_value = query_index[grouped], values[grouped]
    counts = torch.zeros(count, dtype=torch.long, device=values.device).scatter_add(
        0, query_index, torch.ones_like(query_index))
    rank = torch.arange(grouped_query.shape[0], device=values.device) - (counts.cumsum(0) - counts)[grouped_query]
    first = (rank < k).nonzero()[:, 0]
    table = torch.full((count, k), float("inf"), dtype=values.dtype, device=values.device)
    table = table.index_put((grouped_query[first], rank[first]), grouped_value[first])
    if payload is None:
        return table
    carried = torch.full((count, k), -1, dtype=payload.dtype, device=payload.device)
    return table, carried.index_put((grouped_query[first], rank[first]), payload[grouped][first])


def group_minima(values: torch.Tensor, group: int) -> torch.Tensor:
    """``(m, n)`` -> ``(m, ceil(n / group))``: the lowest value of each group of ``group`` columns."""
    count, width = values.shape
    whole = width // group
    parts = [values[:, :whole * group].reshape(count, whole, group).amin(2)] if whole else []
    if width > whole * group:
        parts.append(values[:, whole * group:].amin(1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    """``auto`` -> ``faiss`` when installed, else ``torch``; ``faiss`` must be installed; a name
    registered in :data:`SHORTLISTS` as it is."""
    if name in SHORTLISTS and name not in BACKENDS:
        return name
    if name not in BACKENDS:
        raise SettingError("knn", name, f"choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "faiss" if faiss_available() else "torch"
    if name == "faiss" and not faiss_available():
        raise SettingError("knn", name, "faiss is not installed; pip install faiss-cpu, or use torch")
    return name


class Shortlist:
    """The first step of a search, a backend: each query's ``keep`` best candidate rows of a bank by
    ``|b|^2 - 2 q.b`` on centred vectors, and the best such value outside them (the exact re-rank
    and its certification are :class:`BankSearch`'s, the same for every backend). A new backend is
    a subclass (register it in :data:`SHORTLISTS` to name it by a string) passed to
    :class:`BankSearch` as ``backend``; one instance serves one bank and may keep an index of it.
    This base is the torch products (chunked, float32 or bfloat16, running top-k; traceable)."""

    name = "torch"

    def rank(self, search: BankSearch, queries: torch.Tensor, keep: int, dtype: torch.dtype,
             tracing: bool) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """``(m, D)`` queries -> ``(m, keep)`` row indices, ``(m,)`` the best value outside them, and the
        dtype the values were ranked in (the rounding :meth:`BankSearch._shortlist_holds` bounds)."""
        return (*search._shortlist(queries, keep, dtype, tracing), dtype)

    def reset(self) -> None:
        """Forget any index of the bank (its rows changed)."""

    def ranks_in(self, count: int, dtype: torch.dtype, tracing: bool) -> torch.dtype:
        """The dtype :meth:`rank` will rank ``count`` queries in when asked for ``dtype`` (it sizes the shortlist)."""
        return dtype


class TorchShortlist(Shortlist):
    """The torch products (:meth:`BankSearch._shortlist`), by name."""

    name = "torch"


class FaissShortlist(Shortlist):
    """faiss's ``IndexFlatL2`` of the centred rows (float32, ranked with BLAS) for
    :data:`FAISS_MIN_QUERIES` queries or more; fewer queries and traced graphs take the torch products."""

    name = "faiss"

    def __init__(self):
        self.index = None
        self._gpu_resources = None

    def rank(self, search, queries, keep, dtype, tracing):
        if tracing or queries.shape[0] < FAISS_MIN_QUERIES:
            return super().rank(search, queries, keep, dtype, tracing)
        import faiss

        device = search.rows.device
        if self.index is None:
            index = faiss.IndexFlatL2(search.rows.shape[1])
            if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
                self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, device.index or 0, index)
            for start in range(0, search.size, FAISS_ADD_ROWS):  # in blocks: no second whole copy of the bank
                block = search.rows[start:start + FAISS_ADD_ROWS]
                index.add(np.ascontiguousarray((block if search.stored_centred else block - search.mean).cpu().numpy()))
            self.index = index
        centred = np.ascontiguousarray((queries - search.mean).cpu().numpy())
        ranked = keep + 1 if keep < search.size else keep  # one more: the best value outside the shortlist
        with faiss_blas_threshold(FAISS_BLAS_QUERIES):
            dist_sq, idx = self.index.search(centred, ranked)
        idx, dist_sq = torch.from_numpy(idx).to(device), torch.from_numpy(dist_sq).to(device)
        if ranked == keep:
            return idx, torch.full_like(dist_sq[:, 0], float("inf")), torch.float32
        # faiss ranks by |q|^2 + |b|^2 - 2 q.b: the same value as ours plus |q|^2.
        return idx[:, :keep], dist_sq[:, keep] - torch.from_numpy(centred).to(device).pow(2).sum(1), torch.float32

    def ranks_in(self, count, dtype, tracing):
        return dtype if tracing or count < FAISS_MIN_QUERIES else torch.float32

    def reset(self) -> None:
        self.index, self._gpu_resources = None, None

    def __getstate__(self) -> dict:  # deep copies and pickles leave the index behind
        return {"index": None, "_gpu_resources": None}


# Backends by name (ScoreConfig.knn, --knn); a class of your own may also be passed to BankSearch directly.
SHORTLISTS: dict[str, type[Shortlist]] = {"torch": TorchShortlist, "faiss": FaissShortlist}


class BankSearch(nn.Module):
    """Exact k-NN Euclidean distances from queries to one bank (see the module docstring).

    Args:
        rows: ``(B, D)`` float bank, ``B > 0``.
        backend: of the shortlist step: ``torch``, ``faiss``, ``auto`` or a :class:`Shortlist` (a class
            or an instance: a backend of your own).
        precision: of the torch shortlist's products: ``fp32``, ``bf16`` or ``auto`` (bf16 on CUDA
            and on CPUs with native bfloat16).
    """

    def __init__(self, rows: torch.Tensor, backend: str | Shortlist | type[Shortlist] = "auto",
                 precision: str = "auto", shards: DistInfo | None = None):
        super().__init__()
        # Under torchrun with a sharded bank, ``rows`` are this rank's part: a search returns the
        # k smallest over every rank's (all-gathered), so each rank gets the whole bank's answer.
        self.shards = shards if shards is not None and shards.enabled else None
        self.total = int(all_reduce_sum(torch.tensor([rows.shape[0]]), self.shards)) if self.shards else rows.shape[0]
        if rows.ndim != 2 or (rows.shape[0] == 0 and self.shards is None):  # a rank's part may be empty
            raise ValueError(f"a bank must be (B, D) with B > 0, got {tuple(rows.shape)}")
        if precision not in PRECISIONS:
            raise SettingError("knn_precision", precision, f"choose one of {', '.join(PRECISIONS)}")
        rows = rows.detach().float().contiguous()
        mean = rows.mean(0)
        centred = rows - mean
        self.register_buffer("rows", rows)
        self.register_buffer("mean", mean)
        self.register_buffer("centred_sq", (centred * centred).sum(1))
        if isinstance(backend, type) and issubclass(backend, Shortlist):
            backend = backend()
        self.shortlist = backend if isinstance(backend, Shortlist) else SHORTLISTS[resolve_backend(backend)]()
        self.precision = precision
        # False: ``rows`` are the bank as given (files keep them bit for bit); True after
        # :meth:`store_centred` (exported graphs): ``rows`` are centred and ``mean`` is the offset of queries.
        self.stored_centred = False
        self._centred: dict[torch.dtype, torch.Tensor] = {}  # eager-mode cache: centred rows per products' dtype
        self._row_norm: float | None = None  # the largest row norm as stored (a rounding bound's term)
        # The projection (see _projection), made on first use: buffers, so that .to() moves them and
        # a traced graph holds each once (a tracer takes the state dict's tensors as its weights, and
        # any other tensor as one constant per use: an ONNX file of 1 GB instead of 0.4).
        for name in ("projection_axes", "projection_offset", "projected_rows", "projection_order", "first_pass_rows"):
            self.register_buffer(name, None)
        self._projection_pays: bool | None = None  # None: not decided yet (see _projects)
        # Set by a bank that reads cell lists (:meth:`nearest_among`): its projection then also keeps the
        # first-pass rows in the bank's own order (``window_rows``), where a cell's rows lie together.
        self.ranks_windows = False
        self.register_buffer("window_rows", None)
        # Eager mode: the projected values of a scan (_scan_block), one buffer per thread (threads
        # sharing a detector each search their own queries; torch's products release the GIL).
        self._scratch = threading.local()
        # While a TorchScript file is traced (:class:`.model.ExportModel`): the graph's input its scan
        # blocks write into, as eager mode's scratch (``None``: each block a fresh tensor, as ONNX takes).
        self.traced_scratch: torch.Tensor | None = None
        # The largest |b|^2 of the centred rows (a rounding bound's term; a float, so a trace keeps it as a constant).
        self._largest_sq = float(self.centred_sq.max()) if rows.shape[0] else 0.0
        self.dims = int(rows.shape[1])

    @property
    def backend(self) -> str:
        """The shortlist backend's name (``torch``, ``faiss``, or a :class:`Shortlist` of your own)."""
        return self.shortlist.name

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def traced_group(self) -> int:
        """Rows per scan group in a traced graph: at most :data:`TRACED_GROUPS` groups."""
        return max(SCAN_GROUP_ROWS, -(-self.size // TRACED_GROUPS))

    def traced_scratch_elements(self, queries: int) -> int:
        """Floats a traced graph's scan of ``queries`` queries writes into :attr:`traced_scratch`
        (0 where this bank is not searched by a scan)."""
        return queries * self.traced_group if self._projects() else 0

    def forward(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """``(M, D)`` queries -> ``(M, k)`` distances to the ``k`` nearest rows, ascending."""
        if k > self.total:
            raise SettingError("k", k, f"is larger than the memory bank ({self.total} patches); lower it")
        queries = queries.to(self.rows.device, torch.float32)
        if torch.jit.is_tracing():  # a graph takes any number of queries: no loop over them
            return self._search(queries, k, tracing=True, named=False)[0]
        mine = min(k, self.size)  # a rank's part may hold fewer than k rows
        found = self._searched(queries, mine, named=False)[0]
        if self.shards is None:
            return found
        found = torch.nn.functional.pad(found, (0, k - mine), value=float("inf"))
        # Exact distances, each computed alone: the k smallest of the parts' k smallest are the bank's.
        return torch.cat(all_gather(found, self.shards), 1).topk(k, dim=1, largest=False).values

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, D)`` queries -> :meth:`forward`'s ``(M, k)`` distances and the ``(M, k)`` rows they are
        to (indices into :attr:`rows`; of equally near rows, whichever the search met). One process's
        bank only (a sharded bank's rows are spread over the processes)."""
        if self.shards is not None:
            raise ValueError("nearest() needs the whole bank in this process (not a sharded bank)")
        if k > self.total:
            raise SettingError("k", k, f"is larger than the memory bank ({self.total} patches); lower it")
        queries = queries.to(self.rows.device, torch.float32)
        if torch.jit.is_tracing():
            return self._search(queries, k, tracing=True)
        return self._searched(queries, k)

    def _searched(self, queries: torch.Tensor, k: int, named: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eager :meth:`_search` over any number of queries, :data:`QUERY_ROWS` at a time."""
        if k == 0:
            return queries.new_empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
        out = [self._search(queries[start:start + QUERY_ROWS], k, tracing=False, named=named)
               for start in range(0, queries.shape[0], QUERY_ROWS)]
        if len(out) == 1:
            return out[0]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]) if named else None

    def _search(self, queries: torch.Tensor, k: int, tracing: bool,
                named: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(m, D)`` -> ``(m, k)`` exact distances, ascending, and the ``(m, k)`` rows they are to (the
        projected scan names them only when ``named``; the other paths have them at hand)."""
        if self._projects():
            return self._scan(queries, k, tracing, named)
        low = torch.float32 if tracing else self._dtype(queries.shape[0])
        keep = min(self.size, k + (SHORTLIST_BF16 if self.shortlist.ranks_in(queries.shape[0], low, tracing)
                                   == torch.bfloat16 else SHORTLIST))
        candidates, next_value, low = self.shortlist.rank(self, queries, keep, low, tracing)
        # Whether a shortlist so far took products with the rows as stored (see _uncentred_products):
        # their rounding bound is wider, and taken for every query (a wider bound only costs work).
        uncentred = self._uncentred_products(queries.shape[0], low, tracing)
        distances, rows = self._rerank(queries, candidates, k)
        if tracing:  # a graph has no data-dependent branch: its float32 shortlist is taken as it is
            return distances, rows
        # Where the products' rounding could hide a row nearer than the k-th found, the query is
        # searched again in a finer precision (bfloat16 -> float32 -> float64, which is exact here).
        for finer in (torch.float32, torch.float64)[0 if low == torch.bfloat16 else 1:]:
            unsure = ~self._shortlist_holds(queries, distances[:, -1], next_value, low, uncentred)
            if not bool(unsure.any()):
                break
            # First, in the same precision: every row whose value is within the rounding bound of
            # the k-th found is re-ranked exactly (usually a handful; a float64 pass over the whole
            # bank cost seconds a query batch). Only queries with too many such rows go finer.
            which = unsure.nonzero()[:, 0]
            band, band_rows, done = self._band(queries[which], distances[which, -1], k, low)
            distances[which[done]] = band[done]
            rows[which[done]] = band_rows[done]
            next_value = next_value.double()  # a copy, in the finest precision yet
            next_value[which[done]] = float("inf")
            unsure[which[done]] = False
            if not bool(unsure.any()):
                break
            low = finer
            uncentred = uncentred or self._uncentred_products(int(unsure.sum()), low, tracing)
            again, next_value_again = self._shortlist(queries[unsure], min(self.size, k + SHORTLIST), low, tracing)
            distances[unsure], rows[unsure] = self._rerank(queries[unsure], again, k)
            next_value[unsure] = next_value_again.double()
        return distances, rows

    def _scan(self, queries: torch.Tensor, k: int, tracing: bool,
              named: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(m, D)`` queries -> ``(m, k)`` exact distances to the ``k`` nearest rows of a projected bank
        (:mod:`.projection`), from its rows' projections, in groups of :data:`SCAN_GROUP_ROWS` rows.

        A row's projected value ``|b~|^2 - 2 q~.b~`` is a lower bound of ``|q - b|^2 - |q|^2``. The
        first pass keeps each group's lowest value per query; in each query's lowest group its ``k``
        lowest values name ``k`` rows whose exact distances give a reach (the ``k``-th of them: no
        farther than the ``k``-th nearest). The second pass re-ranks exactly every row whose value,
        less its rounding bound, is within the reach, in the groups whose lowest value is, for the
        queries it is for. A row outside is farther than the reach, so the ``k`` smallest exact
        distances found are the bank's. The same operations run traced (no data-dependent branch:
        queries and rows are chosen with ``nonzero``; a graph has at most :data:`TRACED_GROUPS` groups).
        """
        count = queries.shape[0]
        projection = self._projection()
        q, q_sq = projection.queries(self._query_frame(queries))
        reduced, dropped = self._first_pass_queries(q, q_sq)
        q = q.float()
        # A graph's loops are unrolled and run for every group, wanted or not: at most TRACED_GROUPS.
        group = self.traced_group if tracing else SCAN_GROUP_ROWS
        step = group if tracing else max(1, SCAN_ELEMENTS // max(1, count) // group) * group  # whole groups
        lowest, firsts, reach = self._first_pass(queries, q, reduced, k, step, group, tracing)
        widen = 1.0 + 2 * (self.dims + 3) * 2.0 ** -24  # a float32 sum of D squares is off by (D + 2) units
        limit = self._round_up(reach.double().pow(2) * widen - q_sq
                               + self._rounding_bound(q_sq, torch.float32, projected=True))
        hits_q, hits_r = [], []
        # The first pass's values are lower by the query's part in the axes it leaves out.
        within = lowest <= self._round_up(limit.double() + dropped)[:, None]
        for index, chosen, values in firsts:  # each query's lowest group: its values are at hand
            local, row = (values <= limit[chosen, None]).nonzero(as_tuple=True)
            hits_q.append(chosen[local])
            hits_r.append(row + index * group)
            within[chosen, index] = False
        for index in self._groups_to_visit(within.t(), tracing):  # the other groups within reach
            near = within[:, index].nonzero()[:, 0]
            values = q[near] @ projection.rows[index * group:(index + 1) * group].t()
            local, row = (values <= limit[near, None]).nonzero(as_tuple=True)
            hits_q.append(near[local])
            hits_r.append(row + index * group)
        query_index, bank_rows = torch.cat(hits_q), self.projection_order[torch.cat(hits_r)]
        exact = self._pair_distances(queries, query_index, bank_rows, tracing)
        best, rows = (k_smallest_per_query(query_index, exact, count, k, bank_rows) if named
                      else (k_smallest_per_query(query_index, exact, count, k), None))
        # A query with non-finite values reaches no row: its distances are NaN, as a brute-force search's.
        best = torch.where(torch.isfinite(q_sq)[:, None], best.clamp_min(0).sqrt(), torch.full_like(best, float("nan")))
        return best, rows

    def _first_pass(self, queries: torch.Tensor, q: torch.Tensor, reduced: torch.Tensor, k: int, step: int,
                    group: int, tracing: bool) -> tuple[torch.Tensor, list, torch.Tensor]:
        """The first pass of :meth:`_scan`: ``(m, groups)`` each group's lowest first-pass value per query
        (``reduced`` queries against :attr:`first_pass_rows`: half the axes, see :meth:`_first_pass_queries`);
        per query's lowest group ``(group, its queries, their full projected values (c, group))``; and
        ``(m,)`` the reach, the ``k``-th exact distance of the ``k`` rows of lowest value in that group."""
        count = queries.shape[0]
        rows = self.projected_rows  # made by _scan's self._projection()
        lowest = torch.cat([group_minima(self._scan_block(reduced, start, step, tracing), group)
                            for start in range(0, self.size, step)], 1)
        # A last group of fewer than k rows cannot name k rows: not a first group (it is searched in the
        # second pass like any other).
        short = self.size % group and self.size % group < k
        first = (torch.cat([lowest[:, :-1], torch.full_like(lowest[:, -1:], float("inf"))], 1) if short
                 else lowest).argmin(1)
        seeds = torch.zeros(count, k, dtype=torch.long, device=queries.device)
        firsts = []
        groups = torch.arange(lowest.shape[1], device=first.device)
        for index in self._groups_to_visit(first[None, :] == groups[:, None], tracing):
            chosen = (first == index).nonzero()[:, 0]
            values = q[chosen] @ rows[index * group:(index + 1) * group].t()
            seeds = seeds.index_put((chosen,), values.topk(k, dim=1, largest=False).indices + index * group)
            firsts.append((index, chosen, values))
        owner = torch.arange(count, device=queries.device).repeat_interleave(k)
        seeds = self.projection_order[seeds.reshape(-1)]  # as rows of the bank
        reach = self._pair_distances(queries, owner, seeds, tracing).view(count, k).amax(1).sqrt()
        return lowest, firsts, reach

    @staticmethod
    def _round_up(limit: torch.Tensor) -> torch.Tensor:
        """``(m,)`` float64 -> float32 no smaller (a test against it may only keep more rows)."""
        return (limit + limit.abs() * 2.0 ** -22).float()

    def _first_pass_queries(self, q: torch.Tensor, q_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, p + 2)`` float64 projected queries (:meth:`.Projection.queries`) -> ``(m, s + 2)`` float32
        ``[-2 q_s, -2 r_q, 1]`` for the first pass's rows (:func:`.projection.first_pass_rows`: the first
        ``s`` axes and the residual norm), and ``(m,)`` float64 what their values leave out: the
        query's squared part in the other axes, plus a rounding margin. The first pass's value
        ``|b_s|^2 + r_b^2 - 2 q_s.b_s - 2 r_q r_b`` less that part is at most the full projection's
        (dropping axes only lowers a squared distance), so its group minima bound the full values'."""
        axes = self.first_pass_rows.shape[1] - 2
        reduced = torch.cat([q[:, :axes], q[:, -2:]], 1)
        dropped = q[:, axes:-2].pow(2).sum(1) / 4  # q holds -2 q~
        # The first pass's float32 values carry their own rounding, bounded as the full ones' (their
        # operands are no longer); the float32 queries' squared norm is off by a few units.
        margin = self._rounding_bound(q_sq, torch.float32, projected=True) + 2.0 ** -21 * (q_sq + self._largest_sq)
        return reduced.float(), dropped + margin

    @staticmethod
    def _groups_to_visit(wanted: torch.Tensor, tracing: bool) -> list[int]:
        """``(groups, m)`` bool -> the groups some query wants (a traced graph visits every group)."""
        if tracing:
            return list(range(wanted.shape[0]))
        return wanted.any(1).nonzero()[:, 0].tolist()

    def _scan_block(self, q: torch.Tensor, start: int, step: int, tracing: bool) -> torch.Tensor:
        """``(m, s + 2)`` first-pass queries -> ``(m, n)`` their values against :attr:`first_pass_rows`
        ``start:start + step``, written into one buffer reused across blocks and calls (fresh memory
        costs its page faults: 45 ms against 17 for 1,024 x 21,402 values; a traced TorchScript graph
        ~16,000 faults per 256 px image, a fifth of its time); valid until the next block. In a traced
        graph the buffer is :attr:`traced_scratch` (a graph input, sized for one image) or none."""
        block = self.first_pass_rows[start:start + step]  # made by _scan's self._projection()
        need = q.shape[0] * block.shape[0]
        if tracing:
            if self.traced_scratch is None:
                return q @ block.t()
            scratch = self.traced_scratch
        else:
            scratch = getattr(self._scratch, "values", None)
            if scratch is None or scratch.numel() < need or scratch.device != q.device:
                scratch = self._scratch.values = torch.empty(max(need, q.shape[0] * step), device=q.device)
        return torch.mm(q, block.t(), out=scratch[:need].view(q.shape[0], block.shape[0]))

    def _band(self, queries: torch.Tensor, kth: torch.Tensor, k: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(m, D)`` unsure queries with their ``k``-th distance found ``(m,)`` -> ``(m, k)`` exact
        distances, the ``(m, k)`` rows they are to, and ``(m,)`` whether each is final.

        A row nearer than the ``k``-th found has a ranking value (``dtype`` products) of at most
        ``kth^2 - |q|^2`` plus the rounding bound of :meth:`_value_error`; every such row is
        re-ranked exactly, so the ``k`` nearest among them are the bank's. A query with more than
        :data:`BAND_ROWS` such rows is not final (its band is left to a finer precision).
        """
        count = queries.shape[0]
        cross, square = self._error_terms(dtype)
        q_sq = (queries - self.mean).double().pow(2).sum(1)
        limit, q_norm = (kth.double().pow(2) - q_sq)[:, None], q_sq.sqrt()[:, None]
        q = (queries - self.mean).to(dtype)
        step = max(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, count))
        # Where the shortlist took uncentred products (no centred copy), the band centres block by block.
        by_block = self._uncentred_products(count, dtype, False)
        step = UNCENTRED_BLOCK_ROWS if by_block else step
        hits_q, hits_r = [], []
        for start in range(0, self.size, step):
            block = self._centred_rows(start, start + step, dtype, by_block)
            b_sq = self.centred_sq[start:start + step]
            approx = b_sq[None, :] - 2.0 * (q @ block.t()).float()
            # Each row's own bound (its own |b|), far tighter than the bank's largest row.
            b_sq = b_sq.double()[None, :]
            error = cross * q_norm * b_sq.sqrt() + square * (b_sq + q_sq[:, None])
            query_index, row_index = (approx.double() - error <= limit).nonzero(as_tuple=True)
            hits_q.append(query_index)
            hits_r.append(row_index + start)
        query_index, row_index = torch.cat(hits_q), torch.cat(hits_r)
        per_query = torch.zeros(count, dtype=torch.long, device=queries.device).scatter_add(
            0, query_index, torch.ones_like(query_index))
        done = (per_query >= k) & (per_query <= BAND_ROWS)
        kept = done[query_index]
        query_index, row_index = query_index[kept], row_index[kept]
        exact = self._pair_distances(queries, query_index, row_index, False)
        best, rows = k_smallest_per_query(query_index, exact, count, k, row_index)
        return best.clamp_min(0).sqrt(), rows, done

    def _pair_distances(self, queries: torch.Tensor, query_index: torch.Tensor, row_index: torch.Tensor,
                        tracing: bool) -> torch.Tensor:
        """``(n,)`` squared exact distances of the pairs (``queries[query_index]``, ``rows[row_index]``),
        in blocks of :data:`PAIR_ROWS` pairs in eager mode (one gathered copy of that many rows)."""
        frame = self._query_frame(queries)

        def block(pairs: slice) -> torch.Tensor:  # the gathered rows, in place: no second copy
            rows = self.rows.index_select(0, row_index[pairs])
            return rows.sub_(frame.index_select(0, query_index[pairs])).square_().sum(1)

        if tracing:  # one block: a graph's pair count is known only when it runs
            return block(slice(None))
        parts = [block(slice(start, start + PAIR_ROWS)) for start in range(0, max(1, query_index.shape[0]), PAIR_ROWS)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def nearest_among(self, queries: torch.Tensor, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``(M, D)`` queries and ``(M, w)`` rows of this bank each (``width``: ``w``, given where a traced
        graph knows it) -> ``(M,)`` an exact distance to one of them, always to a row of the bank and
        computed as the search computes one. Which row: where
        the bank is projected and :attr:`ranks_windows` is set, the nearest of the
        :data:`WINDOW_EXACT_ROWS` ranked lowest by their first-pass projection (a lower bound of each
        distance; the nearest listed row is nearly always among them); else the row ranked nearest by
        products (the nearest, or one as near within their rounding)."""
        queries = queries.to(self.rows.device, torch.float32)
        frame = self._query_frame(queries)
        width = int(rows.shape[1]) if width is None else width
        ranked = self.ranks_windows and width > WINDOW_EXACT_ROWS and self._projects()
        if ranked:
            reduced = self._window_queries(frame)
        else:
            centred = queries - self.mean

        def block(part: slice) -> torch.Tensor:
            wanted = rows[part]
            if ranked:  # the lowest few by projection (a tenth of the values read)
                projected = self.window_rows.index_select(0, wanted.reshape(-1)).view(*wanted.shape, -1)
                values = torch.bmm(projected, reduced[part, :, None])[..., 0]
                wanted = wanted.gather(1, values.topk(WINDOW_EXACT_ROWS, dim=1, largest=False).indices)
            else:  # the nearest by products
                gathered = self.rows.index_select(0, wanted.reshape(-1)).view(*wanted.shape, -1)
                # |q - b|^2 less the query's own terms: |b - m|^2 - 2 (q - m).b (rows as stored, see store_centred)
                ranking = self.centred_sq[wanted] - 2 * torch.bmm(gathered, centred[part, :, None])[..., 0]
                wanted = wanted.gather(1, ranking.argmin(1, keepdim=True))
            # The chosen rows' exact distances, and the nearest of them.
            chosen = self.rows.index_select(0, wanted.reshape(-1)).view(*wanted.shape, -1)
            return chosen.sub_(frame[part, None]).square_().sum(2).amin(1).sqrt()

        if torch.jit.is_tracing():  # one block: a graph's query count is known only when it runs
            return block(slice(None))
        # 6 MB gathered a block (64 queries x 64 rows: 51 ms per 4,032 queries, against 66 at 256 and
        # 104 at 16); ranked, a block gathers the same number of exact rows.
        step = max(1, 2 * PAIR_ROWS // (WINDOW_EXACT_ROWS if ranked else max(1, width)))
        parts = [block(slice(start, start + step)) for start in range(0, max(1, queries.shape[0]), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _window_queries(self, frame: torch.Tensor) -> torch.Tensor:
        """``(m, D)`` float32 queries in the rows' frame -> ``(m, s + 2)`` float32 ``[-2 q_s, -2 r_q, 1]``
        against :attr:`window_rows` (as :meth:`_first_pass_queries`), projected in float32: they only
        rank a window's rows, whose chosen few are then measured exactly (the float64 projection
        that the scan's bounds need took half of :meth:`nearest_among`'s time)."""
        projected, _ = project(frame - self.projection_offset.float(), self.projection_axes.float())
        kept = self.window_rows.shape[1] - 2
        return torch.cat([-2 * projected[:, :kept], -2 * projected[:, -1:], torch.ones_like(projected[:, :1])], 1)

    def _rerank(self, queries: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, D)`` queries and ``(m, c)`` candidate rows -> ``(m, k)`` exact distances of the ``k``
        nearest and their rows."""
        owner = torch.arange(candidates.shape[0], device=candidates.device).repeat_interleave(candidates.shape[1])
        exact = self._pair_distances(queries, owner, candidates.reshape(-1), torch.jit.is_tracing())
        best = exact.view(candidates.shape).topk(k, dim=1, largest=False)
        return best.values.clamp_min(0).sqrt(), candidates.gather(1, best.indices)

    def _shortlist_holds(self, queries: torch.Tensor, kth: torch.Tensor, next_value: torch.Tensor,
                         dtype: torch.dtype, uncentred: bool = False) -> torch.Tensor:
        """``(m,)``: whether no row outside the shortlist can be nearer than the exact ``kth`` distance.

        A row's ranking value ``|b|^2 - 2 q.b`` (centred) computed with ``dtype`` products and
        float32 sums of ``D`` terms is off by at most ``2 r |q| |b| + D u |b|^2``: ``r`` counts the
        rounding of both operands and of the product's result to bfloat16 (3 x 2^-8 + 2^-16; also
        for float32 products when PyTorch may run them in a reduced precision, TF32 or bf16) and
        ``D + 1`` float32 units ``u`` for the sums; a worst-case bound. So every row outside the
        shortlist has a true value of at least
        ``next_value`` minus that; the query holds when that is not below the ``k``-th's true value
        ``kth^2 - |q|^2``. ``uncentred``: the products were taken with the rows as stored
        (:meth:`_uncentred_products`), whose larger norms bound their rounding.
        """
        error, q_sq = self._value_error(queries, dtype, uncentred)
        return next_value.double() - error >= kth.double().pow(2) - q_sq

    def _error_terms(self, dtype: torch.dtype, projected: bool = False) -> tuple[float, float]:
        """``(cross, square)``: a ranking value computed with ``dtype`` products is off by at most
        ``cross |q| |b| + square (|b|^2 + |q|^2)`` (see :meth:`_shortlist_holds`); ``projected``: of
        the projection's ``p + 1 <= D`` values, rounded from float64 (:func:`.projection.projection_rounding`)."""
        unit, dim = 2.0 ** -24, self.dims
        reduced = dtype == torch.bfloat16 or (dtype == torch.float32
                                              and torch.get_float32_matmul_precision() != "highest")
        operands = 3 * 2.0 ** -8 + 2.0 ** -16 if reduced else 0.0
        operands += projection_rounding(dim) if projected else 0.0
        # (+ D u |q|^2: faiss's values carry |q|^2, computed in float32 too)
        return 2.0 * (operands + (dim + 1) * unit), dim * unit

    def _value_error(self, queries: torch.Tensor, dtype: torch.dtype,
                     uncentred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m,)`` float64: the rounding bound of any row's ranking value for each query (the bank's
        largest row), and ``|q|^2`` of the centred queries (:meth:`_rounding_bound`)."""
        q_sq = (queries - self.mean).double().pow(2).sum(1)
        return self._rounding_bound(q_sq, dtype, uncentred), q_sq

    def _rounding_bound(self, q_sq: torch.Tensor, dtype: torch.dtype, uncentred: bool = False,
                        projected: bool = False) -> torch.Tensor:
        """``(m,)`` float64 ``|q|^2`` -> ``(m,)`` float64: the rounding bound of any row's ranking value
        (the bank's largest row). ``uncentred``: the products were ``(q - m).b - (q - m).m`` with the
        rows ``b`` as stored: bounded by ``|q - m| (|b| + |m|)``, with two more roundings (the product
        with the mean, the difference). ``projected``: the values are the projection's."""
        cross, square = self._error_terms(dtype, projected)
        b_sq = self._largest_sq
        b_cross = b_sq ** 0.5
        if uncentred:
            if self._row_norm is None:  # in blocks: no float64 copy of the bank
                self._row_norm = max(float(self.rows[start:start + CHUNK_ROWS].double().pow(2).sum(1).max().sqrt())
                                     for start in range(0, self.size, CHUNK_ROWS))
            b_cross = max(b_cross, self._row_norm + float(self.mean.double().norm()))
            cross += 4.0 * 2.0 ** -24
        return cross * q_sq.sqrt() * b_cross + square * (b_sq + q_sq)

    def _dtype(self, queries: int) -> torch.dtype:
        """The products' dtype for ``queries`` queries: ``precision``; ``auto`` is bfloat16 where it
        pays, but float32 for fewer than :data:`FEW_QUERIES` queries on the CPU (a pass over the
        bank is then bound by reading it, and a float32 shortlist nearly always holds, where a
        bfloat16 one often needs the rounding band: 80 ms against 43 for 16 queries x 214,000 rows).
        A projected bank's scan (:meth:`_scan`) always multiplies in float32."""
        precision = self.precision
        if precision == "auto":
            few = queries < FEW_QUERIES and not self.rows.is_cuda
            precision = "bf16" if bf16_matmul_pays(self.rows.device.type) and not few else "fp32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def _projects(self) -> bool:
        """Whether this bank is searched by its projection (:meth:`_scan`): wide enough, and its
        features lie in few enough axes for the bound to pay (decided on its first search)."""
        if self.dims < PROJECT_MIN_DIMS or self.size == 0:
            return False
        if self._projection_pays is None:
            self._projection()
        return bool(self._projection_pays)

    def _projection(self) -> Projection:
        """The bank's projection on its principal axes (:class:`.projection.Projection`; made once, on
        the rows' device, and kept as buffers; :meth:`store_centred` makes it before a graph is traced)."""
        if self._projection_pays is None or (self._projection_pays and self.projected_rows.device != self.rows.device):
            offset = torch.zeros_like(self.mean) if self.stored_centred else self.mean
            with paused_tracing():
                made = Projection.fit(self.rows, offset, PROJECTION_FIT_ROWS)
            self._projection_pays = made is not None
            if made is not None:
                # Projected rows are scanned in an order that keeps near rows in one group (projection_order[i]:
                # the bank row of projected row i), so a query's reach takes in few groups.
                order = (tree_order(made.rows, SCAN_GROUP_ROWS) if TREE_ORDER
                         else torch.arange(self.size, device=made.rows.device))
                self.projection_axes, self.projection_offset = made.axes, made.offset
                self.projected_rows, self.projection_order = made.rows[order].contiguous(), order
                self.first_pass_rows = first_pass_rows(self.projected_rows)
                if self.ranks_windows:  # in the bank's order (nearest_among reads a cell's rows together)
                    inverse = torch.empty_like(order)
                    inverse[order] = torch.arange(order.shape[0], device=order.device)
                    self.window_rows = self.first_pass_rows[inverse].contiguous()
        return Projection(self.projection_axes, self.projection_offset, self.projected_rows)

    def store_centred(self) -> BankSearch:
        """Keep the rows centred in place (a traced graph then needs no centring per call, and no
        second copy of the bank); distances are the same. For exported graphs; returns ``self``."""
        if not self.stored_centred:
            self.rows = self.rows - self.mean
            self.stored_centred, self._centred, self.projected_rows, self.first_pass_rows = True, {}, None, None
            self.window_rows = None
            self._projection_pays = None
            self.shortlist.reset()
        self._projects()  # decided (and made) here, outside any trace
        return self

    def _query_frame(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries in the frame of ``rows``: as given, or shifted by the mean when the rows are stored centred."""
        return queries - self.mean if self.stored_centred else queries

    def _uncentred_products(self, queries: int, dtype: torch.dtype, tracing: bool) -> bool:
        """Whether a float32 shortlist of ``queries`` queries takes its products with the rows as stored
        (``(q - m).b - (q - m).m``: no centred float32 copy of the bank made or read) instead of the
        centred rows: for few queries, while no such copy exists. Their rounding grows with the
        rows' norms instead of the centred rows' (:meth:`_value_error` bounds it); in float32 that
        still certifies nearly every query."""
        return (not tracing and dtype == torch.float32 and not self.stored_centred and queries < FEW_QUERIES
                and torch.float32 not in self._centred)

    def _centred_rows(self, start: int, stop: int, dtype: torch.dtype, tracing: bool) -> torch.Tensor:
        """Rows ``start:stop`` centred (stored so, computed in a traced graph, cached in eager mode)."""
        if self.stored_centred and dtype == torch.float32:
            return self.rows[start:stop]
        if tracing:
            return self.rows[start:stop] - self.mean
        if dtype == torch.float64:  # the last resort for a few queries: no float64 copy of the bank is kept
            rows = self.rows[start:stop].double()
            return rows if self.stored_centred else rows - self.mean.double()
        cached = self._centred.get(dtype)  # one copy per dtype: a float32 fallback keeps the bfloat16 copy
        if cached is None or cached.device != self.rows.device:
            centred = self.rows if self.stored_centred else self.rows - self.mean
            cached = self._centred[dtype] = centred.to(dtype)
        return cached[start:stop]

    def _shortlist(self, queries: torch.Tensor, keep: int, dtype: torch.dtype,
                   tracing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, D)`` -> ``(m, keep)`` row indices ranked by ``|b|^2 - 2 q.b`` on centred vectors, and
        ``(m,)`` the best such value outside the shortlist (``inf`` when the shortlist is the bank).

        Centred because ReLU features share a large mean, and the expansion on uncentred ones
        cancels catastrophically (float32 distances off by more than 1 on trained features).
        """
        q = (queries - self.mean).to(dtype) if dtype != torch.float64 else queries.double() - self.mean.double()
        best_val: torch.Tensor | None = None
        best_idx: torch.Tensor | None = None
        ranked = keep + 1 if keep < self.size else keep  # one more: the best value outside the shortlist
        # A GPU takes far larger blocks: per-block Python overhead, not arithmetic, bounds it otherwise.
        elements = CHUNK_ELEMENTS * (GPU_CHUNK_FACTOR if q.is_cuda else 1)
        step = CHUNK_ROWS if tracing else max(CHUNK_ROWS, elements // max(1, queries.shape[0]))
        uncentred = self._uncentred_products(queries.shape[0], dtype, tracing)
        step = UNCENTRED_BLOCK_ROWS if uncentred else step
        if uncentred:  # (q - m).(b - m) = (q - m).b - (q - m).m: the rows as stored, no centred copy
            q_mean = (q.double() @ self.mean.double()).float()[:, None]
        for start in range(0, self.size, step):
            block = self.rows[start:start + step] if uncentred else self._centred_rows(start, start + step, dtype,
                                                                                       tracing)
            # |q|^2 is the same for every row of a query: left out of the ranking.
            norms = self.centred_sq[start:start + step]
            if dtype == torch.float32 and not uncentred:  # one fused product (no two passes over the block)
                approx = torch.addmm(norms[None, :], q, block.t(), alpha=-2)
            else:
                products = q @ block.t() - q_mean if uncentred else q @ block.t()
                if dtype == torch.float64:
                    norms = block.pow(2).sum(1)
                else:
                    products = products.float()
                approx = norms[None, :] - 2.0 * products
            val, idx = approx.topk(min(ranked, block.shape[0]), dim=1, largest=False)
            idx = idx + start
            if best_val is not None and best_idx is not None:
                val, pick = torch.cat([best_val, val], 1).topk(ranked, dim=1, largest=False)
                idx = torch.cat([best_idx, idx], 1).gather(1, pick)
            best_val, best_idx = val, idx
        assert best_idx is not None and best_val is not None
        if ranked == keep:  # the whole bank is in the shortlist: nothing outside it
            return best_idx, torch.full_like(best_val[:, 0], float("inf"))
        return best_idx[:, :keep], best_val[:, keep]

    def __getstate__(self) -> dict:  # deep copies and pickles leave the caches behind
        state = dict(self.__dict__)
        state["_centred"], state["_scratch"], state["traced_scratch"] = {}, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._scratch = threading.local()
