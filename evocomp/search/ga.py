"""The DEAP genetic search: one sample in, one label out (EvoComp paper, Sec. 3).

A candidate is a set of kept visual-token indices; its fitness is the MLLM's
answer loss given only those tokens (lower is better), computed by a
``fitness_fn(idx (P, k) LongTensor) -> (P,) losses`` that scores a whole
population in one batched forward. Two modes (``SearchParams.mode``):

* ``paper`` (as published): an individual keeps exactly one token per semantic
  group (a list of G token indices, slot g holding a member of group g);
  truncation selection of the ``parents`` lowest-loss, crossover ``cxHalf``
  (first half of the groups from one parent, the rest from the other), mutation
  ``mutWithinGroup`` (with probability ``mut_prob`` per group, move the group's
  kept token to another member of the group, drawn uniformly), offspring replace
  the worst. The label has G tokens; ``k`` is ignored.
* ``budget``: exactly k tokens, k allotted over groups by :func:`evocomp.search.space.group_quotas`;
  ``cxSet`` (the parents' intersection, filled from their union) and
  ``mutSwap`` (swap a kept token for a dropped one of its group, or of any group
  with room when k < G), both followed by :func:`repair`. With
  ``seed_with_heuristics`` the heuristics' sets join the initial population
  as given and repaired, so the label is never worse than the best of them.

Every generation's new candidates are scored in ONE ``fitness_fn`` call;
identical candidates are scored once (cache keyed by the sorted index tuple,
shared across generations and across the ``params.seeds`` independent runs).
The label is the lowest-loss candidate ever seen (hall of fame). All random
choices come from a local ``random.Random(seed)``: same seed, same label.

One run of the GA (population, selection, breeding, its stops) is
:mod:`evocomp.search.evolve`; this module runs ``params.seeds`` of them over one sample's
space and makes the label, with its statistics, of the best.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from evocomp.config import SearchParams
from evocomp.data.samples import sample_seed
from evocomp.search.evolve import run_once
from evocomp.search.scoring import FitnessFn, Key, Scorer, key_of
from evocomp.search.space import SearchSpace

# Part of every label run's key (with the model id and the search params): bump it when a
# change to the search makes it label differently under the same params, so the label flow
# re-searches instead of keeping labels of the old algorithm. 2: exact on spaces that fit in
# one population; 3: also on spaces whose unscored rest fits in one generation's offspring;
# 4: candidates ranked by (loss on a 1e-5 grid, a salted hash), heuristic scores on a 1e-6
# grid (evocomp/tolerance.py): float noise no longer decides ties.
ALGORITHM_VERSION = 4


@dataclass(frozen=True)
class SearchResult:
    """One sample's label and how the search got there."""

    kept: list[int]  # sorted token indices of the label
    loss: float  # its fitness
    k: int  # label size (G in paper mode)
    n_tokens: int
    n_groups: int
    logbook: list[dict]  # per generation: gen, nevals (rows scored), min, avg, max, std
    elite: list[tuple[list[int], float]]  # final population's best distinct sets, by loss
    soft: list[float]  # per token: fraction of the elite keeping it
    margin: float  # loss of the best other elite member minus the label's loss
    agreement: float | None  # mean Jaccard of the runs' labels when params.seeds > 1
    n_forwards: int  # fitness_fn calls
    n_evals: int  # candidates scored
    converged_gen: int  # generation where the best was last improved
    space_log10: float  # log10 of the number of candidates (SearchSpace.log10_size)
    # anytime trace, one point per generation of every run (runs in order): run, gen, the
    # n_evals and n_forwards spent so far, best = the lowest loss seen so far (the label's
    # loss at the last point)
    trace: list[dict]
    heuristic_losses: dict[str, float] = field(default_factory=dict)


def run_spec(params: SearchParams) -> dict:
    """What identifies a label run besides the model: the search params and algorithm version."""
    # the defaults of fields added later are left out, so the runs of stores made before
    # they existed keep their keys (and their labels are found, not searched again)
    default = {"warm_start"} | ({"objective"} if params.objective == "answer" else set())
    spec = params.model_dump(mode="json", exclude=default)
    if params.warm_start is not None:  # the compressor's content, wherever it lies
        from evocomp.compress.model import compressor_id

        spec["warm_start"] = compressor_id(params.warm_start)
    return spec | {"algorithm": ALGORITHM_VERSION}


def _keys(
    kind: str, given: dict[str, torch.Tensor] | None, space, n: int, mode: str
) -> dict[str, Key]:
    """Named candidate sets as sorted keys, each checked to hold ``space.k`` distinct tokens."""
    out: dict[str, Key] = {}
    for name, s in (given or {}).items():
        key = tuple(int(t) for t in torch.as_tensor(s).flatten().tolist())
        if len(set(key)) != space.k or len(key) != space.k or not all(0 <= t < n for t in key):
            raise ValueError(
                f"{kind} set {name!r} must hold {space.k} distinct indices in 0..{n - 1} "
                f"(the label size in {mode} mode), got {len(key)} ({len(set(key))} distinct)"
            )
        out[name] = tuple(sorted(key))
    return out


def _jaccard(a: Key, b: Key) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb)


