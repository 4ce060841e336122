"""The DEAP genetic search on cheap synthetic fitness functions (no model)."""

from __future__ import annotations

import hashlib
import pickle
import random

import pytest
import torch
from deap import creator

from evocomp.baselines import heuristic_sets
from evocomp.config import SearchParams
from evocomp.data.samples import sample_seed
from evocomp.features.grouping import group_ids, groups_as_lists
from evocomp.search import SearchResult, SearchSpace, group_quotas, search_sample
from evocomp.search.operators import repair
from evocomp.tolerance import loss_on_grid as on_grid

PAPER = SearchParams()
BUDGET = SearchParams(mode="budget")


def _groups(sizes: list[int], seed: int) -> torch.Tensor:
    """Dense group ids (first-appearance order) of shuffled groups of the given sizes."""
    ids = [g for g, s in enumerate(sizes) for _ in range(s)]
    random.Random(seed).shuffle(ids)
    return group_ids(torch.tensor(ids))


def _planted(groups: torch.Tensor, mode: str, k: int | None, seed: int) -> set[int]:
    """An optimum the search can reach: one token per group, or k tokens within quota."""
    rng = random.Random(seed)
    members = groups_as_lists(groups)
    if mode == "paper":
        return {rng.choice(m) for m in members}
    if k >= len(members):
        quota = group_quotas([len(m) for m in members], k)
        return {t for m, q in zip(members, quota, strict=True) for t in rng.sample(m, q)}
    return {rng.choice(members[g]) for g in rng.sample(range(len(members)), k)}


def _miss_loss(planted: set[int], seed: int = 0):
    """Loss = weighted count of kept tokens outside the planted set (0 at the optimum)."""
    w = [1.0 + random.Random(seed * 1000 + t).random() for t in range(10_000)]

    def fitness(idx: torch.Tensor) -> torch.Tensor:
        return torch.tensor([sum(w[t] for t in row if t not in planted) for row in idx.tolist()])

    return fitness


def _hash_loss(seed: int):
    """A rugged landscape: every candidate set gets its own pseudo-random loss."""

    def fitness(idx: torch.Tensor) -> torch.Tensor:
        digest = [
            hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=4).digest()
            for row in idx.tolist()
        ]
        return torch.tensor([int.from_bytes(d, "big") / 2**32 for d in digest])

    return fitness


class Recorder:
    """Wraps a fitness function and keeps every index batch it was given."""

    def __init__(self, fitness):
        self.fitness, self.calls = fitness, []

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls.append(idx.clone())
        return self.fitness(idx)


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


# ---- behaviour: the planted optimum is found ---------------------------------------------


@pytest.mark.parametrize(
    ("mode", "k", "sizes"),
    [
        ("paper", None, [6] * 6),
        ("paper", None, [12, 8, 6, 4, 3, 2, 1]),
        ("budget", 12, [6] * 6),
        ("budget", 12, [12, 8, 6, 4, 3, 2, 1]),
        ("budget", 4, [12, 8, 6, 4, 3, 2, 1]),  # k < G: at most one token per group
    ],
)
def test_planted_optimum_is_recovered_with_default_settings(mode, k, sizes):
    recovered, losses = 0, []
    for seed in range(6):
        groups = _groups(sizes, seed)
        planted = _planted(groups, mode, k, seed)
        params = SearchParams(mode=mode)
        r = search_sample(_tokens(36), groups, _miss_loss(planted, seed), k, params, seed)
        recovered += set(r.kept) == planted
        losses.append(r.loss)
    assert recovered >= 5, f"recovered {recovered}/6, losses {losses}"
    assert max(losses) <= 2.0  # a miss is at most one wrong token


def test_independent_runs_agree_on_a_clear_optimum():
    groups = _groups([6] * 6, 0)
    planted = _planted(groups, "paper", None, 0)
    r = search_sample(
        _tokens(36), groups, _miss_loss(planted), None, PAPER.model_copy(update={"seeds": 3}), 0
    )
    assert set(r.kept) == planted
    assert r.agreement == pytest.approx(1.0)


