"""Scoring building blocks: fusion, k-NN backends, coreset, metrics against brute force."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import scoring.engine.knn as knn_module
from common.errors import SettingError
from scoring import ScoreConfig, metrics
from scoring.engine.coreset import greedy_coreset
from scoring.engine.knn import BankSearch, faiss_available
from scoring.engine.model import (
    AnomalyScorer,
    PatchBank,
    bank_states,
    concat_layers,
    gaussian_smooth,
    layer_scales,
    resize_map,
    to_patches,
)
from scoring.pipeline.cache import bank_settings


def fit(fusion: str, train: list[torch.Tensor], size: int = 32, **settings) -> AnomalyScorer:
    """An exact-search scorer of ``train`` features (the torch search, so no faiss is needed)."""
    return AnomalyScorer.fit(ScoreConfig(fusion=fusion, size=size, knn="torch", **settings), train)


def test_concat_layers_nearest_upsampling():
    l2 = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    l3 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = concat_layers([l2, l3])
    assert out.shape == (1, 3, 4, 4)
    assert torch.equal(out[0, :2], l2[0])
    assert out[0, 2].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_concat_layers_bilinear_upsampling_blends_the_coarser_cells():
    l2 = torch.zeros(1, 1, 4, 4)
    l3 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = concat_layers([l2, l3], "bilinear")[0, 1]
    # Half-pixel centres: output cell x reads source (x + 0.5) / 2 - 0.5, clamped at the borders.
    assert out.tolist() == [[1, 1.25, 1.75, 2], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3, 3.25, 3.75, 4]]
    assert torch.equal(concat_layers([l2, l3], "nearest"), concat_layers([l2, l3]))  # the paper's, the default


def test_the_upsampling_is_a_bank_setting_of_concatenation():
    torch.manual_seed(0)
    train = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]
    nearest, bilinear = fit("concatenation", train), fit("concatenation", train, upsample="bilinear")
    rows = [scorer.banks[0].search.rows for scorer in (nearest, bilinear)]
    assert torch.equal(rows[0][:, :4], rows[1][:, :4]) and not torch.equal(rows[0][:, 4:], rows[1][:, 4:])
    test = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    assert not torch.equal(nearest(test)[0], bilinear(test)[0])
    # The bank cache keys on it; nearest leaves the key as it was before the setting existed.
    keys = [bank_settings(ScoreConfig(upsample=mode), "sha", "files") for mode in ("nearest", "bilinear")]
    assert "upsample" not in keys[0] and keys[1] == {**keys[0], "upsample": "bilinear"}
    mult_keys = [bank_settings(ScoreConfig(fusion="multiplication", upsample=mode), "sha", "files")
                 for mode in ("nearest", "bilinear")]
    assert mult_keys[0] == mult_keys[1]  # multiplication's banks do not depend on it: one cache entry
    # Multiplication keeps each layer on its own grid: the setting does not change it.
    products = [fit("multiplication", train, upsample=mode)(test) for mode in ("nearest", "bilinear")]
    assert all(torch.equal(a, b) for a, b in zip(*products))
    with pytest.raises(SettingError, match="upsample='cubic': choose one of nearest, bilinear"):
        ScoreConfig(upsample="cubic")


def test_layer_scales_give_every_layer_the_coarsest_layers_total_variance():
    torch.manual_seed(0)
    fine, coarse = torch.randn(5, 3, 8, 8) * 0.5 + 2.0, torch.randn(5, 4, 4, 4) * 3.0
    scales = layer_scales([fine, coarse])
    assert scales[-1] == 1.0

    def total_variance(feat):  # over every patch: the sum of the channels' (population) variances
        return to_patches(feat).double().var(0, unbiased=False).sum().item()

    assert total_variance(fine * scales[0]) == pytest.approx(total_variance(coarse), rel=1e-6)  # (float32 product)
    assert scales[0] == pytest.approx(math.sqrt(total_variance(coarse) / total_variance(fine)), rel=1e-6)
    # A layer that does not vary keeps its features (no division by zero).
    assert layer_scales([torch.ones(2, 3, 4, 4), coarse])[0] == 1.0


def test_a_balanced_bank_holds_its_scales_and_scales_its_queries_alike():
    torch.manual_seed(1)
    train = [torch.randn(3, 4, 8, 8) * 0.3, torch.randn(3, 6, 4, 4) * 2.0]
    test = [torch.randn(2, 4, 8, 8) * 0.3, torch.randn(2, 6, 4, 4) * 2.0]
    balanced, plain = fit("concatenation", train, balance=True), fit("concatenation", train)
    scales = layer_scales(train)
    assert balanced.banks[0].scales == scales and balanced.banks[0].state()["scales"] == scales
    assert plain.banks[0].scales is None and scales[0] > 2  # the finer layer varies less: weighed up
    # The same as an unbalanced scorer fed features scaled by hand: the bank and the queries alike.
    by_hand = fit("concatenation", [f * s for f, s in zip(train, scales)])
    got, want = balanced(test), by_hand([f * s for f, s in zip(test, scales)])
    assert torch.allclose(got[0], want[0], rtol=1e-5) and torch.allclose(got[1], want[1], rtol=1e-5)
    assert not torch.allclose(got[1], plain(test)[1], rtol=1e-3)
    # Rebuilt from its states (the bank cache, a detector file), it scores the same.
    again = AnomalyScorer.from_states(balanced_config := ScoreConfig(size=32, knn="torch", balance=True),
                                      [bank.state() for bank in balanced.banks])
    assert torch.equal(again(test)[1], got[1]) and again.fusion_rule.scales == scales
    with pytest.raises(ValueError, match="needs its bank's layer scales"):
        AnomalyScorer.from_states(balanced_config, [plain.banks[0].state()])
    # A bank setting of concatenation over more than one layer: keyed there only, so banks made without it
    # keep their key; multiplication (each layer searched alone) and one layer ignore it.
    keys = {name: bank_settings(ScoreConfig(**settings), "sha", "files") for name, settings in {
        "off": {}, "on": {"balance": True}, "mult": {"fusion": "multiplication", "balance": True},
        "one": {"layers": (2,), "balance": True}, "one off": {"layers": (2,)}}.items()}
    assert "balance" not in keys["off"] and keys["on"] == {**keys["off"], "balance": True}
    assert "balance" not in keys["mult"] and keys["one"] == keys["one off"]
    products = [fit("multiplication", train, balance=flag)(test) for flag in (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(*products))
    assert fit("concatenation", train[:1], layers=(2,), balance=True).banks[0].scales is None
    with pytest.raises(SettingError, match="balance='yes': must be True"):
        ScoreConfig(balance="yes")


def test_concatenation_scores_by_hand():
    # Bank: one training image whose every patch is the zero vector.
    train = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 2, 2)]
    scorer = fit("concatenation", train)
    assert scorer.banks[0].whole is None and scorer.banks[0].search.rows.shape == (16, 3)
    test2 = torch.zeros(1, 2, 4, 4)
    test2[0, 0, 1, 2] = 3.0  # one layer-2 patch at distance 3
    test3 = torch.zeros(1, 1, 2, 2)
    test3[0, 0, 1, 1] = 4.0  # one layer-3 cell = 4 layer-2 patches at distance 4
    scores, maps = scorer.score([test2, test3])
    expected = torch.zeros(4, 4)
    expected[1, 2] = 3.0
    expected[2:, 2:] = 4.0
    assert scores.tolist() == [4.0]
    torch.testing.assert_close(maps, resize_map(expected[None], 32))


def test_multiplication_scores_by_hand():
    train = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    scorer = fit("multiplication", train)
    test2 = torch.full((1, 1, 4, 4), 2.0)
    test3 = torch.full((1, 1, 2, 2), 5.0)
    scores, maps = scorer.score([test2, test3])
    torch.testing.assert_close(maps, torch.full((1, 32, 32), 10.0))
    assert scores.tolist() == [10.0]
    assert len(scorer.banks) == 2 and scorer.banks[0].search.rows.shape == (16, 1)
    assert scorer.banks[1].search.rows.shape == (4, 1)


def test_to_patches_order():
    feat = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    patches = to_patches(feat)
    assert patches.shape == (8, 3)
    assert torch.equal(patches[1], feat[0, :, 0, 1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 3])
def test_chunked_knn_equals_brute_force(k, precision, monkeypatch):
    import scoring.engine.knn as knn

    monkeypatch.setattr(knn, "CHUNK_ROWS", 37)  # many bank chunks, uneven last chunk
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", 37 * 64)
    monkeypatch.setattr(knn, "QUERY_ROWS", 64)  # several query chunks
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(1000, 16, generator=gen)
    queries = torch.randn(300, 16, generator=gen)
    dist = BankSearch(bank, backend="torch", precision=precision)(queries, k)
    ref = torch.cdist(queries.double(), bank.double()).topk(k, largest=False).values
    torch.testing.assert_close(dist.double(), ref, rtol=1e-4, atol=1e-4)


def test_bf16_shortlist_keeps_exact_neighbours_of_relu_like_features():
    # Clustered, non-negative, high-dimensional: large shared mean, small gaps between neighbours,
    # where plain bf16 products misrank; the centred shortlist + float32 re-rank must not.
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(50, 384, generator=gen)
    bank = (centres[torch.randint(0, 50, (20000,), generator=gen)] + torch.randn(20000, 384, generator=gen)).abs()
    queries = (centres[torch.randint(0, 50, (1000,), generator=gen)] + torch.randn(1000, 384, generator=gen)).abs()
    ref = torch.cdist(queries.double(), bank.double()).topk(3, largest=False).values
    dist = BankSearch(bank, backend="torch", precision="bf16")(queries, 3)
    torch.testing.assert_close(dist.double(), ref, rtol=1e-5, atol=1e-4)
    tiny = BankSearch(bank[:5], backend="torch", precision="bf16")(queries[:4], 5)
    assert tiny.shape == (4, 5)  # shortlist longer than the bank


def test_bf16_shortlist_is_checked_where_rounding_hides_the_nearest_row():
    # Long vectors, tiny gaps: bfloat16 products (~2^-8 |q| |b|) cannot tell the near rows apart,
    # and a 16-row shortlist misses the nearest; the rounding bound sends those queries to float32.
    gen = torch.Generator().manual_seed(4)
    centre = 30 * torch.rand(64, generator=gen)  # two far clusters: long vectors even once centred
    sign = torch.where(torch.rand(5300, 1, generator=gen) < 0.5, 1.0, -1.0)
    points = sign * centre + 0.05 * torch.randn(5300, 64, generator=gen)
    bank, queries = points[:5000], points[5000:]
    ref = torch.cdist(queries.double(), bank.double()).topk(2, largest=False).values
    search = BankSearch(bank, backend="torch", precision="bf16")
    candidates, _ = search._shortlist(queries, 2 + knn_module.SHORTLIST_BF16, torch.bfloat16, False)
    unchecked = search._rerank(queries, candidates, 2)[0]
    assert (unchecked.double() > ref + 1e-4).any()  # the bfloat16 shortlist alone is wrong here...
    torch.testing.assert_close(search(queries, 2).double(), ref, rtol=1e-5, atol=1e-5)  # ...the search is not


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_unsure_float32_shortlists_are_settled_by_the_rounding_band(backend, monkeypatch):
    # 300 rows within 1e-4 of each other around long vectors: float32 products cannot order them
    # (rounding ~1e-5 |q| |b|), so every shortlist of 9 is unsure. The rows within the rounding
    # bound of the k-th are re-ranked exactly, with no float64 pass over the bank.
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    gen = torch.Generator().manual_seed(6)
    centre = 40 + torch.rand(96, generator=gen)
    bank = torch.cat([centre + 1e-4 * torch.randn(300, 96, generator=gen), torch.randn(3000, 96, generator=gen)])
    queries = centre + 1e-4 * torch.randn(20, 96, generator=gen)
    precisions = []
    original = BankSearch._shortlist
    monkeypatch.setattr(BankSearch, "_shortlist", lambda self, q, keep, dtype, tracing:
                        precisions.append(dtype) or original(self, q, keep, dtype, tracing))
    banded = []
    band = BankSearch._band
    monkeypatch.setattr(BankSearch, "_band", lambda self, *args: banded.append(args[0].shape[0]) or band(self, *args))
    search = BankSearch(bank, backend=backend, precision="fp32")
    got = search(queries, 2)
    assert banded == [20]  # every query was unsure, and the band settled each
    ref = torch.cdist(queries.double(), bank.double()).topk(2, largest=False).values
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.float64 not in precisions
    error, q_sq = search._value_error(queries, torch.float32)
    assert bool((error > 0).all()) and torch.allclose(q_sq, ((queries - search.mean).double() ** 2).sum(1))


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("k", [1, 2])
def test_faiss_accelerator_equals_torch_search(k):
    # faiss only shortlists; both re-rank with the same exact distances, so they agree to the bit
    # wherever the shortlists hold the same nearest rows.
    gen = torch.Generator().manual_seed(1)
    centres = 3 * torch.randn(20, 64, generator=gen)
    bank = (centres[torch.randint(0, 20, (3000,), generator=gen)] + torch.randn(3000, 64, generator=gen)).abs()
    queries = (centres[torch.randint(0, 20, (500,), generator=gen)] + torch.randn(500, 64, generator=gen)).abs()
    import faiss

    threshold = faiss.cvar.distance_compute_blas_threshold
    a = BankSearch(bank, backend="faiss")(queries, k)  # ranked with BLAS (see FAISS_BLAS_QUERIES)
    assert faiss.cvar.distance_compute_blas_threshold == threshold  # the user's setting is left as it was
    b = BankSearch(bank, backend="torch", precision="fp32")(queries, k)
    assert torch.equal(a, b)
    ref = torch.cdist(queries.double(), bank.double()).topk(k, largest=False).values
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5)


def test_search_is_the_same_traced_and_eager():
    gen = torch.Generator().manual_seed(2)
    search = BankSearch(torch.randn(5000, 24, generator=gen), backend="torch", precision="fp32")
    queries = torch.randn(40, 24, generator=gen)
    traced = torch.jit.trace(lambda q: search(q, 2), (queries,), check_trace=False)
    others = torch.randn(70, 24, generator=gen)  # another number of queries than the trace saw
    assert torch.equal(traced(others), search(others, 2))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rows_stored_centred_give_the_same_distances(precision):
    gen = torch.Generator().manual_seed(3)
    bank = (5 + torch.randn(3000, 32, generator=gen)).abs()  # a large shared mean, as ReLU features have
    queries = (5 + torch.randn(200, 32, generator=gen)).abs()
    plain = BankSearch(bank, backend="torch", precision=precision)
    before = plain(queries, 2)
    assert torch.equal(plain.rows, bank)  # as given: files keep the bank bit for bit
    centred = plain.store_centred()
    torch.testing.assert_close(centred(queries, 2), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(centred.rows, bank - bank.mean(0))


def test_bf16_bound_counts_both_operands_and_the_rounded_product():
    # 17 rows that bfloat16 ranks before the true nearest one (an exact copy of the query).
    a, c = 1 + 2 ** -7, 1 + 2 ** -8 - 2 ** -12
    rows = torch.tensor([a] * 17 + [c] + [-a] * 17 + [-c])[:, None]
    assert BankSearch(rows, backend="torch", precision="bf16")(torch.tensor([[c]]), 1).item() == 0.0


def test_certification_stops_on_non_finite_features():
    train, test = coreset_case("concatenation")
    scorer = AnomalyScorer.fit(ScoreConfig(size=32, knn="torch", coreset=0.1, refine=2), train)
    test = [t.clone() for t in test]
    test[0][0] = float("nan")
    scorer.score(test)  # returns (it used to loop for ever)
    certified, searched = scorer.search_counts
    assert not certified[0]  # its distances are NaN: nothing can certify it
    assert certified[1:].all() and scorer.search_stats["certified_images"] == len(certified) - 1


def test_few_queries_search_in_float32_without_a_second_copy_of_the_bank():
    """Under precision "auto" fewer than FEW_QUERIES queries take float32 products (bfloat16 only
    where it pays, and only for more), centring the rows block by block: exact distances, and no
    centred float32 copy of the bank kept; many queries keep the cached copy, as before."""
    import scoring.engine.knn as knn
    from common.runtime import bf16_matmul_pays

    gen = torch.Generator().manual_seed(0)
    centres = 5 + 3 * torch.rand(12, 48, generator=gen)  # a large shared mean, as ReLU features have
    bank = centres[torch.randint(0, 12, (20000,), generator=gen)] + torch.randn(20000, 48, generator=gen)
    search = BankSearch(bank, backend="torch", precision="auto")
    assert search._dtype(knn.FEW_QUERIES - 1) == torch.float32
    assert search._dtype(knn.FEW_QUERIES) == (torch.bfloat16 if bf16_matmul_pays("cpu") else torch.float32)
    for count in (5, knn.FEW_QUERIES + 36):
        queries = bank[:count] + 0.5 * torch.randn(count, 48, generator=gen)
        truth = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False).values
        torch.testing.assert_close(search(queries, 3).double(), truth, rtol=1e-5, atol=1e-5)
        if count < knn.FEW_QUERIES:
            assert torch.float32 not in search._centred  # centred block by block, nothing kept


def test_products_with_the_rows_as_stored_stay_within_their_rounding_bound():
    """Few float32 queries take (q - m).b - (q - m).m against the rows as stored: every ranking value
    is within the bound the certification uses (wider than the centred products'), on rows with a
    large shared mean."""
    gen = torch.Generator().manual_seed(1)
    bank = 40 + 5 * torch.rand(3000, 96, generator=gen)
    queries = bank[:7] + torch.randn(7, 96, generator=gen)
    search = BankSearch(bank, backend="torch", precision="fp32")
    q = queries - search.mean
    q_mean = (q.double() @ search.mean.double()).float()[:, None]
    approx = search.centred_sq[None, :] - 2.0 * (q @ bank.t() - q_mean)
    centred = bank.double() - search.mean.double()
    truth = centred.pow(2).sum(1)[None, :] - 2.0 * q.double() @ centred.t()
    wide, _ = search._value_error(queries, torch.float32, uncentred=True)
    narrow, _ = search._value_error(queries, torch.float32)
    assert bool(((approx.double() - truth).abs() <= wide[:, None]).all()) and bool((wide > narrow).all())


def test_k_larger_than_the_bank_names_the_setting():

    search = BankSearch(torch.randn(4, 3), backend="torch")
    with pytest.raises(SettingError, match=r"k=5: is larger than the memory bank \(4 patches\)"):
        search(torch.randn(2, 3), 5)


def test_coreset_keeps_first_centre_and_covers_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(5, 8) * 100
    bank = torch.cat([c + 0.1 * torch.randn(40, 8, generator=gen) for c in centres])
    chosen = greedy_coreset(bank, 5 / 200, seed=3, proj_dim=0, progress=False)
    first = int(torch.randint(0, 200, (1,), generator=torch.Generator().manual_seed(3)))
    assert int(chosen[0]) == first
    assert len(chosen) == 5
    assert sorted(int(i) // 40 for i in chosen) == [0, 1, 2, 3, 4]  # one per cluster
    # Covering radius: every bank row is close to some chosen row.
    radius = torch.cdist(bank, bank[chosen]).min(1).values.max()
    assert radius < 5
    assert torch.equal(greedy_coreset(bank, 1.0), torch.arange(200))


def test_coreset_with_projection_is_seeded():
    bank = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(bank, 0.1, seed=1, proj_dim=16, progress=False)
    b = greedy_coreset(bank, 0.1, seed=1, proj_dim=16, progress=False)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50


@pytest.mark.parametrize("rows, dim, fraction", [(300, 2, 0.3), (3000, 3, 0.05), (12000, 6, 0.02), (40000, 4, 0.01)])
def test_farthest_first_takes_the_direct_loops_rows(rows, dim, fraction):
    """On rows of small integers every distance is exact in float32 whatever kernel sums it, and
    ties are many: the lazy traversal (a pool, catch-ups in matrix products) must take exactly the
    direct loop's rows in its order, the lowest index on every tie."""
    from scoring.engine import coreset

    bank = torch.randint(-12, 13, (rows, dim), generator=torch.Generator().manual_seed(rows)).float()
    direct = coreset.greedy_coreset_direct(bank, fraction, seed=5, proj_dim=0, progress=False)
    states = []
    real_state = coreset.FarthestFirst

    class Recorded(real_state):
        def __init__(self, *args):
            super().__init__(*args)
            states.append(self)

    coreset.FarthestFirst = Recorded
    try:
        lazy = coreset.greedy_coreset(bank, fraction, seed=5, proj_dim=0, progress=False)
    finally:
        coreset.FarthestFirst = real_state
    assert torch.equal(lazy, direct)
    state = states[0]
    assert state.pool_size < rows and state.catch_ups > 1  # the pool and the catch-ups were exercised
    if rows >= 12000:
        assert state.rows_caught_up < rows * state.catch_ups  # catch-ups reached only part of the rows
    # Every bound is an upper bound of the true distance to the centres, exact once caught up.
    truth = torch.cdist(bank, bank[direct[:-1]]).pow(2).min(1).values
    assert bool((state.bound >= truth - 1e-3).all())
    state.catch_up(every=True)
    assert torch.allclose(state.bound, truth, atol=1e-3)


def test_coreset_of_trained_like_features_keeps_the_direct_loops_rows():
    """Float features: the pool, the catch-ups and the direct loop sum each distance with other
    kernels; in float64 rounded to float32 they agree, so the rows and their order are the same."""
    from scoring.engine import coreset

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 96, generator=gen).abs() * 3
    bank = (centres[torch.randint(0, 16, (6000,), generator=gen)] + torch.randn(6000, 96, generator=gen)).relu()
    lazy = coreset.greedy_coreset(bank, 0.05, seed=1, progress=False)
    assert torch.equal(lazy, coreset.greedy_coreset_direct(bank, 0.05, seed=1, progress=False))


