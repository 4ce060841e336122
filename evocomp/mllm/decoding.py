"""Greedy decoding, batched: the one loop every generating path uses.

The model side is a ``step`` function: ``step(None)`` runs the prompt and returns the logits
of the first new token ``(B, V)``; ``step(ids)`` feeds the tokens ``(B,)`` just chosen and
returns the logits of the next. How a step feeds them (a KV cache, or a full forward over
a pruned sequence) is the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor | None], torch.Tensor]


def greedy(step: Step, batch: int, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    """Token ids ``(B, max_new_tokens)``: the argmax at each step; after EOS a row repeats EOS.

    Stops early once every row has produced EOS (the rest of ``out`` is EOS).
    """
    fill = eos if eos is not None else 0
    out = torch.full((batch, max_new_tokens), fill, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    nxt = None
    for t in range(max_new_tokens):
        nxt = step(nxt).argmax(-1).cpu()
        nxt[done] = out[done, t]
        out[:, t] = nxt
        done |= nxt == eos
        if bool(done.all()):
            break
    return out