# ---- determinism, call accounting, caching ------------------------------------------------


@pytest.mark.parametrize("params", [PAPER, BUDGET])
def test_same_seed_same_label_and_different_seed_searches_differently(params):
    groups = _groups([10, 10, 10, 10, 10, 10], 1)
    r1 = search_sample(_tokens(60), groups, _hash_loss(7), 20, params, seed=5)
    r2 = search_sample(_tokens(60), groups, _hash_loss(7), 20, params, seed=5)
    assert r1 == r2
    others = [search_sample(_tokens(60), groups, _hash_loss(7), 20, params, seed=s) for s in (6, 7)]
    assert any(o.logbook != r1.logbook for o in others)


@pytest.mark.parametrize(("params", "k"), [(PAPER, None), (BUDGET, 20)])
def test_one_batched_call_per_generation_and_duplicates_scored_once(params, k):
    groups = _groups([10] * 6, 2)
    fitness = Recorder(_hash_loss(3))
    r = search_sample(_tokens(60), groups, fitness, k, params, seed=0)
    expected_k = 6 if params.mode == "paper" else 20
    assert r.n_forwards == len(fitness.calls) == params.generations + 1
    assert len(r.logbook) == params.generations + 1
    rows = []
    for idx in fitness.calls:
        assert idx.dtype == torch.long and idx.dim() == 2 and idx.shape[1] == expected_k
        assert 1 <= idx.shape[0] <= params.population
        for row in idx.tolist():
            assert row == sorted(set(row)) and row[0] >= 0 and row[-1] < 60
            if params.mode == "paper":  # one token per group
                assert sorted(int(groups[t]) for t in row) == list(range(6))
            rows.append(tuple(row))
    assert len(rows) == len(set(rows)) == r.n_evals, "an index set was scored twice"
    assert sum(rec["nevals"] for rec in r.logbook) == r.n_evals
    assert [rec["gen"] for rec in r.logbook] == list(range(params.generations + 1))
    for rec in r.logbook:
        assert set(rec) == {"gen", "nevals", "min", "avg", "max", "std"}
        assert rec["min"] <= rec["avg"] <= rec["max"]


def test_a_single_candidate_space_costs_one_forward():
    fitness = Recorder(_hash_loss(0))
    r = search_sample(_tokens(5), torch.arange(5), fitness, None, PAPER, seed=0)
    assert len(fitness.calls) == 1 and fitness.calls[0].shape == (1, 5)
    assert r.kept == [0, 1, 2, 3, 4] and r.n_evals == 1


def test_early_stop_after_patience_generations_without_improvement():
    fitness = Recorder(lambda idx: torch.ones(idx.shape[0]))
    params = BUDGET.model_copy(update={"early_stop_patience": 2})
    r = search_sample(_tokens(40), _groups([10] * 4, 0), fitness, 10, params, seed=0)
    assert r.converged_gen == 0
    assert len(r.logbook) == 3 and len(fitness.calls) == r.n_forwards <= 3


def test_progress_reports_every_generation_with_a_non_increasing_best():
    seen = []
    search_sample(_tokens(36), _groups([6] * 6, 0), _hash_loss(1), None, PAPER, 0,
                  progress=lambda gen, best: seen.append((gen, best)))  # fmt: skip
    assert [g for g, _ in seen] == list(range(PAPER.generations + 1))
    assert all(b2 <= b1 for (_, b1), (_, b2) in zip(seen, seen[1:], strict=False))


@pytest.mark.parametrize(
    ("sizes", "mode", "k"),
    [([30, 1, 1, 2, 1], "paper", None), ([3, 2, 4], "paper", None), ([5, 3, 2], "budget", 5),
     ([4, 3, 2, 1], "budget", 2), ([6], "budget", 3), ([2, 2, 2, 2], "budget", 8)],
)  # fmt: skip
def test_space_size_counts_every_candidate(sizes, mode, k):
    from itertools import combinations

    groups = _groups(sizes, 0)
    n = sum(sizes)
    space = SearchSpace.build(groups, k, SearchParams(mode=mode))
    brute = sum(space.contains(c) for c in combinations(range(n), space.k))
    assert space.size == brute > 0
    listed = space.enumerate()
    enumerated = {tuple(sorted(c)) for c in listed}
    assert len(listed) == len(enumerated) == space.size
    assert all(space.contains(c) for c in enumerated)
    if mode == "paper":  # slot g holds a member of group g
        assert all(space.group_of[t] == g for c in listed for g, t in enumerate(c))


