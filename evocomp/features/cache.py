"""The feature cache on disk: per (sample, model), written once, read by every later stage.

What is cached per sample is :class:`Features` (computed by :mod:`evocomp.features.compute`).
Layout: ``ROOT/<model id>/shard-<hash>.safetensors``, tensors named
``<sample id>/<field>``. A shard is written whole (temp file + rename), so a
crash never leaves a half-written shard and re-running computes only what is
missing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FIELDS = ("tokens", "nearest", "cls_attn", "text_attn", "text", "cells", "layout", "extra")


@dataclass(frozen=True)
class Features:
    """What the feature cache holds for one sample (for one model)."""

    tokens: torch.Tensor  # (N, D) float32
    nearest: torch.Tensor  # (N,) long, vocabulary id of each token
    cls_attn: torch.Tensor  # (N,) float32
    text_attn: torch.Tensor  # (N,) float32
    text: torch.Tensor  # (T, D) float32, question token embeddings
    cells: torch.Tensor  # (N, 2) long, each token's (row, col) on the image's patch grid
    layout: torch.Tensor  # (m,) long, where the model places the tokens (ImageTokens.layout)
    extra: torch.Tensor  # (E, N, D) float32, ImageTokens.extra (E = 0 for most families)

    def check(self, sample_id: str) -> None:
        """Refuse unusable features (NaN/Inf, ragged shapes) naming the sample."""
        n = self.tokens.shape[0]
        if self.tokens.ndim != 2 or n == 0:
            raise ValueError(
                f"sample {sample_id}: visual tokens must be (N, D) with N > 0, got {tuple(self.tokens.shape)}"
            )
        if not torch.isfinite(self.tokens).all():
            raise ValueError(f"sample {sample_id}: visual tokens contain NaN/Inf")
        for name in ("nearest", "cls_attn", "text_attn"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"sample {sample_id}: {name} has shape {tuple(getattr(self, name).shape)}, expected ({n},)"
                )
        if (
            self.cells.shape != (n, 2)
            or self.layout.ndim != 1
            or self.extra.shape[1:] != self.tokens.shape
        ):
            raise ValueError(
                f"sample {sample_id}: cells {tuple(self.cells.shape)} / layout "
                f"{tuple(self.layout.shape)} / extra {tuple(self.extra.shape)} do not fit "
                f"{n} visual tokens"
            )


class FeatureStore:
    """Shards of features for one model under ``root/<model_id>``."""

    def __init__(self, root: str | Path, model_id: str):
        self.dir = Path(root) / model_id
        self.model_id = model_id
        self._index: dict[str, Path] | None = None

    def _load_index(self) -> dict[str, Path]:
        """Sample id -> shard, for samples with every field (a shard written before a field
        existed counts as missing, so ``evocomp features`` computes it again)."""
        if self._index is None:
            self._index = {}
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                with safe_open(shard, "pt") as f:
                    keys = set(f.keys())
                for key in keys:
                    sid = key.split("/", 1)[0]
                    if all(f"{sid}/{k}" in keys for k in FIELDS):
                        self._index[sid] = shard
        return self._index

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._load_index()

    def missing(self, ids: Iterable[str]) -> list[str]:
        index = self._load_index()
        return [i for i in ids if i not in index]

    def get(self, sample_id: str) -> Features:
        shard = self._load_index().get(sample_id)
        if shard is None:
            raise KeyError(
                f"no features for sample {sample_id} under {self.dir} (run `evocomp features`)"
            )
        with safe_open(shard, "pt") as f:
            feats = Features(**{k: f.get_tensor(f"{sample_id}/{k}") for k in FIELDS})
        feats.check(sample_id)
        return feats

    def put(self, feats: dict[str, Features]) -> Path:
        """Write one shard with these samples' features (atomic)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(feats)).encode()).hexdigest()[:16]
        path = self.dir / f"shard-{name}.safetensors"
        tensors = {
            # clone: samples may share one tensor (one grid per model), safetensors refuses that
            f"{sid}/{k}": getattr(f, k).contiguous().clone()
            for sid, f in feats.items()
            for k in FIELDS
        }
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"model_id": self.model_id})
        os.replace(tmp, path)
        if self._index is not None:
            self._index.update(dict.fromkeys(feats, path))
        return path
