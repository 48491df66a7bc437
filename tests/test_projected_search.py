"""The projected exact search (scoring.engine.projection, BankSearch._scan): a lower bound that
prunes, and still the brute-force answer: eager, traced, in many blocks, with ties."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import scoring.engine.knn as knn
from scoring.engine.knn import BankSearch, faiss_available, k_smallest_per_query
from scoring.engine.projection import Projection, tree_order


def low_rank(rows: int, dim: int = 384, rank: int = 12, seed: int = 0, noise: float = 0.1) -> torch.Tensor:
    """Features with a large shared mean and most variance in ``rank`` directions (wave network
    features hold 62-98% of theirs in 16), and ties: a few exact copies."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=torch.Generator().manual_seed(99))  # one subspace for every call
    points = torch.randn(rows, rank, generator=gen) @ basis + noise * torch.randn(rows, dim, generator=gen) + 5
    if rows >= 20:
        points[rows // 2:rows // 2 + 5] = points[:5]  # duplicates: ties at the nearest distance
    return points


def brute(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False).values


def test_projection_is_a_lower_bound_with_the_same_norms():
    bank = low_rank(3000)
    offset = bank.mean(0)
    projection = Projection.fit(bank, offset, 64, 1000)
    queries = low_rank(200, seed=1)
    q, q_sq = projection.queries(queries)
    rows = projection.rows.double()
    # queries @ rows.T = |b|^2 - 2 q~.b~, so |q~ - b~|^2 = that + |q|^2
    lower = q @ rows.t() + q_sq[:, None]
    true = torch.cdist(queries.double() - offset.double(), bank.double() - offset.double()).pow(2)
    assert bool((lower <= true * (1 + 1e-6) + 1e-6).all())
    assert (lower / true.clamp_min(1e-9)).median() > 0.9  # and a tight one: most of the distance is kept
    torch.testing.assert_close(rows[:, -1], (bank.double() - offset.double()).pow(2).sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_projected_search_equals_brute_force(k, blocks, monkeypatch):
    if blocks == "many":  # many blocks and groups, a last group of fewer rows than k
        monkeypatch.setattr(knn, "SCAN_GROUP_ROWS", 64)
        monkeypatch.setattr(knn, "SCAN_ELEMENTS", 64 * 300)
        monkeypatch.setattr(knn, "CHUNK_ROWS", 64)
    bank = low_rank(2050)
    # exact copies (distance 0), also of the rows of a last group shorter than k
    queries = torch.cat([low_rank(300, seed=2), bank[:20], bank[1000:1010] + 1e-4, bank[-2:]])
    search = BankSearch(bank, backend="torch")
    assert search._projects()
    got = search(queries, k)
    torch.testing.assert_close(got.double(), brute(queries, bank, k), rtol=1e-5, atol=1e-5)
    assert (got[300:320, 0] == 0).all() and (got[-2:, 0] == 0).all()


def test_projected_search_re_ranks_a_small_share_of_the_bank(monkeypatch):
    """The bound prunes: on features of low intrinsic dimension only a sliver of (query, row)
    pairs gets an exact distance, not the bank."""
    bank, queries = low_rank(20000, rank=8, noise=0.02), low_rank(400, rank=8, seed=3, noise=0.02)
    pairs = []
    original = BankSearch._pair_distances
    monkeypatch.setattr(BankSearch, "_pair_distances",
                        lambda self, q, qi, ri, tracing: pairs.append(qi.numel()) or original(self, q, qi, ri, tracing))
    got = BankSearch(bank, backend="torch")(queries, 1)
    torch.testing.assert_close(got.double(), brute(queries, bank, 1), rtol=1e-5, atol=1e-5)
    assert sum(pairs) < 0.01 * 20000 * 400


def test_projected_search_is_the_same_traced_and_eager():
    bank = low_rank(3000)
    search = BankSearch(bank, backend="torch", precision="fp32").store_centred()
    traced = torch.jit.trace(lambda q: search(q, 2), (low_rank(40, seed=5),), check_trace=False)
    others = low_rank(90, seed=6)  # another number of queries than the trace saw
    assert torch.equal(traced(others), search(others, 2))
    torch.testing.assert_close(traced(others).double(), brute(others, bank, 2), rtol=1e-5, atol=1e-5)


def test_traced_scan_writes_into_the_scratch_it_is_given_and_each_call_stands_alone():
    """A TorchScript file's scans write into one scratch tensor per call (a graph input): the
    graph reads it, every call overwrites it, and the answers are each call's own."""
    bank = low_rank(3000)
    search = BankSearch(bank, backend="torch", precision="fp32").store_centred()
    queries = 40
    elements = search.traced_scratch_elements(queries)
    assert elements == queries * search.traced_group > 0

    def with_scratch(q, scratch):
        search.traced_scratch = scratch
        try:
            return search(q, 2)
        finally:
            search.traced_scratch = None

    traced = torch.jit.trace(with_scratch, (low_rank(queries, seed=5), torch.empty(elements)), check_trace=False)
    assert search.traced_scratch is None
    scratch = torch.full((elements,), float("nan"))
    for seed in (6, 7):  # the same scratch for both: the second call must not read the first's values
        others = low_rank(queries, seed=seed)
        got = traced(others, scratch)
        assert torch.equal(got, search(others, 2))
        torch.testing.assert_close(got.double(), brute(others, bank, 2), rtol=1e-5, atol=1e-5)
        assert not scratch.isnan().all()  # the graph wrote its scan into it
    # A bank too narrow for the projection is not scanned: it needs no scratch.
    assert BankSearch(low_rank(300, dim=8), backend="torch").traced_scratch_elements(queries) == 0


def test_projected_search_of_rows_stored_centred_and_with_faiss():
    bank = low_rank(3000)
    queries = low_rank(200, seed=7)
    plain = BankSearch(bank, backend="torch")
    before = plain(queries, 2)
    assert torch.equal(plain.rows, bank)  # as given: files keep the bank bit for bit
    torch.testing.assert_close(plain.store_centred()(queries, 2), before, rtol=1e-5, atol=1e-5)
    if faiss_available():  # the scan is the search of a projected bank, whatever the backend
        assert torch.equal(BankSearch(bank, backend="faiss")(queries, 2), before)


def test_non_finite_queries_get_nan_distances():
    bank = low_rank(1000)
    queries = low_rank(4, seed=8)
    queries[1, 3] = float("nan")
    got = BankSearch(bank, backend="torch")(queries, 2)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2, 3]]).all()