def test_a_space_smaller_than_the_population_is_scored_whole_in_one_forward():
    """The reference model's typical sample: one big background group, a few objects."""
    groups = _groups([30, 1, 1, 2, 1, 1], 3)  # 60 candidates > 48: the GA runs ...
    fitness = Recorder(_hash_loss(5))
    r = search_sample(_tokens(36), groups, fitness, None, PAPER, seed=1)
    small = _groups([20, 1, 2, 1, 1], 3)  # ... 40 candidates fit in one population
    fitness_small = Recorder(_hash_loss(5))
    r_small = search_sample(_tokens(25), small, fitness_small, None, PAPER, seed=1)
    assert len(fitness_small.calls) == r_small.n_forwards == 1 and r_small.n_evals == 40
    assert len(r_small.logbook) == 1
    everything = fitness_small.calls[0]
    losses = _hash_loss(5)(everything)
    assert r_small.loss == on_grid(float(losses.min()))  # the exact optimum
    assert r_small.kept == everything[int(losses.argmin())].tolist()
    # the larger space: 48 scored first, the 12 left all in the next generation, then stop
    assert r.n_evals == 60 and [row["nevals"] for row in r.logbook] == [48, 12]
    assert r.loss == on_grid(float(_hash_loss(5)(torch.cat(fitness.calls)).min()))


def test_a_space_a_few_generations_wide_is_searched_then_finished_exactly():
    groups = _groups([30, 2, 2, 1, 1], 4)  # 120 candidates: 48, then 36 bred, then the rest
    fitness = Recorder(_hash_loss(2))
    r = search_sample(_tokens(36), groups, fitness, None, PAPER, seed=3)
    rows = torch.cat(fitness.calls)
    assert r.n_evals == 120 == len({tuple(sorted(x)) for x in rows.tolist()})
    assert r.n_forwards <= 4 and r.loss == on_grid(float(_hash_loss(2)(rows).min()))


def test_an_exhausted_budget_space_stops_with_the_optimum():
    groups = _groups([4, 3, 2, 1], 2)  # k=2 < G=4: 35 candidates
    fitness = Recorder(_hash_loss(9))
    r = search_sample(_tokens(10), groups, fitness, 2, BUDGET, seed=0)
    rows = torch.cat(fitness.calls)
    assert r.n_evals == 35 == len({tuple(x) for x in rows.tolist()})
    assert len(r.logbook) < BUDGET.generations + 1
    assert r.loss == on_grid(float(_hash_loss(9)(rows).min()))


# ---- heuristic seeding --------------------------------------------------------------------


def test_budget_label_never_worse_than_the_best_heuristic():
    n, k = 36, 12
    for land in range(20):
        g = torch.Generator().manual_seed(land)
        tokens = torch.randn(n, 8, generator=g)
        groups = _groups([12, 8, 6, 4, 3, 2, 1], land)
        weights = torch.randn(n, generator=g)
        pair = 0.3 * torch.randn(n, n, generator=g)

        def fitness(idx, weights=weights, pair=pair):  # additive + pairwise interactions
            return weights[idx].sum(1) + pair[idx[:, :, None], idx[:, None, :]].sum((1, 2)) / k

        hsets = heuristic_sets(k, tokens=tokens, grid=(6, 6), text_attn=torch.rand(n, generator=g),
                               cls_attn=torch.rand(n, generator=g), seed=land)  # fmt: skip
        params = BUDGET.model_copy(update={"generations": 2})  # short: the guarantee is structural
        r = search_sample(tokens, groups, fitness, k, params, land, heuristic_sets=hsets)
        assert set(r.heuristic_losses) == set(hsets)
        for name, idx in hsets.items():
            assert r.heuristic_losses[name] == on_grid(float(fitness(idx[None])[0]))
        assert r.loss <= min(r.heuristic_losses.values()) + 1e-6


