"""Two more baselines of the paper's table, run at evaluation only: SparseVLM and PruMerge.

They live here, not in :mod:`evocomp.baselines`, because neither fits what the label stage
compares its labels with (a subset scored from the feature cache): SparseVLM needs the
attention of every question token (one more LLM forward per sample, not cached), PruMerge
produces merged embeddings, not a subset of the tokens.

* **SparseVLM** (Zhang et al., ICML 2025), its text-guided selection: the question tokens
  whose attention mass on the image is at least their mean are the *raters*; a visual token's
  score is its mean attention from the raters at LLM layer 2 (where FastV reads the last token
  alone), and the top k are kept. Left out: SparseVLM's token recycling (pruned tokens
  clustered and merged back in) and its progressive, rank-adaptive deletion over several
  layers -- this product prunes once, at layer 0 or 2, for every method.
* **PruMerge** (Shang et al., 2024), importance + merge at a fixed budget: the k - 1 tokens
  with the most vision-tower CLS attention are kept, each replaced by the CLS-attention
  weighted mean of itself and its m most similar other tokens; one more token is the weighted
  mean of every pruned token. Adaptations, said here once: similarity is the cosine of the
  projected tokens (the cached features; PruMerge uses the tower's last-layer keys), the means
  are normalised (the tokens are already projected into the LLM's space, where PruMerge's
  un-normalised sum would change their scale), and the budget is the evaluation's k, not
  PruMerge's IQR outlier count.
"""

from __future__ import annotations

import torch

from evocomp.tolerance import scores_on_grid

MERGERS = ("visionzip", "prumerge")  # produce embeddings at layer 0, not a subset


def rater_scores(attention: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text-guided score ``(N,)`` from the prompt's attention ``(S, N)``.

    ``attention[j, i]``: prompt token j's attention to visual token i (the tokens after the
    image; :meth:`evocomp.mllm.base.MLLM.prompt_attention`). Raters: the rows whose total
    attention to the image is at least the mean row's (compared on the 1e-6 grid, so float
    noise does not move a token in or out).
    """
    if attention.dim() != 2 or attention.shape[0] == 0 or attention.shape[1] == 0:
        raise ValueError(f"attention must be (S, N) with S, N >= 1, got {tuple(attention.shape)}")
    if not torch.isfinite(attention).all():
        raise ValueError("attention contains NaN/Inf")
    att = attention.double()
    mass = scores_on_grid(att.sum(dim=1))  # (S,)
    raters = mass >= mass.mean()  # the largest mass always qualifies
    return att[raters].mean(dim=0).float()  # (N,)


def neighbours_for(n: int) -> int:
    """PruMerge merges 32 of CLIP-L's 576 tokens into each kept one: the same share of N."""
    return max(1, round(n * 32 / 576))


def prumerge(
    tokens: torch.Tensor, cls_attn: torch.Tensor, k: int, neighbours: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge's k output tokens (see the module docstring).

    Args:
        tokens: (N, D) visual tokens.
        cls_attn: (N,) vision-tower CLS attention (VisionZip's score).
        k: output tokens, 1 <= k <= N.
        neighbours: tokens merged into each kept one (default :func:`neighbours_for`).

    Returns:
        embeddings (k, D) in tokens' dtype and positions (k,) LongTensor, sorted by position.
        A kept token sits at its own position; the pruned tokens' mean (k > 1 and something
        pruned) at the position of the pruned token with the most CLS attention.
    """
    if tokens.dim() != 2 or cls_attn.shape != (tokens.shape[0],):
        raise ValueError(
            f"tokens (N, D) and cls_attn (N,) must agree, got {tuple(tokens.shape)} and "
            f"{tuple(cls_attn.shape)}"
        )
    n = tokens.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N={n}, got {k}")
    if not (torch.isfinite(tokens).all() and torch.isfinite(cls_attn).all()):
        raise ValueError("tokens or cls_attn contain NaN/Inf")
    work = tokens.float().cpu()  # (N, D)
    attn = cls_attn.float().cpu().clamp_min(0)  # (N,) attention weights
    order = torch.argsort(-scores_on_grid(attn), stable=True)  # ties: the lower index
    n_kept = k - 1 if 1 < k < n else k  # one slot for the pruned tokens' mean
    kept, pruned = order[:n_kept], order[n_kept:]
    m = min(neighbours if neighbours is not None else neighbours_for(n), n - 1)
    unit = torch.nn.functional.normalize(work, dim=-1, eps=1e-12)
    sim = scores_on_grid(unit[kept] @ unit.T)  # (n_kept, N)
    sim[torch.arange(n_kept), kept] = -float("inf")  # a token is not its own neighbour
    # stable descending sort: equal similarities go to the lower index
    near = torch.argsort(-sim, dim=1, stable=True)[:, :m]  # (n_kept, m)
    weight = torch.cat([attn[kept, None], attn[near]], dim=1)  # (n_kept, 1 + m)
    members = torch.cat([work[kept, None], work[near]], dim=1)  # (n_kept, 1 + m, D)
    # an all-zero attention (a tower that gives none) falls back to a plain mean
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    merged = (weight[..., None] * members).sum(1) / weight.sum(1, keepdim=True)  # (n_kept, D)
    emb, pos = [merged], [kept]
    if n_kept < k:  # the extra token: what every pruned token carries, weighted by attention
        w = attn[pruned] if attn[pruned].sum() > 0 else torch.ones(pruned.numel())
        emb.append(((w[:, None] * work[pruned]).sum(0) / w.sum())[None])
        pos.append(pruned[:1])  # the pruned token with the most attention
    emb_t, pos_t = torch.cat(emb), torch.cat(pos)
    idx = torch.argsort(pos_t)
    return emb_t[idx].to(tokens.device, tokens.dtype), pos_t[idx]
