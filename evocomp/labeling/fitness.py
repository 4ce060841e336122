"""The loss a label minimises: one sample's answer loss for a batch of kept-token sets.

Shared by the search (:mod:`evocomp.labeling.sample`), the label audit's noise floor and the
compressor's ``train.monitor: answer_loss``, so all three score a token set the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evocomp.data.samples import Sample
from evocomp.features.cache import Features


def fitness_fn(
    mllm, sample: Sample, feats: Features, objective: str = "answer"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss ``(P,)`` of P kept-index rows ``(P, k)`` that the search minimises
    (``label.objective``): the answer's mean cross-entropy, or (``distill``) the mean KL
    divergence from the all-token distribution at the answer's positions."""
    prompt = mllm.encode(sample.question, sample.answer)
    if not prompt.answer:
        raise ValueError(f"sample {sample.id}: the answer {sample.answer!r} encodes to no tokens")
    args = (feats.tokens, feats.layout, feats.extra)
    reference = mllm.answer_logprobs(prompt, *args) if objective == "distill" else None

    def fitness(idx: torch.Tensor) -> torch.Tensor:
        return mllm.subset_loss(prompt, feats.tokens, idx, *args[1:], reference=reference)

    return fitness