def test_heuristics_are_scored_in_the_first_call_within_the_population():
    groups = _groups([6] * 6, 0)
    tokens = _tokens(36)
    hsets = heuristic_sets(6, tokens=tokens, grid=(6, 6), text_attn=torch.rand(36),
                           cls_attn=torch.rand(36))  # fmt: skip
    for params in (PAPER, PAPER.model_copy(update={"seed_with_heuristics": False})):
        fitness = Recorder(_hash_loss(0))
        r = search_sample(tokens, groups, fitness, None, params, 0, heuristic_sets=hsets)
        first = {tuple(row) for row in fitness.calls[0].tolist()}
        assert {tuple(s.tolist()) for s in hsets.values()} <= first
        assert all(idx.shape[0] <= params.population for idx in fitness.calls)
        assert set(r.heuristic_losses) == set(hsets)
        assert sorted(int(groups[t]) for t in r.kept) == list(range(6))  # still one per group


@pytest.mark.parametrize("mode", ["paper", "budget"])
@pytest.mark.parametrize("heuristics", [True, False])
def test_warm_start_sets_seed_the_population_and_are_no_heuristic(mode, heuristics):
    """A warm-start set (a compressor's pick) joins the first generation whether or not the
    heuristics seed it: with no generation to evolve, a warm start at the optimum makes the
    label; it is scored in the first call and not reported as a heuristic."""
    from evocomp.search.ga import search

    groups = _groups([12, 8, 6, 4, 3, 2, 1], 0)
    k = 12 if mode == "budget" else None
    planted = _planted(groups, mode, k, 3)
    params = SearchParams(mode=mode, generations=0, seed_with_heuristics=heuristics)
    space = SearchSpace.build(groups, k, params)
    other = {"random": torch.tensor(sorted(_planted(groups, mode, k, 4)))}
    warm = {"compressor": torch.tensor(sorted(planted))}
    fitness = Recorder(_miss_loss(planted))
    r = search(space, fitness, params, 0, other, warm_sets=warm)
    assert r.kept == sorted(planted) and r.loss == 0.0
    assert sorted(planted) in fitness.calls[0].tolist() and len(fitness.calls) == 1
    assert set(r.heuristic_losses) == {"random"}
    cold = search(space, _miss_loss(planted), params, 0, other)
    assert cold.loss > 0.0  # 48 random candidates of this space miss the optimum
    with pytest.raises(ValueError, match="warm-start set 'compressor' must hold"):
        search(space, fitness, params, 0, other, warm_sets={"compressor": torch.tensor([0, 1])})


# ---- the result ---------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "k"), [(PAPER, None), (BUDGET, 12)])
def test_result_fields_are_consistent(params, k):
    groups = _groups([12, 8, 6, 4, 3, 2, 1], 0)
    r = search_sample(_tokens(36), groups, _hash_loss(2), k, params, seed=0)
    assert isinstance(r, SearchResult)
    assert r.kept == sorted(set(r.kept)) and len(r.kept) == r.k == (k or 7)
    assert (r.n_tokens, r.n_groups) == (36, 7)
    assert 1 <= len(r.elite) <= params.parents
    assert [loss for _, loss in r.elite] == sorted(loss for _, loss in r.elite)
    assert r.elite[0] == (r.kept, r.loss)
    assert len({tuple(kept) for kept, _ in r.elite}) == len(r.elite)
    assert r.margin == pytest.approx(r.elite[1][1] - r.loss) and r.margin >= 0
    assert len(r.soft) == 36 and all(0.0 <= s <= 1.0 + 1e-9 for s in r.soft)
    assert sum(r.soft) == pytest.approx(r.k)
    assert 0 <= r.converged_gen <= params.generations
    assert r.loss == min(rec["min"] for rec in r.logbook)
    assert r.agreement is None
    assert pickle.loads(pickle.dumps(r)) == r


