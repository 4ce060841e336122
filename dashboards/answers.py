"""The model's answers to one sample with all tokens, with its label, and with each heuristic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from evocomp.baselines import heuristic_sets
from evocomp.config import Params
from evocomp.data.samples import Sample, sample_seed
from evocomp.evaluation.answers import is_correct
from evocomp.features.cache import FeatureStore
from evocomp.features.compute import compute

MAX_NEW_TOKENS = 8


def answers(
    mllm,
    sample: dict[str, Any],
    label: pd.Series,
    image: Path | None,
    features: Path,
    params: Params,
) -> dict[str, Any]:
    """``{"table": DataFrame, "notes": [...]}`` or ``{"error": why}``; never writes anything.

    Features come from the feature cache, or are computed in memory from the image when the
    cache lacks them. Heuristics use the label's size k and the sample's search seed, as the
    labelling did.
    """
    sid, notes = sample["id"], []
    if mllm.model_id != label["model_id"]:
        notes.append(
            f"the label was made with model {label['model_id']}, the checkpoint is "
            f"{mllm.model_id}: its answers may differ from what the search saw"
        )
    fstore = FeatureStore(features, mllm.model_id)
    if sid in fstore:
        feats = fstore.get(sid)
    elif image is not None:
        s = Sample(
            sid, image, sample["question"], sample["answer"], sample["split"], sample["meta"] or {}
        )
        feats = compute(mllm, [s])[sid]
        notes.append(f"no cached features under {fstore.dir}: computed from the image (not saved)")
    else:
        return {"error": f"no features for {sid} under {fstore.dir} and no image to compute them"}
    n = feats.tokens.shape[0]
    if n != int(label["n_tokens"]):
        return {"error": f"the label has {label['n_tokens']} tokens, the features {n}"}
    k = int(label["k"])
    selections: dict[str, torch.Tensor | None] = {
        "all tokens": None,
        "label": torch.tensor(sorted(label["kept"]), dtype=torch.long),
    }
    seed = sample_seed(params.label.seed, sid)
    for method in params.label.heuristics:
        try:
            selections |= heuristic_sets(
                k,
                tokens=feats.tokens,
                grid=feats.cells,
                text_attn=feats.text_attn,
                cls_attn=feats.cls_attn,
                seed=seed,
                methods=(method,),
            )
        except ValueError as err:
            notes.append(f"{method} skipped: {err}")
    names = list(selections)
    outs = mllm.generate(
        [sample["question"]] * len(names),
        [feats.tokens] * len(names),
        [selections[m] for m in names],
        max_new_tokens=MAX_NEW_TOKENS,
        layouts=[feats.layout] * len(names),
        extras=[feats.extra] * len(names),
    )
    prompt = mllm.encode(sample["question"], sample["answer"])
    rows = []
    for name, out in zip(names, outs, strict=True):
        idx = selections[name]
        idx = torch.arange(n) if idx is None else idx.sort().values
        loss = float(
            mllm.subset_loss(prompt, feats.tokens, idx[None], feats.layout, feats.extra)[0]
        )
        rows.append(
            {
                "selection": name,
                "tokens": len(idx),
                "answer": out,
                "correct": is_correct(out, sample["answer"]),
                "answer loss": round(loss, 4),
            }
        )
    return {"table": pd.DataFrame(rows), "notes": notes}
