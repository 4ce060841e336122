"""Vocabulary-based semantic grouping of visual tokens (EvoComp paper, Sec. 3).

Each projected visual token lives in the LLM's input-embedding space; its
nearest vocabulary embedding (cosine, top-1) names what it "means". Tokens that
share a nearest word form one group: the search keeps tokens per group, which
shrinks its space and keeps a label semantically diverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# 4096 x 4096 float32 similarities = 64 MiB per block: bounded whatever V and N are.
DEFAULT_CHUNK = 4096


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32; zero rows stay zero (cosine 0 to all)."""
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def nearest_vocab(
    tokens: torch.Tensor, vocab: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Top-1 vocabulary id of every visual token by cosine similarity.

    The similarity matrix is never built whole: tokens and vocabulary are taken
    in blocks of ``chunk`` rows and a running maximum is kept over vocabulary
    blocks, so a 32k x 4096 vocabulary against 2880 tokens needs one
    ``chunk x chunk`` float32 block at a time. Ties go to the lowest id.

    Args:
        tokens: (N, D) visual tokens after the projector (any float dtype).
        vocab: (V, D) the LLM's input-embedding matrix.
        chunk: rows per block, for both tokens and vocabulary.

    Returns:
        (N,) LongTensor of vocabulary ids.
    """
    if tokens.dim() != 2 or vocab.dim() != 2:
        raise ValueError(
            f"nearest_vocab expects tokens (N, D) and vocab (V, D); got {tuple(tokens.shape)} "
            f"and {tuple(vocab.shape)}"
        )
    if tokens.shape[1] != vocab.shape[1]:
        raise ValueError(
            f"token dimension {tokens.shape[1]} != vocabulary dimension {vocab.shape[1]}: "
            "tokens must be projected into the LLM embedding space first"
        )
    if vocab.shape[0] == 0:
        raise ValueError("the vocabulary is empty (V=0)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not torch.isfinite(tokens).all():
        bad = (~torch.isfinite(tokens)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"tokens contain NaN/Inf (token rows {bad[:10]})")
    n = tokens.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long)

    best_sim = torch.full((n,), -float("inf"))  # (N,)
    best_id = torch.zeros(n, dtype=torch.long)  # (N,)
    for v0 in range(0, vocab.shape[0], chunk):
        v_block = vocab[v0 : v0 + chunk]
        if not torch.isfinite(v_block).all():
            raise ValueError(f"vocabulary embeddings contain NaN/Inf (rows {v0}..{v0 + chunk - 1})")
        v_unit = _unit(v_block).to(tokens.device)  # (Vc, D)
        for t0 in range(0, n, chunk):
            sim = _unit(tokens[t0 : t0 + chunk]) @ v_unit.T  # (Nc, Vc)
            block_sim, block_id = sim.max(dim=1)  # first maximum on ties
            block_sim, block_id = block_sim.cpu(), block_id.cpu()
            # Strictly greater: an earlier block (lower id) keeps a tie.
            better = block_sim > best_sim[t0 : t0 + chunk]
            best_sim[t0 : t0 + chunk] = torch.where(better, block_sim, best_sim[t0 : t0 + chunk])
            best_id[t0 : t0 + chunk] = torch.where(better, block_id + v0, best_id[t0 : t0 + chunk])
    return best_id


def group_ids(nearest: torch.Tensor) -> torch.Tensor:
    """Dense group index per token, numbered 0..G-1 in order of first appearance.

    Args:
        nearest: (N,) any integer labels, e.g. the output of :func:`nearest_vocab`.

    Returns:
        (N,) LongTensor; tokens with equal labels share a group.
    """
    if nearest.dim() != 1:
        raise ValueError(f"group_ids expects a 1-D tensor, got shape {tuple(nearest.shape)}")
    if nearest.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    uniq, inverse = torch.unique(nearest, return_inverse=True)  # sorted labels
    positions = torch.arange(nearest.numel())
    first = torch.full((uniq.numel(),), nearest.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # (U,)
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(uniq.numel())
    return rank[inverse]


def groups_as_lists(gids: torch.Tensor) -> list[list[int]]:
    """Members of each group (ascending token indices), group g at position g.

    Args:
        gids: (N,) dense group ids from :func:`group_ids` (0..G-1, all present).
    """
    ids = [int(g) for g in gids.tolist()]
    n_groups = max(ids, default=-1) + 1
    out: list[list[int]] = [[] for _ in range(n_groups)]
    for i, g in enumerate(ids):
        if g < 0:
            raise ValueError(f"group ids must be >= 0, token {i} has {g}")
        out[g].append(i)
    empty = [g for g, members in enumerate(out) if not members]
    if empty:
        raise ValueError(f"group ids are not dense: groups {empty[:10]} have no member")
    return out
