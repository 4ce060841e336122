"""The `train` stage: a frozen label set + the cached features -> a saved compressor.

evocomp train --labels data/labels/labels.parquet --out models/compressor
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from evocomp.compress.fit import Item, best_epoch, fit_compressor
from evocomp.compress.model import save_compressor
from evocomp.config import TrainParams
from evocomp.features.cache import FeatureStore
from evocomp.labelset import label_set_hash, load_label_set


def items_from_labels(df: pd.DataFrame, fstore: FeatureStore) -> dict[str, list[Item]]:
    """Items per split; refuses labels of another model or with mismatched token counts."""
    other = sorted(set(df["model_id"]) - {fstore.model_id})
    if other:
        raise ValueError(
            f"the label set was made with model {other[0]!r}, the features are of "
            f"{fstore.model_id!r}: relabel with this model or point --model at that one"
        )
    out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for row in df.itertuples(index=False):
        feats = fstore.get(row.sample_id)
        n = feats.tokens.shape[0]
        if int(row.n_tokens) != n:
            raise ValueError(
                f"sample {row.sample_id}: label has {row.n_tokens} tokens, features have {n}"
            )
        target = torch.zeros(n)
        target[torch.as_tensor(list(row.kept), dtype=torch.long)] = 1.0
        soft = (
            torch.as_tensor(list(row.soft), dtype=torch.float32) if row.soft is not None else None
        )
        out.setdefault(row.split, []).append(
            Item(
                visual=feats.tokens,
                grid_pos=feats.cells,
                text=feats.text,
                target=target,
                soft=soft,
            )
        )
    return out


def train_compressor(
    labels: str | Path,
    features: str | Path,
    info: dict,
    params: TrainParams,
    out: str | Path,
    device: str = "cpu",
    log: Callable[[dict], None] | None = None,
) -> tuple[list[dict], dict]:
    """Fit on the train split (early stopping on val), save to ``out``; ``(history, summary)``."""
    df = load_label_set(labels)
    items = items_from_labels(df, FeatureStore(features, info["model_id"]))
    if not items["train"]:
        raise ValueError(f"{labels}: no train-split labels to train on")
    model, history = fit_compressor(
        items["train"],
        items["val"],
        params,
        device,
        log,
        llm_heads=info.get("heads"),
        llm_ffn=info.get("ffn"),
    )
    best = best_epoch(history, params.monitor)  # the epoch fit_compressor restored
    summary = {
        "label_set": str(labels),
        "label_set_hash": label_set_hash(df),
        "model_id": info["model_id"],
        "train_samples": len(items["train"]),
        "val_samples": len(items["val"]),
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "val_loss": best["val_loss"],
        "val_precision": best["val_precision"],
        "params": json.loads(params.model_dump_json()),
    }
    save_compressor(model.cpu(), out, summary)
    return history, summary
