"""The prepared samples table (``data/prepared/samples.parquet``), the pipeline's input.

evocomp prepare --source data/raw/shapes-vqa/dataset.json --out data/prepared
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from evocomp.data.samples import Sample, to_row
from evocomp.errors import DatasetError

COLUMNS = ["id", "split", "qtype", "question", "answer", "image", "meta"]


def write_prepared(samples: list[Sample], out: str | Path, source: str) -> Path:
    """Write the samples table atomically, sorted by id (same input, same bytes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        row | {"meta": json.dumps(row["meta"], sort_keys=True)}
        for row in map(to_row, sorted(samples, key=lambda s: s.id))
    ]
    df = pd.DataFrame(rows, columns=COLUMNS)
    tmp = out / "samples.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / "samples.parquet")
    counts = df["split"].value_counts().to_dict()
    manifest = {
        "source": source,
        "samples": len(df),
        "splits": {k: int(v) for k, v in counts.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out / "samples.parquet"


def load_prepared(
    path: str | Path, split: str | None = None, limit: int | None = None
) -> list[Sample]:
    """Samples of one split (or all), in id order; ``limit`` keeps the first ones."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.parquet"
    if not path.exists():
        raise DatasetError(f"prepared samples not found: {path} (run `evocomp prepare` first)")
    df = pd.read_parquet(path)
    if split is not None:
        df = df[df["split"] == split]
    if limit is not None:
        df = df.head(limit)
    return [
        Sample(r.id, Path(r.image).resolve(), r.question, r.answer, r.split, json.loads(r.meta))
        for r in df.itertuples(index=False)
    ]
