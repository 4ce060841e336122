"""Label audit: suspect labels, run health, keep/drop imbalance, GHM advice, params.yaml edits.

Pure functions over a table of per-label *facts* (one row per stored label, numeric columns
only: ``run_id, sample_id, status, k, n_tokens, n_groups, loss, full_loss, margin, agreement,
converged_gen, last_gen, qtype, model_id, run_created``); the dashboard (``dashboards/``)
queries the store and presents what these return.

A label is *suspect* when the search gives little reason to trust it (EvoComp paper, Sec. 3:
the label is the best mask a finite GA found):

* small margin: the runner-up of the final elite is almost as good (``margin < min_margin``);
* low agreement: independent seeds found different masks (mean Jaccard ``< min_agreement``);
* large excess: the label's answer loss exceeds the full-token loss by more than ``max_excess``;
* not converged: the best mask was still improving in the last generation.

Each fired reason has a severity in [0.5, 1] (how far past its threshold); the suspect score is
their weighted sum. A run's *health* is ``1 - (sum over done labels of min(score, 1) + failed)
/ (done + failed)``: 1 when no label is suspect and none failed, 0 when every label is a strong
suspect or failed.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from evocomp.config import ParamsError, TrainParams, parse_params


@dataclass(frozen=True)
class SuspectRules:
    """Thresholds of the four suspect reasons and their weights in the score."""

    min_margin: float = 0.01  # nats: a runner-up this close makes the choice arbitrary
    min_agreement: float = 0.5  # Jaccard across seeds (only when label.seeds > 1)
    max_excess: float = 0.5  # nats above the full-token loss: the label loses the answer
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.5)  # margin, agr, excess, conv


REASONS = ("margin", "agreement", "excess", "not_converged")


def _severity(depth: pd.Series) -> pd.Series:
    """0.5 just past a threshold, 1.0 at twice as far or more."""
    return 0.5 + 0.5 * depth.clip(0.0, 1.0)


def score_suspects(facts: pd.DataFrame, rules: SuspectRules = SuspectRules()) -> pd.DataFrame:
    """``facts`` with ``excess, score, reasons, suspect`` (and one column per reason) added.

    Failed labels are never suspects (they are failures). Rows are ranked by score, highest
    first; ties keep the input order.
    """
    df = facts.copy()
    done = df["status"] == "done"
    df["excess"] = df["loss"] - df["full_loss"]
    margin = df["margin"].astype(float)
    agreement = df["agreement"].astype(float)
    fired = {
        "margin": done & (margin < rules.min_margin),
        "agreement": done & (agreement < rules.min_agreement),
        "excess": done & (df["excess"] > rules.max_excess),
        "not_converged": done
        & (df["last_gen"].fillna(0) > 0)
        & (df["converged_gen"] == df["last_gen"]),
    }
    depth = {
        "margin": (rules.min_margin - margin) / max(rules.min_margin, 1e-12),
        "agreement": (rules.min_agreement - agreement) / max(rules.min_agreement, 1e-12),
        "excess": (df["excess"] - rules.max_excess) / max(rules.max_excess, 1e-12),
        "not_converged": pd.Series(1.0, index=df.index),
    }
    score = pd.Series(0.0, index=df.index)
    for name, weight in zip(REASONS, rules.weights, strict=True):
        sev = _severity(depth[name].fillna(0.0)).where(fired[name], 0.0)
        df[f"r_{name}"] = sev
        score += weight * sev
    df["score"] = score.round(4)
    df["suspect"] = pd.concat(fired, axis=1).any(axis=1)
    df["reasons"] = [", ".join(n for n in REASONS if fired[n].iloc[i]) for i in range(len(df))]
    return df.sort_values("score", ascending=False, kind="stable")


def run_health(scored: pd.DataFrame) -> pd.DataFrame:
    """Per run: done, failed, suspects and health (see the module docstring), oldest run first."""
    if scored.empty:
        return pd.DataFrame(columns=["run_id", "done", "failed", "suspects", "health"])
    df = scored.assign(
        is_done=scored["status"] == "done",
        is_failed=scored["status"] == "failed",
        penalty=scored["score"].clip(upper=1.0).where(scored["status"] == "done", 0.0),
    )
    g = df.groupby("run_id", sort=True)
    out = pd.DataFrame(
        {
            "done": g["is_done"].sum(),
            "failed": g["is_failed"].sum(),
            "suspects": g["suspect"].sum(),
            "penalty": g["penalty"].sum(),
        }
    )
    total = (out["done"] + out["failed"]).clip(lower=1)
    out["health"] = (1.0 - (out["penalty"] + out["failed"]) / total).round(4)
    return out.drop(columns="penalty").reset_index()


def latest_per_sample(facts: pd.DataFrame) -> pd.DataFrame:
    """Done labels, one per sample from its most recent run (what the Parquet export keeps)."""
    done = facts[facts["status"] == "done"]
    done = done.sort_values(["run_created", "run_id"], kind="stable")
    return done.drop_duplicates("sample_id", keep="last")


def before_after(facts: pd.DataFrame) -> pd.DataFrame:
    """Samples labelled in several runs: the oldest (before) vs the newest (after) done label."""
    done = facts[facts["status"] == "done"].sort_values(["run_created", "run_id"], kind="stable")
    multi = done[done.duplicated("sample_id", keep=False)]
    if multi.empty:
        return pd.DataFrame(columns=["sample_id", "runs", "loss_before", "loss_after", "delta"])
    g = multi.groupby("sample_id", sort=True)
    out = pd.DataFrame(
        {
            "runs": g["run_id"].nunique(),
            "loss_before": g["loss"].first(),
            "loss_after": g["loss"].last(),
            "margin_before": g["margin"].first(),
            "margin_after": g["margin"].last(),
        }
    )
    out["delta"] = out["loss_after"] - out["loss_before"]
    return out.reset_index()


def keep_stats(labels: pd.DataFrame) -> dict[str, Any]:
    """Keep/drop balance of done labels: overall, per question type and per number of groups."""
    done = labels[labels["status"] == "done"]
    kept, tokens = float(done["k"].sum()), float(done["n_tokens"].sum())

    def by(col: str) -> pd.DataFrame:
        g = done.assign(**{col: done[col].fillna("?") if col == "qtype" else done[col]})
        g = g.groupby(col, sort=True).agg(
            labels=("k", "size"), kept=("k", "sum"), tokens=("n_tokens", "sum")
        )
        g["keep_ratio"] = g["kept"] / g["tokens"].clip(lower=1)
        return g.reset_index()

    return {
        "labels": len(done),
        "keep_ratio": kept / tokens if tokens else None,
        "by_qtype": by("qtype"),
        "by_groups": by("n_groups"),
        "kept_fraction": (done["k"] / done["n_tokens"].clip(lower=1)).rename("kept_fraction"),
    }


def keep_by_group_size(rows: Iterable[tuple[list[int], list[int]]]) -> pd.DataFrame:
    """Keep rate of tokens by the size of their vocabulary group, from (kept, groups) pairs."""
    tokens: dict[int, int] = {}
    kept_n: dict[int, int] = {}
    for kept, groups in rows:
        sizes = np.bincount(np.asarray(groups, dtype=np.int64)) if len(groups) else np.zeros(0)
        size_of = sizes[np.asarray(groups, dtype=np.int64)] if len(groups) else sizes
        for s, n in zip(*np.unique(size_of, return_counts=True), strict=True):
            tokens[int(s)] = tokens.get(int(s), 0) + int(n)
        for t in kept:
            s = int(size_of[t])
            kept_n[s] = kept_n.get(s, 0) + 1
    df = pd.DataFrame(
        {
            "group_size": sorted(tokens),
            "tokens": [tokens[s] for s in sorted(tokens)],
            "kept": [kept_n.get(s, 0) for s in sorted(tokens)],
        }
    )
    df["keep_rate"] = df["kept"] / df["tokens"].clip(lower=1)
    return df


# ---- GHM-C settings from the compressor's gradient norms ------------------------------------

FINE_BINS = 60  # divisible by every candidate bin count, so coarse regions are sums of fine ones
BIN_CHOICES = (10, 20, 30)  # mmdetection's default, and the GHM paper's best (30)
CONCENTRATED = 0.5  # one region holding more than this share of tokens is "concentrated"
MIN_PER_REGION = 100  # tokens per region per batch below which counts are noisy
PAPER_MOMENTUM = 0.75  # Li et al. (AAAI 2019), GHM-C


@dataclass(frozen=True)
class GradStats:
    """Gradient norms ``g = |sigmoid(logit) - y|`` of valid tokens and the kept/dropped overlap."""

    g: np.ndarray  # (M,) over every real visual token of the items
    overlap: float | None  # mean cos(mean kept hidden, mean dropped hidden) over items


def gradient_norms(model, items, batch_size: int = 64, device: str = "cpu") -> GradStats:
    """GHM-C's gradient norm of every token and the feature overlap, under ``model`` (no grad).

    Args:
        model: a ``TokenCompressor`` in eval mode, on ``device``.
        items: ``compressor.Item`` list (visual (N, D), grid_pos (N, 2), text (T, D), target (N,)).
    """
    import torch

    from evocomp.compressor import collate
    from evocomp.losses import cosine_separation

    gs, cos, weights = [], 0.0, 0
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            b = collate(items[s : s + batch_size], device=device)
            out = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
            g = (out.logits.sigmoid() - b.hard).abs()  # (B, N)
            gs.append(g[b.visual_mask].float().cpu().numpy())
            n = b.visual.shape[0]
            cos += float(cosine_separation(out.hidden, b.hard, b.visual_mask)) * n
            weights += n
    g = np.concatenate(gs) if gs else np.zeros(0)
    return GradStats(g, cos / weights if weights else None)


def region_shares(g: np.ndarray, bins: int) -> np.ndarray:
    """(bins,) share of the tokens in each equal region of [0, 1], as GHM-C cuts it."""
    counts = np.histogram(np.clip(g, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0]
    return counts / max(1, counts.sum())


@dataclass(frozen=True)
class Recommendation:
    ghm_bins: int
    ghm_momentum: float
    cos_alpha: float
    reasons: tuple[str, ...]

    def updates(self) -> dict[str, Any]:
        return {
            "ghm_bins": self.ghm_bins,
            "ghm_momentum": self.ghm_momentum,
            "cos_alpha": self.cos_alpha,
        }


def recommend_ghm(
    g: np.ndarray | None,
    overlap: float | None,
    current: TrainParams,
    mean_tokens: float,
    n_train: int,
) -> Recommendation:
    """GHM-C bins and momentum and the cosine weight, each with the reason.

    * bins: the fewest of 10/20/30 at which no region of the g histogram holds more than half
      the tokens (a region's tokens share one weight, so a concentrated easy mass needs a finer
      cut to be told apart); 30 when even that is concentrated.
    * momentum: 0.75 (the GHM paper's) when a batch gives fewer than 100 tokens per region,
      since per-batch region counts are then noisy; else 0.
    * cos_alpha: from the overlap of kept vs dropped hidden states (cosine of their means):
      >= 0.9 they are barely apart, 0.3; >= 0.6, 0.1; else 0.05 (already separated).
    Without a compressor (``g`` None) bins and alpha stay as they are.
    """
    reasons = []
    bins = current.ghm_bins
    if g is None or len(g) == 0:
        reasons.append(f"bins: no compressor gradient norms to judge by; keeping {bins}")
    else:
        fine = region_shares(g, FINE_BINS)
        tops = {b: fine.reshape(b, FINE_BINS // b).sum(1).max() for b in BIN_CHOICES}
        bins = next((b for b in BIN_CHOICES if tops[b] <= CONCENTRATED), BIN_CHOICES[-1])
        lo = (BIN_CHOICES[0], tops[BIN_CHOICES[0]])
        if bins == BIN_CHOICES[0]:
            reasons.append(
                f"bins: at {lo[0]} bins the fullest region holds {lo[1]:.0%} of the "
                f"tokens: the histogram is spread, {bins} bins suffice"
            )
        else:
            reasons.append(
                f"bins: at {lo[0]} bins one region holds {lo[1]:.0%} of the tokens "
                f"(concentrated); at {bins} bins the fullest holds {tops[bins]:.0%}, so "
                "GHM-C can tell the easy mass apart"
            )
    per_batch = min(current.batch_size, max(n_train, 1)) * mean_tokens
    per_region = per_batch / bins
    if per_region < MIN_PER_REGION:
        momentum = PAPER_MOMENTUM
        reasons.append(
            f"momentum: a batch gives ~{per_region:.0f} tokens per region (< "
            f"{MIN_PER_REGION}): noisy counts, smoothed across batches with "
            f"{momentum} as in the GHM paper"
        )
    else:
        momentum = 0.0
        reasons.append(
            f"momentum: a batch gives ~{per_region:.0f} tokens per region: counts "
            "are stable, no momentum needed"
        )
    alpha = current.cos_alpha
    if overlap is None or not math.isfinite(overlap):
        reasons.append(f"cos_alpha: no kept/dropped feature overlap measured; keeping {alpha}")
    else:
        alpha = 0.3 if overlap >= 0.9 else 0.1 if overlap >= 0.6 else 0.05
        state = (
            "barely apart"
            if overlap >= 0.9
            else "partly apart"
            if overlap >= 0.6
            else "already well apart"
        )
        reasons.append(
            f"cos_alpha: kept and dropped hidden states have cosine {overlap:.2f} "
            f"({state}): alpha {alpha}"
        )
    return Recommendation(bins, momentum, alpha, tuple(reasons))


# ---- editing the train: section of params.yaml in place -------------------------------------

_KEY_LINE = re.compile(
    r"^(?P<head>(?P<indent>[ ]+)(?P<key>\w+):[ ]*)(?P<value>[^#\n]*?)"
    r"(?P<gap>[ ]*)(?P<comment>#.*)?$"
)


@dataclass(frozen=True)
class ParamsUpdate:
    """A validated edit of params.yaml: the text before and after, and their unified diff."""

    old_text: str
    new_text: str
    diff: str


def _scalar(value: Any) -> str:
    """A YAML scalar that PyYAML reads back as the same value (1e-05 needs a dot in YAML 1.1)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        return f"{mantissa}.0e{exp}" if e and "." not in mantissa else text
    return str(value)


def _train_block(lines: list[str], source: str) -> tuple[int, int] | None:
    """[start, end) line indices of the top-level ``train:`` block's body, None if absent."""
    start = next((i for i, ln in enumerate(lines) if re.match(r"^train:\s*(#.*)?$", ln)), None)
    if start is None:
        if any(re.match(r"^train:", ln) for ln in lines):
            raise ParamsError(f"{source}: the train: section is written inline; edit it by hand")
        return None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " #"):
        end += 1
    # trailing blank lines and top-level comments belong to what follows
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1][0] == "#"):
        end -= 1
    return start + 1, end