def test_k_smallest_per_query():
    query_index = torch.tensor([2, 0, 2, 2, 0, 2])
    values = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.5, 9.0])
    table = k_smallest_per_query(query_index, values, 3, 2)
    assert table.tolist() == [[0.5, 1.0], [float("inf"), float("inf")], [3.0, 3.0]]


def test_a_bank_takes_as_many_axes_as_pay():
    """Features whose variance lies in a few axes take the fewest axes offered (64), features spread
    more take more (128); a large bank of features spread over every axis (no bound rules much out,
    and a re-rank costs ~640x a bound) is not projected at all, and its search is still exact; a
    small one is (one way to search where either costs little)."""
    import scoring.engine.projection as projection

    gen = torch.Generator().manual_seed(9)
    isotropic = torch.randn(4000, 256, generator=gen)
    for rows, expected in ((low_rank(4000, rank=8, noise=0.02), 64), (low_rank(4000, rank=80, noise=0.05), 128),
                           (isotropic, 128)):
        offset = rows.mean(0).double()
        assert projection.choose_dims(rows, offset, projection.principal_axes(rows, offset, 128, 4000)) == expected
    queries = torch.randn(50, 256, generator=gen)
    assert BankSearch(isotropic, backend="torch")._projects()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(projection, "DECIDE_ROWS", 1000)  # as if the bank were large
        search = BankSearch(isotropic, backend="torch")
        torch.testing.assert_close(search(queries, 2).double(), brute(queries, isotropic, 2), rtol=1e-5, atol=1e-5)
        assert not search._projects() and search.projected_rows is None


