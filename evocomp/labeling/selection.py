"""Which samples a label run covers: splits, an ids file, a shard.

evocomp label --split train --split val
evocomp label --ids suspects.csv          # a re-search of chosen samples
evocomp label --shard 0/4                 # one of four independent label processes
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from evocomp.data.prepared import load_prepared
from evocomp.data.samples import Sample
from evocomp.errors import DatasetError


def in_shard(sample_id: str, shard: tuple[int, int]) -> bool:
    """Whether a sample is in shard ``i`` of ``n``: a stable hash of its id, not its position."""
    i, n = shard
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:16], 16) % n == i


def select_samples(data, splits, max_samples=None, ids=None, shard=None) -> list[Sample]:
    """The prepared samples of ``splits`` (first ``max_samples`` each), or only ``ids``; one shard."""
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard[0]}/{shard[1]}: expected i/n with 0 <= i < n")
    limit = None if ids is not None else max_samples  # requested ids may lie past the first N
    samples = [s for split in splits for s in load_prepared(data, split, limit)]
    if ids is not None:
        wanted = set(ids)
        samples = [s for s in samples if s.id in wanted]
        if ids and not samples:
            raise DatasetError(
                f"none of the {len(ids)} sample ids is in {data} ({', '.join(splits)})"
            )
    return [s for s in samples if in_shard(s.id, shard)] if shard else samples


def read_ids(path: Path) -> list[str]:
    """Sample ids from a file: a JSON list (of ids, or of objects with ``sample_id``),
    a CSV with a ``sample_id`` (or ``id``) column, or one id per line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise DatasetError(f"cannot read the ids file {path}: {err.strerror or err}") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a JSON list of sample ids")
        ids = [r.get("sample_id") if isinstance(r, dict) else r for r in rows]
    elif path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        col = next((c for c in ("sample_id", "id") if c in (reader.fieldnames or [])), None)
        if col is None:
            raise DatasetError(f"{path}: no sample_id column (columns: {reader.fieldnames})")
        ids = [row[col] for row in reader]
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: no sample ids in the file")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise DatasetError(f"{path}: {len(bad)} entries are not sample ids (first: {bad[0]!r})")
    return list(dict.fromkeys(ids))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: expected 0 <= i < n")
    return i, n
