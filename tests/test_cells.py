"""Cell lists (scoring.engine.cells): each coreset row's nearest whole-bank rows tighten the coreset's
map values: still upper bounds of the whole bank's distances, exact where the nearest row is
listed, and much closer to it than the coreset's alone; the search names the rows it found."""

import pytest
import torch

import scoring.engine.cells as cells
from scoring.config import ScoreConfig
from scoring.engine.cells import in_cell_order, tightened
from scoring.engine.knn import BankSearch
from scoring.engine.model import AnomalyScorer, PatchBank, bank_states
from tests.test_projected_search import low_rank


def clustered(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Patches around 40 centres, varying in a few directions (normal texture: many near copies of a
    few kinds; trained features hold most of their variance in few directions)."""
    gen, fixed = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(7)
    centres, basis = 3 * torch.randn(40, dim, generator=fixed), torch.randn(6, dim, generator=fixed)
    return (centres[torch.randint(0, 40, (rows,), generator=gen)] + 0.3 * torch.randn(rows, 6, generator=gen) @ basis
            + 0.05 * torch.randn(rows, dim, generator=gen))


@pytest.mark.parametrize("dim", [48, 384])  # the shortlist's search, the projected scan
@pytest.mark.parametrize("k", [1, 3])
def test_nearest_names_rows_at_the_distances_found(dim, k):
    bank = low_rank(1500, dim=dim)
    queries = torch.cat([low_rank(200, dim=dim, seed=3), bank[:10]])
    search = BankSearch(bank, backend="torch")
    distance, rows = search.nearest(queries, k)
    torch.testing.assert_close(distance, search(queries, k))
    direct = (bank[rows] - queries[:, None]).double().norm(dim=-1)  # the named rows are that far
    torch.testing.assert_close(direct, distance.double(), rtol=1e-5, atol=1e-5)
    true = torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False).values
    torch.testing.assert_close(distance.double(), true, rtol=1e-5, atol=1e-5)


def test_cell_order_keeps_the_rows_and_puts_each_in_its_nearest_coreset_rows_cell_nearest_first():
    full = clustered(3000, 384, seed=0)
    keep = torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:300]
    coreset = full[keep]
    ordered, starts = in_cell_order(BankSearch(coreset), full)
    assert sorted(map(tuple, ordered.tolist())) == sorted(map(tuple, full.tolist()))  # the same rows, each once
    owner = torch.cdist(ordered.double(), coreset.double()).argmin(1)  # each row's nearest coreset row
    assert bool((owner[1:] >= owner[:-1]).all())  # cell by cell
    assert starts.tolist() == [int((owner < c).sum()) for c in range(300)]  # where each cell starts
    to_centre = (ordered - coreset[owner]).double().norm(dim=1)
    same_cell = owner[1:] == owner[:-1]
    assert bool((to_centre[1:][same_cell] >= to_centre[:-1][same_cell] - 1e-6).all())  # nearest first


@pytest.mark.parametrize("ranked", [False, True])  # every listed row measured, or ranked by projection first
def test_tightened_values_are_upper_bounds_exact_where_listed_and_closer_than_the_coresets(ranked):
    full = clustered(4000, 384, seed=0)
    keep = torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:400]
    coreset = BankSearch(full[keep])
    full, starts = in_cell_order(coreset, full)
    whole = BankSearch(full)
    whole.ranks_windows = ranked
    queries = torch.cat([clustered(500, 384, seed=5), 4 + clustered(20, 384, seed=6)])  # normal, and far
    value = tightened(coreset, whole, starts, queries)
    assert (whole.window_rows is not None) == ranked  # the ranked path was taken (a projected bank)
    exact = torch.cdist(queries.double(), full.double()).min(1)
    bound = coreset(queries, 1)[:, 0]
    assert bool((value.double() >= exact.values - 1e-4).all())  # never below the whole bank's distance
    assert bool((value <= bound).all())
    window = starts[coreset.nearest(queries, 1)[1][:, 0]][:, None] + torch.arange(cells.LIST_ROWS)
    window = window.clamp_max(full.shape[0] - 1)
    listed_min = (full[window] - queries[:, None]).double().norm(dim=2).amin(1)
    assert bool((value.double() >= listed_min - 1e-4).all())  # a distance to a listed row
    nearest_listed = (window == exact.indices[:, None]).any(1)
    assert nearest_listed.float().mean() > 0.3
    hit = (value.double() - exact.values).abs() <= 1e-4 * exact.values
    # Measuring every listed row finds the nearest whenever it is listed; ranking by the projection
    # first nearly always does.
    assert hit[nearest_listed].float().mean() >= (0.95 if ranked else 1.0)
    gap_before = (bound.double() - exact.values).mean()
    gap_after = (value.double() - exact.values).mean()
    assert gap_after < 0.5 * gap_before  # much closer to the whole bank's than the coreset alone


def test_ranked_lists_traced_as_eager():
    full = clustered(3000, 384, seed=0)
    coreset = BankSearch(full[torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:300]])
    full, starts = in_cell_order(coreset, full)
    whole = BankSearch(full)
    whole.ranks_windows = True  # as a bank reading cell lists sets it
    assert whole.store_centred().window_rows is not None  # as an exported graph holds it: made beforehand
    queries = clustered(300, 384, seed=4)
    traced = torch.jit.trace(lambda q: tightened(coreset, whole, starts, q), (queries[:7],), check_trace=False)
    torch.testing.assert_close(traced(queries), tightened(coreset, whole, starts, queries), rtol=1e-6, atol=1e-6)


def test_scorer_maps_approach_the_exact_banks_and_image_scores_stay_exact():
    config = ScoreConfig(size=32, fusion="concatenation", layers=(2,), coreset=0.1, refine=4, cells=64)
    train = [clustered(20 * 64, 384, seed=0).view(20, 8, 8, 384).permute(0, 3, 1, 2).contiguous()]
    test = [torch.cat([clustered(4 * 64, 384, seed=2), 3 + clustered(4 * 64, 384, seed=3)])
            .view(8, 8, 8, 384).permute(0, 3, 1, 2).contiguous()]
    states = bank_states(config, train)
    assert states[0]["cell_starts"] is not None
    exact = AnomalyScorer.fit(config.replace(coreset=1.0), train)
    listed = AnomalyScorer.from_states(config, states)
    plain = AnomalyScorer.from_states(config, states)
    plain.banks[0].cell_starts = None  # the coreset's bounds alone (as before cell lists)
    (s_exact, m_exact), (s_listed, m_listed), (s_plain, m_plain) = exact(test), listed(test), plain(test)
    torch.testing.assert_close(s_listed, s_exact)  # certified: the exact bank's image scores
    torch.testing.assert_close(s_plain, s_exact)
    assert bool((m_listed >= m_exact - 1e-4).all())  # (the two certifications re-search different cells)
    assert (m_listed - m_exact).abs().mean() < 0.5 * (m_plain - m_exact).abs().mean()


def test_a_bank_saved_without_lists_gets_them_and_a_k_above_one_keeps_the_coresets_values(monkeypatch):
    full = clustered(2000, 384, seed=0)
    state = {"rows": full[:200], "full": full, "coreset": 0.1, "coreset_dim": 32, "seed": 0}  # as before cells
    bank = PatchBank(state, refine=4, cells=64)
    saved = bank.state()
    assert bank.cell_starts is not None and saved["cell_starts"].shape == (200,)
    assert sorted(map(tuple, saved["full"].tolist())) == sorted(map(tuple, full.tolist()))  # the same rows
    queries = clustered(50, 384, seed=9)
    torch.testing.assert_close(bank(queries, 2), bank.search(queries, 2).mean(1))  # k = 2: not tightened
    assert bool((bank(queries, 1) <= bank.search(queries, 1)[:, 0]).all())
    assert PatchBank(state, refine=0, cells=64).cell_starts is None  # no whole bank searched: no cells
    assert PatchBank(state, refine=4).cell_starts is None  # cells 0: off (the default)
    grids = [full[:64 * 4].view(4, 8, 8, 384).permute(0, 3, 1, 2)]
    assert bank_states(ScoreConfig(size=32, layers=(2,), coreset=0.5), grids)[0]["cell_starts"] is None
