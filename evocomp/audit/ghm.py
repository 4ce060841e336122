"""GHM-C settings from the trained compressor's gradient norms (the imbalance page's advice).

GHM-C (Li et al., AAAI 2019) weighs each token by the inverse density of its gradient norm
``g = |sigmoid(logit) - y|``; how many bins and how much momentum suit a label set depends
on how concentrated that histogram is and how many tokens a batch gives per bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from evocomp.config import TrainParams

FINE_BINS = 60  # divisible by every candidate bin count, so coarse regions are sums of fine ones
BIN_CHOICES = (10, 20, 30)  # mmdetection's default, and the GHM paper's best (30)
CONCENTRATED = 0.5  # one region holding more than this share of tokens is "concentrated"
MIN_PER_REGION = 100  # tokens per region per batch below which counts are noisy
PAPER_MOMENTUM = 0.75  # Li et al. (AAAI 2019), GHM-C


@dataclass(frozen=True)
class GradStats:
    """Gradient norms ``g = |sigmoid(logit) - y|`` of valid tokens and the kept/dropped overlap."""

    g: np.ndarray  # (M,) over every real visual token of the items
    overlap: float | None  # mean cos(mean kept hidden, mean dropped hidden) over items


def gradient_norms(model, items, batch_size: int = 64, device: str = "cpu") -> GradStats:
    """GHM-C's gradient norm of every token and the feature overlap, under ``model`` (no grad).

    Args:
        model: a ``TokenCompressor`` in eval mode, on ``device``.
        items: ``compressor.Item`` list (visual (N, D), grid_pos (N, 2), text (T, D), target (N,)).
    """
    import torch

    from evocomp.compress.fit import collate
    from evocomp.losses import cosine_separation

    gs, cos, weights = [], 0.0, 0
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            b = collate(items[s : s + batch_size], device=device)
            out = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
            g = (out.logits.sigmoid() - b.hard).abs()  # (B, N)
            gs.append(g[b.visual_mask].float().cpu().numpy())
            n = b.visual.shape[0]
            cos += float(cosine_separation(out.hidden, b.hard, b.visual_mask)) * n
            weights += n
    g = np.concatenate(gs) if gs else np.zeros(0)
    return GradStats(g, cos / weights if weights else None)


def region_shares(g: np.ndarray, bins: int) -> np.ndarray:
    """(bins,) share of the tokens in each equal region of [0, 1], as GHM-C cuts it."""
    counts = np.histogram(np.clip(g, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0]
    return counts / max(1, counts.sum())


@dataclass(frozen=True)
class Recommendation:
    ghm_bins: int
    ghm_momentum: float
    cos_alpha: float
    reasons: tuple[str, ...]

    def updates(self) -> dict[str, Any]:
        return {
            "ghm_bins": self.ghm_bins,
            "ghm_momentum": self.ghm_momentum,
            "cos_alpha": self.cos_alpha,
        }


def recommend_ghm(
    g: np.ndarray | None,
    overlap: float | None,
    current: TrainParams,
    mean_tokens: float,
    n_train: int,
) -> Recommendation:
    """GHM-C bins and momentum and the cosine weight, each with the reason.

    * bins: the fewest of 10/20/30 at which no region of the g histogram holds more than half
      the tokens (a region's tokens share one weight, so a concentrated easy mass needs a finer
      cut to be told apart); 30 when even that is concentrated.
    * momentum: 0.75 (the GHM paper's) when a batch gives fewer than 100 tokens per region,
      since per-batch region counts are then noisy; else 0.
    * cos_alpha: from the overlap of kept vs dropped hidden states (cosine of their means):
      >= 0.9 they are barely apart, 0.3; >= 0.6, 0.1; else 0.05 (already separated).
    Without a compressor (``g`` None) bins and alpha stay as they are; without training labels
    (``n_train`` or ``mean_tokens`` 0) the momentum does too.
    """
    reasons = []
    bins = current.ghm_bins
    if g is None or len(g) == 0:
        reasons.append(f"bins: no compressor gradient norms to judge by; keeping {bins}")
    else:
        fine = region_shares(g, FINE_BINS)
        tops = {b: fine.reshape(b, FINE_BINS // b).sum(1).max() for b in BIN_CHOICES}
        bins = next((b for b in BIN_CHOICES if tops[b] <= CONCENTRATED), BIN_CHOICES[-1])
        lo = (BIN_CHOICES[0], tops[BIN_CHOICES[0]])
        if bins == BIN_CHOICES[0]:
            reasons.append(
                f"bins: at {lo[0]} bins the fullest region holds {lo[1]:.0%} of the "
                f"tokens: the histogram is spread, {bins} bins suffice"
            )
        else:
            reasons.append(
                f"bins: at {lo[0]} bins one region holds {lo[1]:.0%} of the tokens "
                f"(concentrated); at {bins} bins the fullest holds {tops[bins]:.0%}, so "
                "GHM-C can tell the easy mass apart"
            )
    per_batch = min(current.batch_size, max(n_train, 1)) * mean_tokens
    per_region = per_batch / bins
    if n_train == 0 or mean_tokens == 0:
        momentum = current.ghm_momentum
        reasons.append(f"momentum: no training labels to size a batch by; keeping {momentum}")
    elif per_region < MIN_PER_REGION:
        momentum = PAPER_MOMENTUM
        reasons.append(
            f"momentum: a batch gives ~{per_region:.0f} tokens per region (< "
            f"{MIN_PER_REGION}): noisy counts, smoothed across batches with "
            f"{momentum} as in the GHM paper"
        )
    else:
        momentum = 0.0
        reasons.append(
            f"momentum: a batch gives ~{per_region:.0f} tokens per region: counts "
            "are stable, no momentum needed"
        )
    alpha = current.cos_alpha
    if overlap is None or not math.isfinite(overlap):
        reasons.append(f"cos_alpha: no kept/dropped feature overlap measured; keeping {alpha}")
    else:
        alpha = 0.3 if overlap >= 0.9 else 0.1 if overlap >= 0.6 else 0.05
        state = (
            "barely apart"
            if overlap >= 0.9
            else "partly apart"
            if overlap >= 0.6
            else "already well apart"
        )
        reasons.append(
            f"cos_alpha: kept and dropped hidden states have cosine {overlap:.2f} "
            f"({state}): alpha {alpha}"
        )
    return Recommendation(bins, momentum, alpha, tuple(reasons))
