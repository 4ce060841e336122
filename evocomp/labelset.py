"""The frozen label set (``data/labels/labels.parquet``): reading it and naming its version.

A label set's *version* is a hash of what its labels decide -- per sample, the kept tokens
and the soft label rounded to ``SOFT_DECIMALS`` -- not of the file's bytes: the losses in
the file carry float noise from the machine that computed them (``evocomp.tolerance``),
while the decisions do not. Two label sets with the same hash train the same compressor
from the same features.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

REQUIRED = ("sample_id", "split", "model_id", "n_tokens", "kept", "soft")
SOFT_DECIMALS = 4  # the elite's keep frequencies are multiples of 1/parents


def load_label_set(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label set not found: {path} (run `evocomp label` first)")
    df = pd.read_parquet(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not an EvoComp label set (missing columns {missing})")
    return df


def label_set_hash(labels: str | Path | pd.DataFrame) -> str:
    """16 hex digits of sha256 over every label's decisions, in sample-id order."""
    df = labels if isinstance(labels, pd.DataFrame) else load_label_set(labels)
    h = hashlib.sha256()
    for row in df.sort_values("sample_id").itertuples(index=False):
        soft = None if row.soft is None else [round(float(x), SOFT_DECIMALS) for x in row.soft]
        line = [row.sample_id, row.model_id, [int(t) for t in row.kept], soft]
        h.update(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()[:16]