def brute_force_aupro(masks, maps, limit=0.3):
    """Definition: at every distinct threshold, FPR over normal pixels and mean region overlap."""
    from scipy import ndimage

    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == j) for j in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    # Integrate to the limit with linear interpolation at the limit.
    x = np.r_[fpr[fpr <= limit], limit]
    y = np.r_[pro[fpr <= limit], np.interp(limit, fpr, pro)]
    return np.trapezoid(y, x) / limit if hasattr(np, "trapezoid") else np.trapz(y, x) / limit


def test_aupro_matches_brute_force():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        masks = np.zeros((3, 12, 12), dtype=bool)
        masks[0, 2:5, 3:7] = True
        masks[0, 8:10, 8:11] = True
        masks[1, 5:9, 1:4] = True  # image 2 has no region
        maps = rng.random((3, 12, 12)).round(2) + 0.5 * masks  # ties on purpose
        assert metrics.aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


def test_aupro_perfect_and_empty():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:4] = True
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert np.isnan(metrics.aupro(np.zeros((1, 4, 4), bool), np.random.rand(1, 4, 4)))


def test_image_metrics():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    f1, threshold = metrics.f1_max(labels, scores)
    # Calling 0.35 and up anomalous (tp 3, fp 1) beats calling only 0.8 and 0.9 (F1 0.8).
    assert f1 == pytest.approx(6 / 7)
    assert 0.1 < threshold < 0.35  # between the scores, by the one rule: score > threshold
    pred = metrics.above_threshold(scores, threshold)
    tp = (pred & (labels == 1)).sum()
    assert f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()))
    # Every image anomalous is best: the threshold lies below the lowest score.
    best, t = metrics.f1_max(np.array([1, 1]), np.array([0.2, 0.3]))
    assert best == 1.0 and t < 0.2 and metrics.above_threshold(np.array([0.2, 0.3], np.float32), t).all()


