"""One run of the DEAP genetic search over one sample's space (:mod:`evocomp.search.ga`
runs ``params.seeds`` of them and makes the label).

The population starts from the heuristics' sets (``seed_with_heuristics``) and distinct
random candidates; each generation breeds offspring with the mode's crossover and mutation
(:mod:`evocomp.search.operators`), scores the new ones in one batched call
(:class:`evocomp.search.scoring.Scorer`) and keeps the best. A run stops after
``params.generations``, early (``early_stop_patience`` generations without a better best),
or once every candidate of a small space has been scored (the label is then the optimum).

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
import random
from dataclasses import dataclass

import numpy as np
from deap import base, creator, tools

from evocomp.config import SearchParams
from evocomp.search.operators import cxHalf, cxSet, mutSwap, mutWithinGroup, repair
from evocomp.search.scoring import Key, Scorer, distinct, key_of
from evocomp.search.space import SearchSpace

# creator is process-global: create the types once, at import, so individuals pickle
# (threads, Dask workers) and a re-import does not warn about overwriting them.
if not hasattr(creator, "EvoFitness"):
    # (loss on the grid, tie-break hash): both minimised, compared lexicographically
    creator.create("EvoFitness", base.Fitness, weights=(-1.0, -1.0))
if not hasattr(creator, "EvoIndividual"):
    # list-based: DEAP's crossovers slice individuals, which corrupts numpy arrays.
    creator.create("EvoIndividual", list, fitness=creator.EvoFitness)

NOVELTY_TRIES = 4  # extra mutations of a child that repeats a known candidate
EXHAUSTIVE_UP_TO = 10_000  # spaces up to this size are tracked for exhaustion (cheap sets)
SAMPLE_DISTINCT_UP_TO = 1_000  # the initial population of spaces up to this size: from a list


@dataclass
class Run:
    """What one run leaves: its best candidate and rank, its logbook and last population."""

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


def run_once(
    space,
    scorer: Scorer,
    params: SearchParams,
    seed: int,
    sets: dict[str, Key],
    progress,
    warm: dict[str, Key] | None = None,
) -> Run:
    """One GA run from ``seed``: ``sets`` (the heuristics' candidates) seed the population when
    ``params.seed_with_heuristics``, ``warm`` (a compressor's) always, after them;
    ``progress(gen, best_loss)`` after every generation."""
    rng = random.Random(seed)
    tb = _toolbox(space, params, rng)
    n_parents = min(params.parents, params.population - 1)  # keep >= 1 offspring slot
    n_offspring = params.population - n_parents

    warm = warm or {}
    seeding = (sets if params.seed_with_heuristics else {}) | warm
    seeds = _seed_individuals(seeding, space, params, rng)
    population, seen = [], set()
    for s in seeds:
        if key_of(s) not in seen:
            seen.add(key_of(s))
            population.append(creator.EvoIndividual(s))
    # Heuristic sets outside the population are scored in the same call: keep that call
    # within `population` rows by shrinking the random fill.
    extra = [key for key in dict.fromkeys([*sets.values(), *warm.values()]) if key not in seen]
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
    return Run(best, best_rank, [dict(r) for r in logbook], population, converged)