def test_individuals_pickle():
    ind = creator.EvoIndividual([3, 1, 2])
    ind.fitness.values = (0.5, 7.0)  # (loss on the grid, tie-break)
    back = pickle.loads(pickle.dumps(ind))
    assert back == [3, 1, 2] and back.fitness.values == (0.5, 7.0)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "sample-1") == 3732016363652817721  # pinned: labels depend on it
    assert sample_seed(0, "sample-1") != sample_seed(1, "sample-1") != sample_seed(0, "sample-2")


# ---- quotas and repair ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "k", "expected"),
    [([12, 8, 6, 4, 3, 2, 1], 7, [1] * 7), ([12, 8, 6, 4, 3, 2, 1], 36, [12, 8, 6, 4, 3, 2, 1]),
     ([6, 6, 6, 6, 6, 6], 12, [2] * 6), ([30, 1, 1], 6, [4, 1, 1]), ([5], 3, [3])],
)  # fmt: skip
def test_group_quotas(sizes, k, expected):
    assert group_quotas(sizes, k) == expected


@pytest.mark.parametrize("k", [5, 10, 20, 33])
def test_group_quotas_properties(k):
    sizes = [12, 8, 6, 4, 3]
    q = group_quotas(sizes, k)
    assert sum(q) == k and all(1 <= a <= s for a, s in zip(q, sizes, strict=True))
    with pytest.raises(ValueError):
        group_quotas(sizes, 4)  # fewer than G


@pytest.mark.parametrize("k", [2, 7, 12, 36])
def test_repair_restores_exact_size_and_quotas(k):
    groups = _groups([12, 8, 6, 4, 3, 2, 1], 0)
    space = SearchSpace.build(groups, k, BUDGET)
    rng = random.Random(0)
    for _ in range(50):
        broken = rng.sample(range(36), rng.randint(0, 36))
        fixed = repair(broken, space, rng)
        assert len(fixed) == len(set(fixed)) == k
        counts = [sum(int(groups[t]) == g for t in fixed) for g in range(7)]
        assert all(lo <= c <= hi for c, lo, hi in zip(counts, space.floor, space.cap, strict=True))


# ---- edge cases and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "groups", "mode", "k", "size"),
    [
        (8, [0] * 8, "paper", None, 1),  # single group
        (8, [0] * 8, "budget", 3, 3),
        (6, list(range(6)), "paper", None, 6),  # every token its own group
        (6, list(range(6)), "budget", 2, 2),  # k < G
        (12, [0, 1, 2] * 4, "budget", 1, 1),  # keep one
        (12, [0, 1, 2] * 4, "budget", 12, 12),  # keep all
        (1, [0], "paper", None, 1),  # N = 1
        (1, [0], "budget", 1, 1),
        (30, [5, 9] * 15, "budget", None, 10),  # k from keep_ratio, non-dense group ids
    ],
)
def test_edge_cases(n, groups, mode, k, size):
    fitness = Recorder(_hash_loss(0))
    r = search_sample(_tokens(n), torch.tensor(groups), fitness, k, SearchParams(mode=mode), 0)
    assert len(r.kept) == r.k == size and r.kept == sorted(set(r.kept))
    assert all(0 <= t < n for t in r.kept)
    assert all(idx.shape[1] == size for idx in fitness.calls)


def _search(**over):
    args = {"tokens": _tokens(12), "groups": torch.tensor([0, 1, 2] * 4), "fitness_fn": _hash_loss(0),
            "k": 4, "params": BUDGET, "seed": 0}  # fmt: skip
    args.update(over)
    return search_sample(**args)