def test_gaussian_smooth_matches_scipy():
    from scipy.ndimage import gaussian_filter

    maps = torch.rand(2, 20, 24, generator=torch.Generator().manual_seed(0))
    ours = gaussian_smooth(maps, 2.0).numpy()
    ref = np.stack([gaussian_filter(m, 2.0, mode="mirror") for m in maps.numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("fusion", ["concatenation", "multiplication"])
@pytest.mark.parametrize("smooth", [0.0, 2.0])
def test_floor_takes_a_share_of_each_maps_own_minimum_and_leaves_the_scores(fusion, smooth):
    gen = torch.Generator().manual_seed(1)
    train = [torch.randn(12, 8, 8, 8, generator=gen), torch.randn(12, 4, 4, 4, generator=gen)]
    # Two test images far apart: their maps' floors differ, so a shared offset would not do.
    test = [torch.randn(2, 8, 8, 8, generator=gen) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1),
            torch.randn(2, 4, 4, 4, generator=gen) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)]
    plain_scores, plain_maps = fit(fusion, train, smooth=smooth).score(test)
    scores, maps = fit(fusion, train, smooth=smooth, floor=0.5).score(test)
    torch.testing.assert_close(scores, plain_scores)  # image scores are taken before the floor
    floors = plain_maps.flatten(1).amin(1)
    assert floors[1] > 2 * floors[0] > 0
    torch.testing.assert_close(maps, plain_maps - 0.5 * floors[:, None, None])
    # All of it (the largest share the setting takes): every map's lowest value is 0.
    _, lowest = fit(fusion, train, smooth=smooth, floor=1.0).score(test)
    torch.testing.assert_close(lowest.flatten(1).amin(1), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"floor=1.5: must be a number from 0 \(off\) to 1"):
        ScoreConfig(floor=1.5)


