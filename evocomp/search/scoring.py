"""Scoring candidates: a whole generation in one batched forward, each candidate once.

A candidate's identity is its sorted index tuple (:data:`Key`); the cache maps it to its
loss, shared across generations and across a sample's independent runs. Every decision of
the search (selection, the hall of fame, the elite, the best run) ranks candidates by
:meth:`Scorer.rank`: the loss on the grid of :func:`evocomp.tolerance.loss_on_grid`, then a
hash of the candidate salted by the sample's seed. Float noise below the grid (another
CPU, thread count or batch) therefore does not change a label, and ties fall neither to
the heuristics' seeds (first in the population) nor to low token indices, but the same
way on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from evocomp.tolerance import loss_on_grid

FitnessFn = Callable[[torch.Tensor], torch.Tensor]
Key = tuple[int, ...]  # sorted kept-token indices: the identity of a candidate


class Scorer:
    """Scores candidates in one fitness_fn call each batch; remembers every score."""

    def __init__(self, fitness_fn: FitnessFn, k: int, salt: int = 0):
        self.fitness_fn, self.k, self.salt = fitness_fn, k, salt
        self.cache: dict[Key, float] = {}
        self.n_forwards = self.n_evals = 0

    def score(self, keys: Sequence[Key]) -> int:
        """Score the unseen ones among ``keys`` in one call; return how many were scored."""
        new = list(dict.fromkeys(key for key in keys if key not in self.cache))
        if not new:
            return 0
        idx = torch.tensor(new, dtype=torch.long).reshape(len(new), self.k)  # (P, k)
        out = torch.as_tensor(self.fitness_fn(idx))
        if tuple(out.shape) != (len(new),):
            raise ValueError(
                f"fitness_fn returned shape {tuple(out.shape)} for {len(new)} candidates "
                f"(input shape {tuple(idx.shape)}); expected ({len(new)},), one loss per row"
            )
        losses = out.detach().float().cpu()
        if not torch.isfinite(losses).all():
            bad = int((~torch.isfinite(losses)).sum())
            raise ValueError(
                f"fitness_fn returned NaN/Inf for {bad} of {len(new)} candidates "
                f"(input shape {tuple(idx.shape)})"
            )
        self.cache.update(zip(new, map(loss_on_grid, losses.tolist()), strict=True))
        self.n_forwards += 1
        self.n_evals += len(new)
        return len(new)

    def rank(self, key: Key) -> tuple[float, float]:
        """``(loss on the grid, tie-break)`` of a scored candidate: lower is better."""
        digest = hashlib.blake2b(f"{self.salt}:{key}".encode(), digest_size=8).digest()
        return self.cache[key], float(int.from_bytes(digest, "big") >> 12)  # exact in a float

    def evaluate(self, population: list, extra: Sequence[Key] = ()) -> int:
        """DEAP's map(evaluate) fused into one forward: set every individual's fitness to
        its :meth:`rank` (DEAP compares fitnesses lexicographically)."""
        n = self.score([key_of(ind) for ind in population] + list(extra))
        for ind in population:
            ind.fitness.values = self.rank(key_of(ind))
        return n


def key_of(ind: Sequence[int]) -> Key:
    return tuple(sorted(ind))


def distinct(population: list) -> list:
    """First occurrence of every distinct candidate, in population order."""
    seen: set[Key] = set()
    return [ind for ind in population if not (key_of(ind) in seen or seen.add(key_of(ind)))]
