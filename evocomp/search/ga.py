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

Three choices beyond a plain truncation GA, each because a cached, clone-heavy
population otherwise stalls: parents are the best *distinct* candidates; on
equal loss an offspring ranks before the parent it ties (drift across
plateaus); a child that repeats a candidate of this run is mutated again (up
to ``NOVELTY_TRIES`` times) so that its slot explores. In paper mode the
heuristic sets (size G) are scored for comparison and seed the population
projected to one token per group; only one-per-group candidates can be the label.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from deap import base, creator, tools

from evocomp.config import SearchParams
from evocomp.data.samples import sample_seed
from evocomp.search.operators import cxHalf, cxSet, mutSwap, mutWithinGroup, repair
from evocomp.search.scoring import FitnessFn, Key, Scorer, distinct, key_of
from evocomp.search.space import SearchSpace

# creator is process-global: create the types once, at import, so individuals pickle
# (threads, Dask workers) and a re-import does not warn about overwriting them.
if not hasattr(creator, "EvoFitness"):
    # (loss on the grid, tie-break hash): both minimised, compared lexicographically
    creator.create("EvoFitness", base.Fitness, weights=(-1.0, -1.0))
if not hasattr(creator, "EvoIndividual"):
    # list-based: DEAP's crossovers slice individuals, which corrupts numpy arrays.
    creator.create("EvoIndividual", list, fitness=creator.EvoFitness)

# Part of every label run's key (with the model id and the search params): bump it when a
# change to the search makes it label differently under the same params, so the label flow
# re-searches instead of keeping labels of the old algorithm. 2: exact on spaces that fit in
# one population; 3: also on spaces whose unscored rest fits in one generation's offspring;
# 4: candidates ranked by (loss on a 1e-5 grid, a salted hash), heuristic scores on a 1e-6
# grid (evocomp/tolerance.py): float noise no longer decides ties.
ALGORITHM_VERSION = 4

NOVELTY_TRIES = 4  # extra mutations of a child that repeats a known candidate
EXHAUSTIVE_UP_TO = 10_000  # spaces up to this size are tracked for exhaustion (cheap sets)
SAMPLE_DISTINCT_UP_TO = 1_000  # the initial population of spaces up to this size: from a list


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
    return params.model_dump(mode="json") | {"algorithm": ALGORITHM_VERSION}


# ---- one run ----------------------------------------------------------------------------


@dataclass
class _Run:
    best: Key
    rank: tuple[float, float]  # (loss on the grid, tie-break): Scorer.rank of ``best``
    logbook: list[dict]
    population: list
    converged_gen: int


def _toolbox(space: SearchSpace, params: SearchParams, rng: random.Random) -> base.Toolbox:
    tb = base.Toolbox()
    # A list copy, not DEAP's deepcopy (a third of the search time on small models):
    # children are always re-scored (through the cache), so the fitness need not follow.
    tb.register("clone", creator.EvoIndividual)
    tb.register("select", tools.selBest)  # truncation: the `parents` lowest losses
    if params.mode == "paper":
        pick = lambda: creator.EvoIndividual(rng.choice(m) for m in space.members)  # noqa: E731
        tb.register("individual", pick)
        tb.register("mate", cxHalf)
        tb.register("mutate", mutWithinGroup, space=space, indpb=params.mut_prob, rng=rng)
    else:
        tb.register("individual", lambda: creator.EvoIndividual(repair((), space, rng)))
        tb.register("mate", cxSet, space=space, rng=rng)
        tb.register("mutate", mutSwap, space=space, indpb=params.mut_prob, rng=rng)
    return tb


def _seed_individuals(sets: dict[str, Key], space: SearchSpace, params: SearchParams, rng) -> list:
    """Heuristic sets as individuals: paper mode keeps one member per group (the lowest
    one in the set, a random member where the set misses the group); budget mode
    takes each set as given and repaired to quota."""
    out = []
    for s in sets.values():
        if params.mode == "paper":
            inside = set(s)
            slots = [next((t for t in m if t in inside), None) for m in space.members]
            out.append(
                [
                    t if t is not None else rng.choice(m)
                    for t, m in zip(slots, space.members, strict=True)
                ]
            )
        else:
            out += [list(s), repair(s, space, rng)]
    return out


def _breed(tb, parents: list, n: int, cx_prob: float, rng: random.Random, seen) -> list:
    """n offspring of random parent pairs: mate with prob. cx_prob, then mutate.

    A child that repeats a candidate of this run (or a sibling) is mutated again, up
    to ``NOVELTY_TRIES`` times: a repeat costs no forward but wastes the slot.
    """
    offspring, keys = [], set()
    while len(offspring) < n:
        p1, p2 = rng.sample(parents, 2) if len(parents) > 1 else parents * 2
        c1, c2 = tb.clone(p1), tb.clone(p2)
        if rng.random() < cx_prob:
            tb.mate(c1, c2)
        for child in (c1, c2)[: n - len(offspring)]:
            del child.fitness.values  # invalid: to be (re-)evaluated
            for _ in range(NOVELTY_TRIES + 1):
                tb.mutate(child)
                if key_of(child) not in seen and key_of(child) not in keys:
                    break
            keys.add(key_of(child))
            offspring.append(child)
    return offspring