@pytest.mark.parametrize("fusion", ["concatenation", "multiplication"])
def test_coreset_refine_restores_exact_image_scores(fusion):
    gen = torch.Generator().manual_seed(0)
    train = [torch.randn(20, 8, 8, 8, generator=gen), torch.randn(20, 4, 4, 4, generator=gen)]
    test = [torch.randn(5, 8, 8, 8, generator=gen), torch.randn(5, 4, 4, 4, generator=gen)]
    exact = fit(fusion, train)
    coarse_config = ScoreConfig(fusion=fusion, size=32, knn="torch", coreset=0.1, coreset_dim=0, refine=0,
                                certify=False)
    states = bank_states(coarse_config, train)
    assert states[0]["full"] is not None and states[0]["rows"].shape[0] == math.ceil(0.1 * states[0]["full"].shape[0])
    coarse = AnomalyScorer.from_states(coarse_config, states)
    # The same coreset, every patch of the finest grid (64) re-searched in the whole bank.
    refined = AnomalyScorer.from_states(coarse_config.replace(refine=64), states)
    ref_scores, ref_maps = exact.score(test)
    coarse_scores, _ = coarse.score(test)
    refined_scores, refined_maps = refined.score(test)
    assert (coarse_scores >= ref_scores - 1e-5).all() and (coarse_scores > ref_scores + 1e-3).any()
    # Refining every patch (64 = all patches of the finest grid) gives the exact result.
    torch.testing.assert_close(refined_scores, ref_scores)
    torch.testing.assert_close(refined_maps, ref_maps)