def propose_train_update(
    text: str, updates: Mapping[str, Any], source: str = "params.yaml"
) -> ParamsUpdate:
    """Set ``train.<key>`` values in params.yaml text, keeping comments and order.

    Existing keys are edited in place (an inline comment keeps its column); missing keys are
    appended to the ``train:`` block. The result is validated with ``parse_params``.

    Raises:
        ParamsError: an unknown key, an invalid value (the message names the key), or a
            profile that overrides the key so the edit would have no effect.
    """
    unknown = sorted(set(updates) - set(TrainParams.model_fields))
    if unknown:
        raise ParamsError(
            f"{source}: unknown train parameter(s) {unknown} (known: "
            f"{', '.join(TrainParams.model_fields)})"
        )
    lines = text.splitlines()
    block = _train_block(lines, source)
    if block is None:
        lines.append("train:")
        block = (len(lines), len(lines))
    start, end = block
    matches = {i: m for i in range(start, end) if (m := _KEY_LINE.match(lines[i]))}
    indent = next((m["indent"] for m in matches.values()), "  ")
    todo = dict(updates)
    for i, m in matches.items():
        if m["indent"] != indent or m["key"] not in todo:
            continue  # a nested line, or a key left as it is
        head = m["head"] + _scalar(todo.pop(m["key"]))
        if m["comment"]:
            col = len(m["head"]) + len(m["value"]) + len(m["gap"])
            head += " " * max(1, col - len(head)) + m["comment"]
        lines[i] = head
    lines[end:end] = [f"{indent}{key}: {_scalar(v)}" for key, v in todo.items()]
    new_text = "\n".join(lines) + ("\n" if text.endswith("\n") or not text else "")
    try:
        raw = yaml.safe_load(new_text) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: the edit would not be valid YAML: {err}") from None
    params = parse_params(raw, source)
    for key, value in updates.items():
        if getattr(params.train, key) != getattr(TrainParams(**{key: value}), key):
            raise ParamsError(
                f"{source}: profile {params.profile!r} overrides train.{key}; "
                f"edit profiles.{params.profile}.train instead"
            )
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            fromfile=source,
            tofile=source,
        )
    )
    return ParamsUpdate(text, new_text, diff)


def write_params(path: str | Path, update: ParamsUpdate) -> None:
    """Write ``update.new_text`` to ``path`` atomically, only if the file still holds old_text.

    Raises:
        ParamsError: the file changed since the diff was shown.
    """
    path = Path(path)
    current = path.read_text() if path.exists() else ""
    if current != update.old_text:
        raise ParamsError(f"{path} changed since the diff was shown; review the new diff")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(update.new_text)
    os.replace(tmp, path)