def _check_tokens(tokens: torch.Tensor, groups) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, D), got shape {tuple(tokens.shape)}")
    n = tokens.shape[0]
    if n == 0:
        raise ValueError("the sample has no visual tokens (N=0): nothing to search")
    if not torch.isfinite(tokens).all():
        raise ValueError("tokens contain NaN/Inf: check the vision tower / projector output")
    groups = torch.as_tensor(groups)
    if groups.dim() != 1 or groups.numel() != n:
        raise ValueError(
            f"groups must have one id per token: got shape {tuple(groups.shape)}, N={n}"
        )


def search_sample(
    tokens: torch.Tensor,
    groups: torch.Tensor,
    fitness_fn: FitnessFn,
    k: int | None,
    params: SearchParams,
    seed: int,
    heuristic_sets: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> SearchResult:
    """Label one sample: the kept-token set of lowest answer loss the GA finds.

    Builds the sample's :class:`SearchSpace` and runs :func:`search` on it.

    Args:
        tokens: (N, D) the sample's visual tokens (only checked here; fitness_fn owns the model).
        groups: (N,) integer group id per token (any labels, e.g. nearest vocabulary ids).
        fitness_fn, params, seed, heuristic_sets, progress: as for :func:`search`.
        k: budget mode: tokens to keep (None: ``keep_count(keep_ratio, N)``); ignored in
            paper mode.
    """
    if params.mode not in ("paper", "budget"):
        raise ValueError(f"unknown search mode {params.mode!r} (known: paper, budget)")
    _check_tokens(tokens, groups)
    space = SearchSpace.build(groups, k, params)
    return search(space, fitness_fn, params, seed, heuristic_sets, progress)


def search(
    space: SearchSpace,
    fitness_fn: FitnessFn,
    params: SearchParams,
    seed: int,
    heuristic_sets: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
    warm_sets: dict[str, torch.Tensor] | None = None,
) -> SearchResult:
    """The GA over one sample's space: the lowest-loss candidate ever scored, and its history.

    Args:
        space: the sample's candidates (:meth:`SearchSpace.build`).
        fitness_fn: ``(P, k) LongTensor of sorted index rows -> (P,) losses``, one batched
            forward; called at most once per generation, with at most ``params.population``
            rows (more only if there are more heuristic sets than that).
        params: search settings.
        seed: the sample's seed (see :func:`evocomp.data.samples.sample_seed`).
        heuristic_sets: ``{name: (k,) indices}`` (G indices in paper mode), scored in the
            first call; they seed the population when ``params.seed_with_heuristics``.
        progress: called as ``progress(gen, best_loss)`` after every generation of every run.
        warm_sets: ``{name: indices}`` like ``heuristic_sets`` (a trained compressor's picks,
            ``label.warm_start``): they always seed the population, after the heuristics',
            and are not reported as heuristic losses.

    The result's ``trace`` is the anytime curve of the search: after every generation, the
    candidates scored and fitness_fn calls spent so far, and the best loss seen so far: how
    close a smaller budget would have come (``bench/anytime.py``). Recording it changes no
    random choice, so no label.
    """
    n = len(space.group_of)
    sets = _keys("heuristic", heuristic_sets, space, n, params.mode)
    warm = _keys("warm-start", warm_sets, space, n, params.mode)

    scorer = Scorer(fitness_fn, space.k, salt=seed)
    run_seeds = [seed] + [sample_seed(seed, f"run-{i}") for i in range(1, params.seeds)]
    trace: list[dict] = []

    def traced(run: int, gen: int, best: float) -> None:
        # called after a generation is scored, before any stop: the counts are final
        so_far = min(best, trace[-1]["best"]) if trace else best
        trace.append(
            {"run": run, "gen": gen, "n_evals": scorer.n_evals,
             "n_forwards": scorer.n_forwards, "best": so_far}
        )  # fmt: skip
        if progress is not None:
            progress(gen, best)

    runs = [
        run_once(space, scorer, params, s, sets, functools.partial(traced, i), warm)
        for i, s in enumerate(run_seeds)
    ]
    top = min(runs, key=lambda r: r.rank)

    elite: list[tuple[list[int], float]] = []
    for ind in sorted(top.population, key=lambda ind: ind.fitness.values):
        if len(elite) < min(params.parents, params.population - 1) and all(
            list(key_of(ind)) != e[0] for e in elite
        ):
            elite.append((list(key_of(ind)), ind.fitness.values[0]))
    soft = [0.0] * n
    for kept, _ in elite:
        for t in kept:
            soft[t] += 1 / len(elite)
    others = [loss for kept, loss in elite if tuple(kept) != top.best]
    agreement = None
    if len(runs) > 1:
        pairs = list(itertools.combinations([r.best for r in runs], 2))
        agreement = sum(_jaccard(a, b) for a, b in pairs) / len(pairs)
    return SearchResult(
        kept=list(top.best),
        loss=top.rank[0],
        k=space.k,
        n_tokens=n,
        n_groups=len(space.members),
        logbook=top.logbook,
        elite=elite,
        soft=soft,
        margin=(min(others) - top.rank[0]) if others else 0.0,
        agreement=agreement,
        n_forwards=scorer.n_forwards,
        n_evals=scorer.n_evals,
        converged_gen=top.converged_gen,
        space_log10=space.log10_size,
        trace=trace,
        heuristic_losses={name: scorer.cache[key] for name, key in sets.items()},
    )
