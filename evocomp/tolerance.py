"""Decisions that ignore float noise: compare on a stated grid, break ties by a stable key.

The same sample gives slightly different floats on another CPU, with another thread count
or in another batch (losses differ around 1e-8, features around the 7th-8th significant
digit). A label set is versioned and audited, so its decisions must not hang on that
noise. Where values tie up to noise -- the search's candidates on a loss plateau (a
saturated answer, tokens that barely matter), a heuristic's equal scores -- raw floats
would break the tie by noise; on a grid they tie exactly, and the tie goes to a key floats
do not touch. So the search ranks candidates by their answer loss rounded to 1e-5 nats,
then by a hash of the candidate salted by the sample's seed (evocomp/search/scoring.py:
neither the heuristics' seeds, first in the population, nor low token indices win ties);
the heuristics compare their scores on a 1e-6 grid, ties to the lower token index.

Why 1e-5: three orders of magnitude above the loss noise (so a value lands within noise of
a boundary ~1e-3 of the time), and fine enough to keep the real differences between
candidates that the compressor learns from: a 1e-4 grid with ties to the first candidate
pulled labels towards the heuristics' seeds and cost ~3 points at keep 1/9 (BENCHMARKS.md).

What this cannot promise: a value within the noise of a grid boundary can round either
way (about noise / grid of the time, ~1e-3 per value at 1e-8 noise), so two candidates
that close to each other *and* to a boundary can still swap; ``bench/determinism.py``
measures how often labels move. A token's nearest vocabulary word is taken on raw
similarities: distinct words do not tie systematically, so a grid would not make it
steadier. Between a CPU and a GPU, or in bfloat16, the differences exceed these grids and
labels may differ.
"""

from __future__ import annotations

import torch

LOSS_DECIMALS = 5  # answer losses (nats) are decided, stored and reported on a 1e-5 grid
SCORE_SCALE = 1e6  # attention weights, cosine similarities, token norms: a 1e-6 grid


def loss_on_grid(loss: float) -> float:
    """An answer loss rounded to ``LOSS_DECIMALS`` decimals (what the search compares)."""
    return round(float(loss), LOSS_DECIMALS)


def scores_on_grid(scores: torch.Tensor) -> torch.Tensor:
    """Scores as whole numbers of 1e-6 (float64): equal when they differ only by noise.

    Use them for ordering only (argsort, argmax, top-k); ties keep the lower index when
    the caller's sort is stable or its argmax takes the first maximum.
    """
    return torch.round(scores.detach().double() * SCORE_SCALE)