@pytest.mark.parametrize("kinds", ["default", "held-out"])
def test_synthetic_check_split_and_images_are_seeded_and_disjoint(kinds):
    from scoring.pipeline.synthetic_check import CHECK_AUGS, HELD_OUT_KINDS, split_train, synthetic_images

    augs = CHECK_AUGS if kinds == "default" else HELD_OUT_KINDS
    count = 4 * (1 + len(augs))

    fit, held = split_train(20, seed=3)
    assert len(held) == 4 and len(fit) == 16
    assert set(fit.tolist()).isdisjoint(held.tolist()) and set(fit.tolist()) | set(held.tolist()) == set(range(20))
    assert torch.equal(split_train(20, seed=3)[1], held) and not torch.equal(split_train(20, seed=4)[1], held)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    batch, masks, labels = synthetic_images(images, held, fit, seed=3, augs=augs)
    assert batch.shape == (count, 3, 32, 32) and masks.shape == (count, 32, 32)
    assert labels.tolist() == [0] * 4 + [1] * (count - 4)
    # The normals are the held-out images untouched; every anomaly changes its masked pixels only.
    assert torch.equal(batch[:4], images[held].float() / 255) and not masks[:4].any()
    for j in range(4, count):
        normal = batch[(j - 4) % 4]
        changed = (batch[j] - normal).abs().amax(0) > 1e-6
        assert masks[j].any() and not (changed & ~masks[j]).any()
    again, _, _ = synthetic_images(images, held, fit, seed=3, augs=augs)
    assert torch.equal(again, batch)