def test_tree_order_puts_near_rows_in_one_group():
    """tree_order is a permutation whose groups are compact: rows of 8 well-separated clusters,
    shuffled (each group of 64 holds rows of all 8), come back with a group holding one or two."""
    gen = torch.Generator().manual_seed(3)
    centres = 20 * torch.randn(8, 30, generator=gen)
    label = torch.randperm(8 * 64, generator=gen) % 8
    rows = torch.cat([centres[label] + torch.randn(len(label), 30, generator=gen), torch.zeros(len(label), 1)], 1)
    order = tree_order(rows, 64)
    assert torch.equal(order.sort().values, torch.arange(len(label)))
    per_group = [len(set(label[order[start:start + 64]].tolist())) for start in range(0, len(label), 64)]
    assert max(per_group) <= 3 and sum(per_group) <= 2 * 8


def test_tree_order_makes_the_second_pass_visit_fewer_groups(monkeypatch):
    monkeypatch.setattr(knn, "SCAN_GROUP_ROWS", 64)
    bank, queries = low_rank(4096, rank=6, noise=0.02)[torch.randperm(4096)], low_rank(200, rank=6, seed=4, noise=0.02)
    visits = {False: 0, True: 0}
    visit = knn.BankSearch._groups_to_visit
    for ordered in (False, True):
        monkeypatch.setattr(knn, "TREE_ORDER", ordered)

        def counted(want, tracing, ordered=ordered):
            visits[ordered] += int(want.sum())
            return visit(want, tracing)

        monkeypatch.setattr(knn.BankSearch, "_groups_to_visit", staticmethod(counted))
        got = BankSearch(bank, backend="torch")(queries, 2)
        torch.testing.assert_close(got.double(), brute(queries, bank, 2), rtol=1e-5, atol=1e-5)
    assert visits[True] < visits[False] / 2


def test_first_pass_on_half_the_axes_bounds_the_full_projection():
    """The first pass's values (half the axes and the residual norm), less what they leave out of
    the query, are at most the full projection's values as the scan computes them (float32), and
    still close to them: a lower bound, and a useful one."""
    bank, queries = low_rank(3000, rank=40), low_rank(300, rank=40, seed=5)
    search = BankSearch(bank, backend="torch")
    projection = search._projection()
    q, q_sq = projection.queries(search._query_frame(queries))
    reduced, dropped = search._first_pass_queries(q, q_sq)
    assert reduced.shape[1] == search.first_pass_rows.shape[1] == (projection.rows.shape[1] - 2) // 2 + 2
    first = (reduced @ search.first_pass_rows.t()).double() - dropped[:, None]
    full = (q.float() @ search.projected_rows.t()).double()
    assert bool((first <= full).all())
    true = full + q_sq[:, None]  # |q~ - b~|^2
    assert ((first + q_sq[:, None]) / true).median() > 0.5


def test_threads_sharing_one_search_each_get_their_own_answer(monkeypatch):
    """The scan's eager buffer is per thread: searches of one bank from several threads at once
    (a server sharing one detector) give each its own brute-force answer."""
    monkeypatch.setattr(knn, "SCAN_GROUP_ROWS", 64)  # many blocks per search: many chances to interleave
    monkeypatch.setattr(knn, "SCAN_ELEMENTS", 64 * 400)
    bank = low_rank(6000)
    search = BankSearch(bank, backend="torch", precision="fp32")
    assert search._projects()
    queries = [low_rank(300, seed=seed) for seed in range(10, 18)]
    expected = [search(q, 1) for q in queries]  # one thread: the reference
    for q, want in zip(queries, expected):
        torch.testing.assert_close(want.double(), brute(q, bank, 1), rtol=1e-5, atol=1e-5)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda q: search(q, 1), queries))
            for g, want in zip(got, expected):
                assert torch.equal(g, want)
