"""What each token of a label is worth: backward elimination over the label's own tokens.

A searched label answers "which k tokens keep the answer loss lowest", and beyond the few
tokens an answer needs, which of many equally good sets the search returns is arbitrary
(BENCHMARKS.md, scenes-vqa Compression: the labels at 1/9, 2/9 and 1/3 share half their
tokens). A compressor cannot learn an arbitrary choice. Backward elimination ranks the
label's tokens by worth instead: repeatedly drop the token whose removal raises the answer
loss least, so the tokens dropped last are those the answer cannot do without (a colour
question: one patch of its object; a count: a patch of every instance). ``soft_target:
elimination`` (``label.soft_target``) trains the compressor on that rank.

Written by hand: greedy backward elimination is a dozen lines around the model's batched
loss, and no feature-selection library scores subsets through an MLLM forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evocomp.tolerance import loss_on_grid


def elimination_order(
    kept: list[int], fitness: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[list[int], int]:
    """The label's tokens, least worth first, and the forwards spent.

    Each step scores every one-token-smaller subset in one batched forward (``fitness``:
    ``(P, k) -> (P,)`` answer losses) and drops the token whose removal costs least; losses
    are compared on the search's grid (:func:`evocomp.tolerance.loss_on_grid`) and ties drop
    the lower token index, so the order is the same on every machine. ``k - 1`` forwards.
    """
    current = sorted(int(t) for t in kept)
    order: list[int] = []
    forwards = 0
    while len(current) > 1:
        rows = torch.tensor([[t for t in current if t != drop] for drop in current])
        losses = [loss_on_grid(x) for x in fitness(rows).tolist()]
        forwards += 1
        j = losses.index(min(losses))  # the first minimum: the lowest token index
        order.append(current.pop(j))
    return order + current, forwards


def rank_target(order: list[int], n_tokens: int) -> list[float]:
    """Per token: ``(position + 1) / k`` in the elimination order for the label's tokens (the
    last one dropped gets 1), 0 for the rest."""
    soft = [0.0] * n_tokens
    for pos, t in enumerate(order):
        soft[t] = (pos + 1) / len(order)
    return soft