def test_patch_bank_state_round_trip_and_search():
    gen = torch.Generator().manual_seed(1)
    patches, queries = torch.randn(300, 6, generator=gen), torch.randn(7, 6, generator=gen)
    config = ScoreConfig(size=32, coreset=0.2, coreset_dim=0, knn="torch", certify=False)
    [state] = bank_states(config, [patches.view(10, 5, 6, 6).permute(0, 3, 1, 2)])  # 10 images of 5 x 6 patches
    assert state["rows"].shape == (60, 6) and torch.equal(state["full"], patches)
    bank = PatchBank(state, refine=4, backend="torch")
    assert bank.state()["coreset"] == 0.2 and torch.equal(bank.state()["rows"], state["rows"])
    assert torch.equal(bank.state()["full"], patches)  # kept where it is searched (refinement)
    assert PatchBank(state, refine=0, backend="torch").state()["full"] is None  # else left out of files
    brute = torch.cdist(queries, state["rows"]).sort(1).values[:, :3]
    torch.testing.assert_close(bank.search(queries, 3), brute, rtol=1e-4, atol=1e-4)
    # Saved and loaded as a plain weights-only file.
    import io

    buffer = io.BytesIO()
    torch.save(bank.state(), buffer)
    buffer.seek(0)
    loaded = PatchBank(torch.load(buffer, weights_only=True), refine=4, backend="torch")
    assert torch.equal(loaded.whole.rows, patches)


