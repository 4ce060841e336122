"""Visual-token arithmetic every stage shares: keep budgets and the patch grid.

One home for each rule, so labeling, training, evaluation, the dashboard and the
benchmarks cannot disagree on how many tokens a ratio keeps or where a token sits.
"""

from __future__ import annotations

import math

import torch


def keep_count(ratio: float, n: int) -> int:
    """Tokens kept at keep ratio ``ratio`` of ``n``: ``max(1, round(ratio * n))``.

    Python's ``round`` (half to even): 36 tokens at 1/9 keep 4, at 1/4.5 keep 8.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio {ratio} is outside (0, 1]")
    return max(1, round(ratio * n))


def ratio_key(ratio: float) -> str:
    """How a keep ratio is written in metrics files: 3 decimals (``"0.333"``)."""
    return f"{ratio:.3f}"


def nearest_budget(label_ratios, ratio: float) -> float:
    """The label keep ratio nearest ``ratio`` by factor (2/9 is 1.5x from 1/3 and 2x from
    1/9), the smaller on ties: which of several compressors, one per label budget, serves
    ``ratio`` (in ``evocomp evaluate`` and in a deployed ``generate()``)."""
    return min(label_ratios, key=lambda lr: (abs(math.log(ratio / lr)), lr))


def grid_shape(n: int) -> tuple[int, int]:
    """The patch grid ``(rows, cols)`` of ``n`` tokens: square when n is a square, else one row."""
    side = int(round(n**0.5))
    return (side, side) if side * side == n else (1, n)


def grid_positions(n: int, grid: tuple[int, int]) -> torch.Tensor:
    """(row, col) of each of n tokens in a row-major grid: ``(n, 2)`` long."""
    idx = torch.arange(n)
    return torch.stack([idx // grid[1], idx % grid[1]], dim=1)


def check_sample_grid(sample_id: str, meta: dict, n_tokens: int | None) -> None:
    """ValueError naming both when a built-in benchmark's sample (its metadata records its
    ``grid`` of patches) does not match the checkpoint's ``n_tokens`` visual tokens: the
    processor would resize the image and every ground-truth patch index (oracle selections,
    the nearest-word check) would be wrong. Samples without a recorded grid (user data) pass.
    Only what reads ground-truth patches checks this; labeling a built-in set with another
    model (e.g. a real LLaVA-1.5 on scenes-vqa) is fine."""
    grid = meta.get("grid")
    if grid and n_tokens and grid[0] * grid[1] != n_tokens:
        raise ValueError(
            f"sample {sample_id} is a {grid[0]} x {grid[1]} = {grid[0] * grid[1]}-patch image "
            f"but the checkpoint makes {n_tokens} visual tokens: use a model for its grid "
            "(scenes-vqa: `evocomp --profile scenes mllm ...`)"
        )
