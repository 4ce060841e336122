"""Per-sample model features: computed once per (sample, model) and cached.

For every sample: the projected visual tokens ``(N, D)`` (N per image), their cells on the
image's patch grid and the model's layout of them, each token's nearest
vocabulary id (the semantic groups), the vision tower's CLS attention
(VisionZip), the last prompt token's attention at LLM layer 2 (FastV) and the
question's token embeddings ``(T, D)`` (the compressor's text input).

    evocomp features --data data/prepared --out data/features
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evocomp.data.samples import Sample
from evocomp.features.cache import Features, FeatureStore
from evocomp.features.grouping import nearest_vocab


def compute(mllm, samples: list[Sample]) -> dict[str, Features]:
    """Features of a batch of samples (one vision-tower pass for the batch)."""
    images = [s.load_image() for s in samples]
    visual = mllm.image_tokens(images)  # N may differ per image
    cls = mllm.cls_attention(images)  # (N_i,) per image
    vocab = mllm.vocab_embeddings()
    out = {}
    for s, vis, c in zip(samples, visual, cls, strict=True):
        tok = vis.tokens
        prompt = mllm.encode(s.question)
        extra = vis.extra if vis.extra is not None else tok.new_zeros(0, *tok.shape)
        layer = min(2, mllm.n_layers)
        attn = mllm.text_attention(prompt, tok, layer, layout=vis.layout, extra=vis.extra)
        out[s.id] = Features(
            tokens=tok.contiguous(),
            nearest=nearest_vocab(tok, vocab),
            cls_attn=c.contiguous(),
            text_attn=attn,
            text=mllm.question_embeddings(s.question),
            cells=vis.cells.contiguous(),
            layout=vis.layout.contiguous(),
            extra=extra.contiguous(),
        )
    return out


def ensure_features(
    mllm,
    samples: list[Sample],
    root: str | Path,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureStore:
    """Compute and store the features of the samples that have none yet."""
    store = FeatureStore(root, mllm.model_id)
    todo = store.missing(s.id for s in samples)
    by_id = {s.id: s for s in samples}
    for start in range(0, len(todo), batch_size):
        chunk = [by_id[i] for i in todo[start : start + batch_size]]
        store.put(compute(mllm, chunk))
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    return store