def coreset_case(fusion: str, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clustered non-negative features (as ReLU features are) of 30 training and 12 test images."""
    gen = torch.Generator().manual_seed(seed)
    centres = [3 * torch.randn(6, channels, generator=gen) for channels in (8, 4)]

    def images(count: int) -> list[torch.Tensor]:
        out = []
        for centre, side in zip(centres, (8, 4)):
            pick = centre[torch.randint(0, 6, (count, side, side), generator=gen)]  # (count, side, side, C)
            out.append((pick + 0.5 * torch.randn(pick.shape, generator=gen)).abs().permute(0, 3, 1, 2).contiguous())
        return out

    return images(30), images(12)


@pytest.mark.parametrize("fusion", ["concatenation", "multiplication"])
@pytest.mark.parametrize("k", [1, 2])
def test_certified_coreset_scores_equal_the_exact_bank(fusion, k):
    train, test = coreset_case(fusion, seed=k)
    exact_scorer = fit(fusion, train, k=k)
    exact_scores, exact_maps = exact_scorer.score(test)
    assert exact_scorer.search_stats["exact_map_cells"] == "all"
    config = ScoreConfig(fusion=fusion, size=32, knn="torch", k=k, coreset=0.1, refine=2)
    certified = AnomalyScorer.fit(config, train)
    scores, maps = certified.score(test)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-6, atol=0)
    assert (maps >= exact_maps - 1e-5).all()  # outside the re-searched patches the map is a bound
    stats = certified.search_stats
    assert stats["bank"] == "certified" and stats["certified_images"] == stats["images"] == 12
    assert stats["exact_map_cells"].startswith("the re-searched patches")
    assert 0 < stats["re_searched_per_image_mean"] <= stats["re_searched_per_image_max"]
    # The fixed, uncertified re-search of the 2 highest patches does not reach the exact scores.
    fixed = AnomalyScorer.fit(config.replace(certify=False), train)
    fixed_scores, _ = fixed.score(test)
    assert (fixed_scores >= exact_scores - 1e-5).all() and (fixed_scores > exact_scores * (1 + 1e-4)).any()
    assert fixed.search_stats["bank"] == "uncertified" and fixed.search_stats["certified_images"] == 0
    alone = AnomalyScorer.from_states(config.replace(certify=False, refine=0), bank_states(config, train))
    alone_scores, _ = alone.score(test)
    assert alone.search_stats["bank"] == "coreset only" and alone.search_stats["certified_images"] == 0
    assert alone.search_stats["exact_map_cells"] == "none"
    assert (alone_scores >= exact_scores - 1e-5).all()  # the coreset alone: bounds, not certified


@pytest.mark.parametrize("fusion", ["concatenation", "multiplication"])
@pytest.mark.parametrize("cells", [0, 16])  # also with the coreset's cells read (scoring.engine.cells)
def test_traced_certification_scores_and_maps_as_eager(fusion, cells):
    train, test = coreset_case(fusion, seed=5)
    scorer = AnomalyScorer.fit(ScoreConfig(fusion=fusion, size=32, knn="torch", coreset=0.1, refine=2, cells=cells),
                               train)
    assert (scorer.banks[0].cell_starts is not None) == (cells > 0)
    eager_scores, eager_maps, eager_certified, _ = scorer.search_maps(test)
    traced = torch.jit.trace(lambda a, b: scorer.search_maps([a, b])[:3], tuple(t[:5] for t in test),
                             check_trace=False)
    scores, maps, certified = traced(*test)  # another batch size than the trace saw
    assert eager_certified.all() and certified.any()
    # 4 rounds of 2, 4, 8, 16 cells leave some open; the cells' tighter bounds leave fewer to search
    assert cells > 0 or not certified.all()
    # Certified within the graph's fixed rounds: the same exact scores and maps as eager; the others
    # say so, and their scores are bounds of the exact ones.
    torch.testing.assert_close(scores[certified], eager_scores[certified], rtol=1e-6, atol=0)
    torch.testing.assert_close(maps[certified], eager_maps[certified], rtol=1e-6, atol=1e-6)
    assert (scores[~certified] >= eager_scores[~certified] - 1e-6).all()


def test_tiny_coresets_are_refused_and_fused_maps_are_not_certified():

    train, _ = coreset_case("concatenation")
    with pytest.raises(SettingError, match=r"coreset=1e-09: keeps 1 of the bank's 1920 patches, fewer than one"):
        AnomalyScorer.fit(ScoreConfig(size=32, knn="torch", coreset=1e-9), train)
    with pytest.raises(SettingError, match="refine=0: must be at least 1 for certified coreset scores"):
        ScoreConfig(coreset=0.1, refine=0)
    assert ScoreConfig(coreset=0.1, refine=0, certify=False).refine == 0  # the coreset alone, uncertified
    with pytest.raises(SettingError, match="not the fused one") as info:
        ScoreConfig(coreset=0.1, map_source="fused")
    from common import cli

    flags = {"map_source": "--map", "certify": "--uncertified", "certify=False": "--uncertified",
             "coreset": "--coreset"}
    assert cli.setting_message(info.value, flags) == (
        "--map fused: certified coreset scores cover the knn and head maps, not the fused one; add --uncertified "
        "(uncertified) or keep the whole bank (--coreset 1)")


def test_a_new_search_backend_is_a_new_class():
    """A Shortlist of one's own (here brute force with cdist) is passed in; the exact re-rank after
    it is BankSearch's, so it returns the distances of the built-in backends."""
    from scoring.engine.knn import Shortlist

    class BruteForce(Shortlist):
        name = "brute-force"

        def rank(self, search, queries, keep, dtype, tracing):
            q = queries - search.mean
            values = torch.cdist(q, search.rows - search.mean).pow(2) - q.pow(2).sum(1, keepdim=True)
            ranked = values.topk(min(keep + 1, search.size), dim=1, largest=False)
            beyond = ranked.values[:, keep] if keep < search.size else torch.full((len(q),), float("inf"))
            return ranked.indices[:, :keep], beyond, torch.float32

    gen = torch.Generator().manual_seed(4)
    bank, queries = torch.rand(300, 24, generator=gen), torch.rand(40, 24, generator=gen)
    mine = BankSearch(bank, BruteForce)
    assert mine.backend == "brute-force"
    torch.testing.assert_close(mine(queries, 3), BankSearch(bank, "torch", "fp32")(queries, 3), rtol=0, atol=0)
    brute = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False).values.float()
    torch.testing.assert_close(mine(queries, 3), brute, rtol=1e-5, atol=1e-6)


