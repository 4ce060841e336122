"""The dashboard's read-only file and model loaders: metrics JSON, the Parquet label set, DVC
and git versions, the compressor's gradient norms and the MLLM (loaded once per process).

Each is cached and keyed by the path and its modification time, so an edited file is re-read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
import yaml

from dashboards.data import TTL, Settings, mtime
from evocomp.config import AuditParams, load_params
from evocomp.errors import ParamsError

MAX_GHM_TOKENS = 20_000  # visual tokens scored for the g histogram (a few seconds on CPU)
CHUNK = 64  # labels whose features are in memory at once


@st.cache_data(ttl=TTL, show_spinner=False)
def read_json(path: str, stamp: float) -> dict[str, Any] | None:
    """A metrics file, None when absent or unreadable (``stamp``: its mtime, for the cache)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@st.cache_data(ttl=TTL, show_spinner=False)
def read_csv(path: str, stamp: float) -> pd.DataFrame | None:
    """A plots CSV, None when absent or unreadable (``stamp``: its mtime, for the cache)."""
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


@st.cache_data(ttl=TTL, show_spinner=False)
def _audit_rules(path: str, stamp: float) -> tuple[AuditParams, str | None]:
    if not Path(path).is_file():
        return AuditParams(), None
    try:
        return load_params(path).audit, None
    except ParamsError as err:
        return AuditParams(), str(err)


def audit_rules(s: Settings) -> AuditParams:
    """The suspect rules of params.yaml's ``audit:`` section; the code's defaults when there is
    no params.yaml, and with a warning on the page when it cannot be read."""
    rules, problem = _audit_rules(str(s.params), mtime(s.params))
    if problem:
        st.warning(f"Suspect rules: the defaults ({problem})", icon=":material/warning:")
    return rules


def metrics(s: Settings, name: str) -> dict[str, Any] | None:
    path = s.metrics / name
    return read_json(str(path), mtime(path))


def plot_csv(path: str | Path) -> pd.DataFrame | None:
    """A CSV a bench wrote (its path as the bench's JSON records it, relative to the repo)."""
    return read_csv(str(path), mtime(Path(path)))


@st.cache_data(ttl=300, show_spinner=False)
def git_head(cwd: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@st.cache_data(ttl=TTL, show_spinner=False)
def label_set_info(path: str, stamp: float) -> dict[str, Any] | None:
    """The Parquet label set: its hash (as ``evocomp train`` records it), rows and runs."""
    import pyarrow.parquet as pq

    from evocomp.labelset import label_set_hash

    p = Path(path)
    if not p.is_file():
        return None
    try:
        table = pq.read_table(p, columns=["run_id", "model_id"])
    except (OSError, ValueError) as err:
        return {"error": f"{p}: not a readable label set ({err})"}
    runs_in = table.column("run_id").to_pandas().value_counts().sort_index()
    return {
        "hash": label_set_hash(p),
        "rows": table.num_rows,
        "runs": {int(k): int(v) for k, v in runs_in.items()},
        "models": sorted(set(table.column("model_id").to_pylist())),
    }


@st.cache_data(ttl=TTL, show_spinner=False)
def dvc_lock_md5(lock: str, stamp: float, out_path: str) -> str | None:
    """The md5 DVC recorded for ``out_path`` in dvc.lock (the versioned label set)."""
    try:
        data = yaml.safe_load(Path(lock).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if isinstance(out, dict) and Path(out.get("path", "")) == Path(out_path):
                return out.get("md5")
    return None


@st.cache_data(ttl=600, show_spinner="Scoring the label set with the compressor ...")
def grad_stats(
    compressor: str, labels: str, features: str, device: str, stamp: tuple[float, float]
) -> dict:
    """GHM-C gradient norms of the current compressor on the label set, the kept/dropped
    overlap and what the recommendation needs; ``{"error": ...}`` if something is missing.

    Scores at most MAX_GHM_TOKENS visual tokens (whole labels, in sample-id order), loading
    features a chunk at a time, so a 576-token, 4096-wide model stays within memory.
    """
    import numpy as np

    from evocomp.audit.ghm import gradient_norms
    from evocomp.compress.model import load_compressor
    from evocomp.compress.training import items_from_labels
    from evocomp.features.cache import FeatureStore
    from evocomp.labelset import load_label_set

    try:
        model, extra = load_compressor(compressor, device)
        df = load_label_set(labels)
        model_id = extra.get("model_id") or (df["model_id"].iloc[0] if len(df) else None)
        df = df[df["model_id"] == model_id]
        fstore = FeatureStore(features, str(model_id))
        present = df[~df["sample_id"].isin(set(fstore.missing(df["sample_id"])))]
        if present.empty:
            return {
                "error": f"no features of model {model_id} under {features} for the "
                f"{len(df)} labels of {labels} (run `evocomp features`)"
            }
        n = int(present["n_tokens"].iloc[0])
        chosen = present.sort_values("sample_id").head(max(1, MAX_GHM_TOKENS // n))
        gs, overlap, weight = [], 0.0, 0
        for start in range(0, len(chosen), CHUNK):
            split_items = items_from_labels(chosen.iloc[start : start + CHUNK], fstore)
            items = [it for part in split_items.values() for it in part]
            stats = gradient_norms(model, items, device=device)
            gs.append(stats.g)
            if stats.overlap is not None:
                overlap, weight = overlap + stats.overlap * len(items), weight + len(items)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        return {"error": str(err)}
    return {
        "g": np.concatenate(gs),
        "overlap": overlap / weight if weight else None,
        "items": len(chosen),
        "labels": len(df),
        "mean_tokens": float(df["n_tokens"].mean()),
        "n_train": int((df["split"] == "train").sum()),
        "model_id": model_id,
    }


@st.cache_resource(show_spinner="Loading the model (once) ...")
def load_mllm(
    checkpoint: str, device: str, dtype: str, stamp: float, prompt_template: str | None = None
):
    """The checkpoint's adapter (any supported family), once per process and ``stamp``."""
    from evocomp.mllm.loader import load_mllm as load

    return load(checkpoint, device=device, dtype=dtype, prompt_template=prompt_template)
