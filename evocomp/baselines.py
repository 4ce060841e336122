"""Heuristic visual-token selectors: the baselines EvoComp labels are compared with.

Every selector returns k distinct token indices sorted ascending (the kept
tokens in their original order). Scores are compared on a 1e-6 grid with ties to the
lower index (:mod:`evocomp.tolerance`), so float noise from another machine does not
change a selection. ``select`` dispatches by name; each method
needs some context (tokens, grid, attention) and says which when it is missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# the names live in the config, which checks params.yaml's label.heuristics against them
from evocomp.config import LABEL_HEURISTICS as HEURISTICS
from evocomp.tolerance import scores_on_grid

NEEDS = {"random": None, "pooling": "grid", "fastv": "text_attn", "visionzip": "cls_attn",
         "divprune": "tokens", "dart": "tokens"}  # the context each method reads  # fmt: skip


def _check_vector(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (N,), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN/Inf")
    return x.float().cpu()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores on the 1e-6 grid (ties: lower index first)."""
    order = torch.argsort(-scores_on_grid(scores), stable=True)  # (N,)
    return order[:k]


def _argmax(scores: torch.Tensor) -> int:
    """Index of the largest score on the 1e-6 grid (ties: the lowest index)."""
    return int(torch.argmax(scores_on_grid(scores)))