def test_a_bank_sampler_is_passed_in():
    """bank_states keeps the rows a sampler of one's own selects (here every other one)."""
    from scoring.engine.model import bank_states

    class EveryOther:
        def select(self, rows, device="cpu", shards=None):
            return torch.arange(0, rows.shape[0], 2)

    feats = [torch.rand(4, 8, 4, 4, generator=torch.Generator().manual_seed(2))]
    config = ScoreConfig(size=32, layers=(2,), coreset=0.5)
    (state,) = bank_states(config, feats, sampler=EveryOther())
    assert torch.equal(state["rows"], state["full"][::2]) and state["full"].shape == (64, 8)


@pytest.mark.parametrize("folds", [2, 5])
def test_cross_fitting_scores_each_fold_against_a_bank_of_the_others(folds):
    from scoring.engine.calibration import cross_fitted_maps

    gen = torch.Generator().manual_seed(3)
    train = [torch.randn(13, 8, 8, 8, generator=gen), torch.randn(13, 4, 4, 4, generator=gen)]
    config = ScoreConfig(fusion="concatenation", size=32, knn="torch", seed=4)
    scores, _ = cross_fitted_maps(config, train, "cpu", keep_maps=False, folds=folds)
    # The same split by hand: the seed's permutation cut at i * N // folds (halves: N // 2 first).
    order = torch.randperm(13, generator=torch.Generator().manual_seed(4))
    bounds = [i * 13 // folds for i in range(folds + 1)]
    assert bounds[1] == (6 if folds == 2 else 2)
    for start, end in zip(bounds, bounds[1:]):
        held, rest = order[start:end], torch.cat([order[:start], order[end:]])
        expected, _ = fit("concatenation", [f[rest] for f in train]).score([f[held] for f in train])
        torch.testing.assert_close(scores[held], expected)
    # More folds, larger banks: the held-out scores sit lower on the mean than against halves.
    if folds == 5:
        halves, _ = cross_fitted_maps(config, train, "cpu", keep_maps=False, folds=2)
        assert float(scores.mean()) < float(halves.mean())