def _run(
    space, scorer: Scorer, params: SearchParams, seed: int, sets: dict[str, Key], progress
) -> _Run:
    rng = random.Random(seed)
    tb = _toolbox(space, params, rng)
    n_parents = min(params.parents, params.population - 1)  # keep >= 1 offspring slot
    n_offspring = params.population - n_parents

    seeds = _seed_individuals(sets, space, params, rng) if params.seed_with_heuristics else []
    population, seen = [], set()
    for s in seeds:
        if key_of(s) not in seen:
            seen.add(key_of(s))
            population.append(creator.EvoIndividual(s))
    # Heuristic sets outside the population are scored in the same call: keep that call
    # within `population` rows by shrinking the random fill.
    extra = [key for key in dict.fromkeys(sets.values()) if key not in seen]
    room = max(2, params.population - len(extra))
    size = space.size
    everything = functools.cache(space.enumerate)  # listed once, and only for small spaces
    if size <= room:
        fill = iter(everything())  # the whole space fits: score all of it at once
    elif size <= SAMPLE_DISTINCT_UP_TO:
        # distinct uniform draws without rejection (rejection needs many draws when the
        # population is most of the space)
        fill = iter(rng.sample(everything(), min(size, room + len(population))))
    else:
        fill = (tb.individual() for _ in range(20 * room))  # distinct draws, bounded tries
    for ind in fill:
        if len(population) >= room:
            break
        if key_of(ind) not in seen:
            seen.add(key_of(ind))
            population.append(creator.EvoIndividual(ind))
    # The run stops once it has scored every candidate of the space (small spaces only:
    # the product of the group sizes in paper mode). Budget-mode seeds may sit outside the
    # quotas and heuristic sets outside one-per-group: only candidates of the space count.
    covered = {key for key in extra if space.contains(key)}

    stats = tools.Statistics(key=lambda ind: ind.fitness.values[0])
    for name, fn in (("min", np.min), ("avg", np.mean), ("max", np.max), ("std", np.std)):
        stats.register(name, fn)
    logbook = tools.Logbook()
    logbook.header = ["gen", "nevals", "min", "avg", "max", "std"]

    # This run's candidates (not the shared cache: runs must not steer each other).
    visited: set[Key] = set()
    best, best_rank, converged = None, (float("inf"), 0.0), 0
    for gen in range(params.generations + 1):
        if gen == 0:
            nevals = scorer.evaluate(population, extra)
            fresh = population
        else:
            # Distinct parents: clones carry no new information and collapse diversity.
            parents = tb.select(distinct(population), n_parents)
            if size - len(covered) <= n_offspring:
                # Endgame of a small space: what is left of it fits in the offspring
                # slots, so score all of it (the label is then the exact optimum)
                # instead of breeding children that mostly repeat scored candidates.
                rest = (c for c in everything() if key_of(c) not in covered)
                fresh = [creator.EvoIndividual(c) for c in rest]
            else:
                fresh = _breed(tb, parents, n_offspring, params.cx_prob, rng, visited)
            # Re-evaluate only invalid individuals (here: all offspring); the cache
            # makes unchanged ones free.
            nevals = scorer.evaluate([ind for ind in fresh if not ind.fitness.valid])
            population = fresh + parents
        keys = [key_of(ind) for ind in fresh]
        visited.update(keys)
        if size <= EXHAUSTIVE_UP_TO:
            covered.update(key for key in keys if space.contains(key))
        for ind in fresh:  # hall of fame: the best rank ever seen
            if ind.fitness.values < best_rank:
                if ind.fitness.values[0] < best_rank[0]:  # the loss improved, not a tie-break
                    converged = gen
                best, best_rank = key_of(ind), ind.fitness.values
        record = {k: float(v) for k, v in stats.compile(population).items()}
        logbook.record(gen=gen, nevals=nevals, **record)
        if progress is not None:
            progress(gen, best_rank[0])
        if params.early_stop_patience and gen - converged >= params.early_stop_patience:
            break
        if len(covered) >= size:
            break  # every candidate of the space has been scored: the label is the optimum
    return _Run(best, best_rank, [dict(r) for r in logbook], population, converged)


# ---- the public entry point -------------------------------------------------------------


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

    The result's ``trace`` is the anytime curve of the search: after every generation, the
    candidates scored and fitness_fn calls spent so far, and the best loss seen so far: how
    close a smaller budget would have come (``bench/anytime.py``). Recording it changes no
    random choice, so no label.
    """
    n = len(space.group_of)
    sets: dict[str, Key] = {}
    for name, s in (heuristic_sets or {}).items():
        key = tuple(int(t) for t in torch.as_tensor(s).flatten().tolist())
        if len(set(key)) != space.k or len(key) != space.k or not all(0 <= t < n for t in key):
            raise ValueError(
                f"heuristic set {name!r} must hold {space.k} distinct indices in 0..{n - 1} "
                f"(the label size in {params.mode} mode), got {len(key)} ({len(set(key))} distinct)"
            )
        sets[name] = tuple(sorted(key))

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
        _run(space, scorer, params, s, sets, functools.partial(traced, i))
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