def _unit(tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(tokens.float().cpu(), dim=-1, eps=1e-12)  # (N, D)


# ---- the selectors; each returns k indices in any order -------------------------------


def _random(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k]


def _pooling(grid: tuple[int, int], k: int) -> torch.Tensor:
    """k cells spread evenly over an h x w grid.

    Picks the r x c strided sub-grid (r*c >= k) whose aspect is closest to the
    grid's and wastes fewest cells, centres its rows/columns in the grid, then
    takes k evenly spaced cells of the sub-grid in raster order.
    """
    h, w = grid
    best: tuple[float, int, int] | None = None
    for r in range(1, h + 1):
        c = min(w, math.ceil(k / r))
        if r * c < k:
            continue
        cost = abs(math.log((r / c) / (h / w))) + (r * c - k) / k
        if best is None or cost < best[0]:
            best = (cost, r, c)
    assert best is not None  # k <= h*w, so r = h always fits
    _, r, c = best
    rows = [int((i + 0.5) * h / r) for i in range(r)]
    cols = [int((j + 0.5) * w / c) for j in range(c)]
    cells = [y * w + x for y in rows for x in cols]  # r*c distinct cells, raster order
    picks = [cells[int((i + 0.5) * len(cells) / k)] for i in range(k)]  # spacing >= 1
    return torch.tensor(picks, dtype=torch.long)


def _pooling_cells(cells: torch.Tensor, k: int) -> torch.Tensor:
    """k tokens spread evenly over the patch cells ``(N, 2)`` of an image of any layout.

    Tokens that fill their bounding grid once, in raster order (every single-grid family) get
    :func:`_pooling` exactly. Otherwise (LLaVA-NeXT: base tokens over tile tokens, unpadded
    rows) each of :func:`_pooling`'s k target cells of the bounding grid takes the nearest
    token not yet taken (L1 on cells; ties: the lower index).
    """
    h, w = (int(x) + 1 for x in cells.max(0).values)
    n = cells.shape[0]
    if n == h * w and torch.equal(cells[:, 0] * w + cells[:, 1], torch.arange(n)):
        return _pooling((h, w), k)
    taken = torch.zeros(n, dtype=torch.bool)
    picks = []
    for t in _pooling((h, w), k).tolist():
        d = (cells - torch.tensor([t // w, t % w])).abs().sum(1).float()
        d[taken] = math.inf
        i = int(torch.argmin(d))
        taken[i] = True
        picks.append(i)
    return torch.tensor(picks, dtype=torch.long)


def _divprune(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity (DivPrune, Alvar et al., CVPR 2025).

    First the token whose nearest other token is farthest, then repeatedly the
    token maximising its minimum cosine distance to the selected set.
    """
    unit = _unit(tokens)
    n = unit.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    dist = 1.0 - unit @ unit.T  # (N, N)
    first_scores = dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).min(dim=0).values
    return _max_min(dist, [_argmax(first_scores)], k)


def _max_min(dist: torch.Tensor, picks: list[int], k: int) -> torch.Tensor:
    """``picks``, then DivPrune's greedy max-min steps until there are ``k`` (pick order)."""
    taken = torch.zeros(dist.shape[0], dtype=torch.bool)
    taken[picks] = True
    min_dist = dist[picks].min(dim=0).values  # (N,) distance to the selected set
    for _ in range(k - len(picks)):
        # -1 on taken tokens: duplicates (distance 0) must never be re-picked.
        nxt = _argmax(min_dist.masked_fill(taken, -1.0))  # distances are >= 0
        picks.append(nxt)
        taken[nxt] = True
        min_dist = torch.minimum(min_dist, dist[nxt])
    return torch.tensor(picks, dtype=torch.long)


def divprune_fill(tokens: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """``kept`` plus DivPrune's max-min picks from them, ``k`` in all, ascending.

    How ``evocomp_fill`` spends a budget larger than the compressor's training labels: the
    compressor learnt to rank tokens within its labels' size; beyond it, its next scores
    order tokens no label ranked, and the fill covers the rest of the image instead
    (BENCHMARKS.md, scenes-vqa Compression: both rules are reported).
    """
    picks = [int(t) for t in kept]
    if not 0 < len(picks) <= k:
        raise ValueError(f"divprune_fill: {len(picks)} kept tokens, not 1..k={k}")
    if len(picks) == k:  # nothing to fill: no N x N distances
        return torch.tensor(sorted(picks), dtype=torch.long)
    unit = _unit(tokens)
    return _max_min(1.0 - unit @ unit.T, picks, k).sort().values


def dart_pivots(k: int) -> int:
    """Number of pivot tokens for budget k: k//4 clamped to 2..8 (never more than k)."""
    return min(k, max(2, min(8, k // 4)))


def _dart(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Pivots plus the tokens least similar to them (DART, Wen et al. 2025).

    Pivots are the largest-L2-norm tokens; every other token is scored by its
    highest cosine similarity to any pivot and the k - pivots lowest are kept,
    removing duplicates of what the pivots already carry.
    """
    n_piv = dart_pivots(k)
    pivots = _top(tokens.float().cpu().norm(dim=-1), n_piv)  # (n_piv,)
    unit = _unit(tokens)
    sim = (unit @ unit[pivots].T).max(dim=1).values  # (N,)
    sim[pivots] = float("inf")
    rest = _top(-sim, k - n_piv)
    return torch.cat([pivots, rest])


# ---- public API -------------------------------------------------------------------------


def _infer_n(tokens, grid, text_attn, cls_attn) -> int | None:
    sizes = {}
    if isinstance(grid, torch.Tensor):  # cells (N, 2)
        if grid.ndim != 2 or grid.shape[1] != 2 or grid.shape[0] == 0 or grid.min() < 0:
            raise ValueError(f"cells must be (N, 2) >= 0, got shape {tuple(grid.shape)}")
        sizes["grid"], grid = grid.shape[0], None
    if tokens is not None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (N, D), got shape {tuple(tokens.shape)}")
        sizes["tokens"] = tokens.shape[0]
    if grid is not None:
        h, w = grid
        if h < 1 or w < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid}")
        sizes["grid"] = h * w
    if text_attn is not None:
        sizes["text_attn"] = text_attn.numel()
    if cls_attn is not None:
        sizes["cls_attn"] = cls_attn.numel()
    if len(set(sizes.values())) > 1:
        raise ValueError(f"context sizes disagree on the number of tokens N: {sizes}")
    return next(iter(sizes.values()), None)


def select(
    method: str,
    k: int,
    *,
    tokens: torch.Tensor | None = None,
    grid: tuple[int, int] | torch.Tensor | None = None,
    text_attn: torch.Tensor | None = None,
    cls_attn: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Keep k visual tokens by a heuristic.

    Args:
        method: one of :data:`HEURISTICS`.
        k: tokens to keep, 1 <= k <= N.
        tokens: (N, D) visual tokens (divprune, dart; fixes N for random).
        grid: (h, w) patch grid with h*w = N, or each token's (row, col) cell ``(N, 2)``
            for an image of any layout (pooling).
        text_attn: (N,) attention of the last prompt token to each visual token at
            LLM layer 2, mean over heads (fastv; FastV, Chen et al. 2024).
        cls_attn: (N,) vision-tower CLS attention summed over heads (visionzip;
            VisionZip, Yang et al. 2025).
        seed: random only.

    Returns:
        (k,) LongTensor, sorted ascending, no duplicates.
    """
    n = _check_context((method,), k, tokens, grid, text_attn, cls_attn)
    return _pick(method, k, n, tokens, grid, text_attn, cls_attn, seed)


def _check_context(methods, k, tokens, grid, text_attn, cls_attn) -> int:
    """Validate what ``methods`` need (each tensor scanned once); returns N."""
    context = {"tokens": tokens, "grid": grid, "text_attn": text_attn, "cls_attn": cls_attn}
    for method in methods:
        if method not in NEEDS:
            raise ValueError(
                f"unknown selection method {method!r} (known: {', '.join(HEURISTICS)})"
            )
        need = NEEDS[method]
        if need is not None and context[need] is None:
            raise ValueError(f"method {method!r} needs {need}=...")
    n = _infer_n(tokens, grid, text_attn, cls_attn)
    if n is None:
        raise ValueError(
            f"method {methods[0]!r} needs one of tokens, grid, text_attn, cls_attn (for N)"
        )
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N={n}, got {k}")
    if tokens is not None and not torch.isfinite(tokens).all():
        raise ValueError("tokens contain NaN/Inf")
    return n


def _pick(method, k, n, tokens, grid, text_attn, cls_attn, seed) -> torch.Tensor:
    if method == "random":
        picks = _random(n, k, seed)
    elif method == "pooling":
        picks = _pooling_cells(grid, k) if isinstance(grid, torch.Tensor) else _pooling(grid, k)
    elif method == "fastv":
        picks = _top(_check_vector("text_attn", text_attn), k)
    elif method == "visionzip":
        picks = _top(_check_vector("cls_attn", cls_attn), k)
    elif method == "divprune":
        picks = _divprune(tokens, k)
    else:
        picks = _dart(tokens, k)
    return torch.sort(picks).values


def heuristic_sets(
    k: int,
    *,
    tokens: torch.Tensor | None = None,
    grid: tuple[int, int] | torch.Tensor | None = None,
    text_attn: torch.Tensor | None = None,
    cls_attn: torch.Tensor | None = None,
    seed: int = 0,
    methods: tuple[str, ...] = HEURISTICS,
) -> dict[str, torch.Tensor]:
    """``{method: select(method, k, ...)}`` for every method, in the given order.

    The context is validated once for all methods (this runs once per labelled sample).
    """
    context = (tokens, grid, text_attn, cls_attn)
    n = _check_context(methods, k, *context) if methods else 0
    return {m: _pick(m, k, n, *context, seed) for m in methods}


def visionzip_merge(
    tokens: torch.Tensor, cls_attn: torch.Tensor, k: int, dominant_fraction: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant tokens plus merged contextual tokens (VisionZip, Yang et al. 2025).

    ``round(dominant_fraction * k)`` tokens with the highest CLS attention are
    kept as they are. The rest of the budget is filled with contextual tokens:
    evenly spaced targets among the remaining tokens, every other remaining token
    assigned to its most cosine-similar target, each target replaced by the mean
    of itself and its assigned tokens. Used in evaluation only (it produces
    embeddings, not a subset).

    Args:
        tokens: (N, D) visual tokens.
        cls_attn: (N,) vision-tower CLS attention summed over heads.
        k: output tokens, 1 <= k <= N.
        dominant_fraction: share of k given to dominant tokens, in [0, 1].

    Returns:
        embeddings (k, D) in tokens' dtype and positions (k,) LongTensor (the
        dominant token's or the target token's index), sorted by position.
    """
    n = _infer_n(tokens, None, None, cls_attn)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N={n}, got {k}")
    if not 0.0 <= dominant_fraction <= 1.0:
        raise ValueError(f"dominant_fraction must be in [0, 1], got {dominant_fraction}")
    if not torch.isfinite(tokens).all():
        raise ValueError("tokens contain NaN/Inf")
    attn = _check_vector("cls_attn", cls_attn)
    n_dom = min(k, round(dominant_fraction * k))
    dominant = _top(attn, n_dom)
    is_rest = torch.ones(n, dtype=torch.bool)
    is_rest[dominant] = False
    rest = is_rest.nonzero().flatten()  # (N - n_dom,) ascending
    n_ctx = k - n_dom
    work = tokens.float().cpu()  # (N, D)
    embeddings = [work[dominant]]
    positions = [dominant]
    if n_ctx > 0:
        targets = rest[[int((i + 0.5) * rest.numel() / n_ctx) for i in range(n_ctx)]]  # (n_ctx,)
        unit = _unit(tokens)
        # (N - n_dom,) target slot; similarities on the 1e-6 grid, ties to the first target
        assign = scores_on_grid(unit[rest] @ unit[targets].T).argmax(dim=1)
        # A target is always most similar to itself (cosine 1), so it joins its own mean.
        assign[torch.searchsorted(rest, targets)] = torch.arange(n_ctx)
        sums = torch.zeros(n_ctx, work.shape[1]).index_add_(0, assign, work[rest])  # (n_ctx, D)
        counts = torch.bincount(assign, minlength=n_ctx).unsqueeze(1)  # >= 1: the target
        embeddings.append(sums / counts)
        positions.append(targets)
    emb = torch.cat(embeddings)
    pos = torch.cat(positions)
    order = torch.argsort(pos)
    return emb[order].to(tokens.device, tokens.dtype), pos[order]