def test_bad_inputs_raise_clear_errors():
    nan = _tokens(12)
    nan[3, 1] = float("nan")
    inf = _tokens(12)
    inf[0, 0] = float("inf")
    cases = [
        ({"tokens": nan}, "NaN/Inf"),
        ({"tokens": inf}, "NaN/Inf"),
        ({"tokens": torch.zeros(0, 8), "groups": torch.zeros(0, dtype=torch.long)}, "N=0"),
        ({"groups": torch.tensor([0, 1, 2])}, "one id per token"),
        ({"k": 0}, "k must be in 1..N=12"),
        ({"k": 13}, "k must be in 1..N=12"),
        ({"params": SearchParams.model_construct(**{**BUDGET.model_dump(), "mode": "greedy"})}, "unknown search mode"),
        ({"fitness_fn": lambda idx: torch.zeros(idx.shape[0], 1)}, r"shape \(\d+, 1\) for \d+ candidates"),
        ({"fitness_fn": lambda idx: torch.zeros(3)}, "expected"),
        ({"fitness_fn": lambda idx: torch.full((idx.shape[0],), float("nan"))}, "NaN/Inf for \\d+ of \\d+"),
        ({"heuristic_sets": {"fastv": torch.tensor([0, 1, 2])}}, "'fastv' must hold 4 distinct"),
        ({"heuristic_sets": {"dart": torch.tensor([0, 0, 1, 2])}}, "'dart' must hold 4 distinct"),
        ({"heuristic_sets": {"pooling": torch.tensor([0, 1, 2, 12])}}, "'pooling' must hold"),
    ]  # fmt: skip
    for over, match in cases:
        with pytest.raises(ValueError, match=match):
            _search(**over)


def test_a_new_search_algorithm_version_keys_a_new_label_run(monkeypatch):
    """Stored labels of an older search are not reused as if the search were unchanged."""
    from evocomp.search import ga as search
    from evocomp.store import params_hash

    before = params_hash(search.run_spec(PAPER))
    version = search.ALGORITHM_VERSION
    spec = PAPER.model_dump(mode="json", exclude={"objective", "warm_start"})  # defaults: left out
    assert search.run_spec(PAPER) == spec | {"algorithm": version}
    monkeypatch.setattr(search, "ALGORITHM_VERSION", version + 1)
    assert params_hash(search.run_spec(PAPER)) != before


def test_ties_go_by_a_stable_hash_not_to_the_first_candidate():
    """On a plateau (every candidate ties on the grid) the label is neither the heuristics'
    first seed nor the lowest indices, and the same on every run."""
    tokens, groups = _tokens(36), _groups([12, 8, 6, 4, 3, 2, 1], 0)
    hsets = heuristic_sets(12, tokens=tokens, grid=(6, 6), text_attn=torch.rand(36),
                           cls_attn=torch.rand(36))  # fmt: skip
    plateau = lambda idx: torch.full((idx.shape[0],), 0.25) + 1e-9 * torch.rand(idx.shape[0])  # noqa: E731
    runs = [
        search_sample(tokens, groups, plateau, 12, BUDGET, 3, heuristic_sets=hsets)
        for _ in range(2)
    ]
    assert runs[0].kept == runs[1].kept and runs[0].loss == 0.25  # noise below the grid: no say
    seeds = {tuple(v.tolist()) for v in hsets.values()}
    assert tuple(runs[0].kept) not in seeds and runs[0].kept != list(range(12))


def test_elimination_order_drops_the_least_costly_token_first():
    from evocomp.search.worth import elimination_order, rank_target

    worth = torch.zeros(10)
    worth[3], worth[7], worth[1] = 5.0, 2.0, 0.5

    def loss(rows: torch.Tensor) -> torch.Tensor:  # the worth of the tokens a row lacks
        return torch.stack([worth.sum() - worth[r].sum() for r in rows])

    order, forwards = elimination_order([9, 7, 5, 3, 1], loss)
    assert order == [5, 9, 1, 7, 3] and forwards == 4  # ties (5, 9: worth 0): lower index first
    assert rank_target(order, 10) == pytest.approx(
        [0.0, 0.6, 0.0, 1.0, 0.0, 0.2, 0.0, 0.8, 0.0, 0.4]
    )
    assert elimination_order([4], loss) == ([4], 0)
