"""Scoring candidates: a whole generation in one batched forward, each candidate once.

A candidate's identity is its sorted index tuple (:data:`Key`); the cache maps it to its
loss, shared across generations and across a sample's independent runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

FitnessFn = Callable[[torch.Tensor], torch.Tensor]
Key = tuple[int, ...]  # sorted kept-token indices: the identity of a candidate


class Scorer:
    """Scores candidates in one fitness_fn call each batch; remembers every score."""

    def __init__(self, fitness_fn: FitnessFn, k: int):
        self.fitness_fn, self.k = fitness_fn, k
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
        self.cache.update(zip(new, losses.tolist(), strict=True))
        self.n_forwards += 1
        self.n_evals += len(new)
        return len(new)

    def evaluate(self, population: list, extra: Sequence[Key] = ()) -> int:
        """DEAP's map(evaluate) fused into one forward: set every individual's fitness."""
        n = self.score([key_of(ind) for ind in population] + list(extra))
        for ind in population:
            ind.fitness.values = (self.cache[key_of(ind)],)
        return n


def key_of(ind: Sequence[int]) -> Key:
    return tuple(sorted(ind))


def distinct(population: list) -> list:
    """First occurrence of every distinct candidate, in population order."""
    seen: set[Key] = set()
    return [ind for ind in population if not (key_of(ind) in seen or seen.add(key_of(ind)))]
