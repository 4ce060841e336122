"""Heuristic selectors: k unique sorted indices, and each method's defining behaviour."""

from __future__ import annotations

import pytest
import torch

from evocomp.baselines import HEURISTICS, dart_pivots, heuristic_sets, select, visionzip_merge

H, W = 4, 6
N = H * W


def _context(n: int = N, grid: tuple[int, int] = (H, W), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randn(n, 8, generator=g),
        "grid": grid,
        "text_attn": torch.rand(n, generator=g),
        "cls_attn": torch.rand(n, generator=g),
    }


def _assert_valid(idx: torch.Tensor, k: int, n: int) -> None:
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert idx.tolist() == sorted(set(idx.tolist())), "sorted ascending, no duplicates"
    assert int(idx.min()) >= 0 and int(idx.max()) < n


@pytest.mark.parametrize("method", HEURISTICS)
@pytest.mark.parametrize("k", [1, 2, 5, N - 1, N])
def test_every_method_returns_k_unique_sorted_indices(method, k):
    _assert_valid(select(method, k, **_context()), k, N)


@pytest.mark.parametrize("method", HEURISTICS)
@pytest.mark.parametrize("grid", [(1, N), (N, 1), (1, 1)])
def test_degenerate_grids(method, grid):
    n = grid[0] * grid[1]
    for k in sorted({1, max(1, n // 3), n}):
        _assert_valid(select(method, k, **_context(n, grid)), k, n)


@pytest.mark.parametrize("method", HEURISTICS)
def test_ties_and_identical_tokens_still_give_k_unique(method):
    ctx = _context()
    ctx["tokens"] = torch.ones(N, 8)  # every token identical: distances all 0
    ctx["text_attn"] = ctx["cls_attn"] = torch.full((N,), 0.5)
    for k in (1, 7, N):
        _assert_valid(select(method, k, **ctx), k, N)


def test_attention_ties_go_to_the_lower_index():
    attn = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5])
    assert select("fastv", 2, text_attn=attn).tolist() == [1, 2]


def test_fastv_and_visionzip_keep_the_top_attention_tokens():
    ctx = _context()
    top_text = set(torch.topk(ctx["text_attn"], 6).indices.tolist())
    top_cls = set(torch.topk(ctx["cls_attn"], 6).indices.tolist())
    assert set(select("fastv", 6, **ctx).tolist()) == top_text
    assert set(select("visionzip", 6, **ctx).tolist()) == top_cls


def test_random_is_seeded():
    ctx = _context()
    a = select("random", 8, **ctx, seed=3)
    assert torch.equal(a, select("random", 8, **ctx, seed=3))
    assert any(not torch.equal(a, select("random", 8, **ctx, seed=s)) for s in (4, 5, 6))


def test_random_needs_only_the_token_count():
    _assert_valid(select("random", 3, text_attn=torch.rand(10)), 3, 10)


def test_pooling_is_a_uniform_stride():
    assert select("pooling", 9, grid=(6, 6)).tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]
    quads = [(int(i) // 6 >= 3, int(i) % 6 >= 3) for i in select("pooling", 4, grid=(6, 6))]
    assert sorted(quads) == [(False, False), (False, True), (True, False), (True, True)]
    assert select("pooling", N, grid=(H, W)).tolist() == list(range(N))


def _clusters(n_clusters: int, per: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:n_clusters] * 10
    return centres.repeat_interleave(per, 0) + 0.1 * torch.randn(n_clusters * per, 8, generator=g)


def test_divprune_picks_one_per_cluster_first():
    tokens = _clusters(4, 5)  # cluster c = tokens 5c .. 5c+4
    picked = select("divprune", 4, tokens=tokens)
    assert sorted(int(i) // 5 for i in picked) == [0, 1, 2, 3]
    assert len({int(i) // 5 for i in select("divprune", 5, tokens=tokens)}) == 4


def test_divprune_fill_keeps_the_given_tokens_and_covers_other_clusters():
    from evocomp.baselines import divprune_fill

    tokens = _clusters(4, 5)  # cluster c = tokens 5c .. 5c+4
    kept = divprune_fill(tokens, torch.tensor([0, 1]), 5)
    assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == 5
    assert {0, 1} <= set(kept.tolist())
    assert sorted({int(i) // 5 for i in kept}) == [0, 1, 2, 3]  # one token of every other cluster
    assert divprune_fill(tokens, torch.tensor([7, 2]), 2).tolist() == [2, 7]  # nothing to fill
    for bad in ([0, 1, 2], []):
        with pytest.raises(ValueError, match="not 1..k"):
            divprune_fill(tokens, torch.tensor(bad, dtype=torch.long), 2)


def test_dart_keeps_pivots_and_drops_their_duplicates():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(20, 16, generator=g)
    tokens[3] *= 10  # the two pivots (largest norms) for k = 6
    tokens[11] *= 8
    tokens[[0, 1, 2]] = tokens[3] * 0.1  # duplicates of pivot 3
    assert dart_pivots(6) == 2
    kept = set(select("dart", 6, tokens=tokens).tolist())
    assert {3, 11} <= kept
    assert not kept & {0, 1, 2}


@pytest.mark.parametrize("k", [1, 2, 12, 192, 576])
def test_dart_pivot_count_is_bounded(k):
    assert 1 <= dart_pivots(k) <= min(k, 8)


def test_bad_arguments_are_refused():
    ctx = _context()
    with pytest.raises(ValueError, match="known: random, pooling, fastv"):
        select("topk", 3, **ctx)
    for k in (0, N + 1):
        with pytest.raises(ValueError, match="k must be in 1..N=24"):
            select("random", k, **ctx)
    for method, need in [("pooling", "grid"), ("fastv", "text_attn"), ("visionzip", "cls_attn"),
                         ("divprune", "tokens"), ("dart", "tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=need):
            select(method, 3, **{k: v for k, v in ctx.items() if k != need})
    with pytest.raises(ValueError, match="needs one of"):
        select("random", 3)
    with pytest.raises(ValueError, match="disagree"):
        select("fastv", 3, text_attn=torch.rand(N), grid=(5, 5))
    with pytest.raises(ValueError, match="NaN/Inf"):
        select("fastv", 3, text_attn=torch.tensor([0.1, float("nan"), 0.3]))


def test_heuristic_sets_covers_every_method_in_order():
    sets = heuristic_sets(5, **_context(), seed=1)
    assert tuple(sets) == HEURISTICS
    for idx in sets.values():
        _assert_valid(idx, 5, N)
    assert tuple(heuristic_sets(5, **_context(), methods=("fastv",))) == ("fastv",)


# ---- VisionZip-style merging (evaluation only) ------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 10, N])
def test_visionzip_merge_shapes_and_order(k):
    ctx = _context()
    emb, pos = visionzip_merge(ctx["tokens"], ctx["cls_attn"], k)
    assert emb.shape == (k, 8) and emb.dtype == ctx["tokens"].dtype
    _assert_valid(pos, k, N)


def test_visionzip_merge_keeps_dominant_tokens_and_averages_the_rest():
    tokens = _clusters(2, 6)  # cluster 0 = tokens 0..5, cluster 1 = tokens 6..11
    cls_attn = torch.zeros(12)
    cls_attn[[0, 6]] = 1.0  # dominant: one token of each cluster
    emb, pos = visionzip_merge(tokens, cls_attn, 4, dominant_fraction=0.5)
    # Targets are evenly spaced among the rest [1..5, 7..11]: tokens 3 and 9.
    assert pos.tolist() == [0, 3, 6, 9]
    assert torch.allclose(emb[0], tokens[0]) and torch.allclose(emb[2], tokens[6])
    assert torch.allclose(emb[1], tokens[1:6].mean(0), atol=1e-6)
    assert torch.allclose(emb[3], tokens[7:12].mean(0), atol=1e-6)


def test_visionzip_merge_all_dominant_equals_plain_selection():
    ctx = _context()
    emb, pos = visionzip_merge(ctx["tokens"], ctx["cls_attn"], 6, dominant_fraction=1.0)
    assert torch.equal(pos, select("visionzip", 6, **ctx))
    assert torch.equal(emb, ctx["tokens"][pos])


def test_visionzip_merge_keep_all_returns_the_tokens():
    ctx = _context()
    emb, pos = visionzip_merge(ctx["tokens"], ctx["cls_attn"], N)
    assert pos.tolist() == list(range(N))
    assert torch.allclose(emb, ctx["tokens"])


def test_visionzip_merge_refuses_bad_arguments():
    ctx = _context()
    with pytest.raises(ValueError, match="k must be"):
        visionzip_merge(ctx["tokens"], ctx["cls_attn"], 0)
    with pytest.raises(ValueError, match="dominant_fraction"):
        visionzip_merge(ctx["tokens"], ctx["cls_attn"], 3, dominant_fraction=1.5)
    with pytest.raises(ValueError, match="disagree"):
        visionzip_merge(ctx["tokens"], ctx["cls_attn"][:5], 3)
