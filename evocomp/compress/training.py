"""The `train` stage: a frozen label set + the cached features -> a saved compressor.

evocomp train --labels data/labels/labels.parquet --out models/compressor
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence, Set
from pathlib import Path

import pandas as pd
import torch

from evocomp.compress.fit import Item, best_epoch, epoch_score, fit_compressor
from evocomp.compress.model import TokenCompressor, keep_logits, save_compressor, select_topk
from evocomp.config import TrainParams
from evocomp.data.samples import selection_share
from evocomp.features.cache import FeatureStore
from evocomp.labelset import label_set_hash, load_label_set
from evocomp.tolerance import loss_on_grid


def items_from_labels(
    df: pd.DataFrame | Sequence[pd.DataFrame], fstore: FeatureStore, held: Set[str] = frozenset()
) -> dict[str, list[Item]]:
    """Items per split; refuses labels of another model or with mismatched token counts.
    Samples whose id is in ``held`` (the train split's selection share) go to ``"select"``.

    Several label sets of the same samples (one per budget, ``evocomp label --keep-ratio``)
    give one graded target per token: the fraction of the sets whose label keeps it (and the
    mean of their soft labels), so tokens every budget keeps rank first, then those only the
    larger budgets add -- one compressor ranks tokens for every ratio it is evaluated at.
    """
    dfs = [df] if isinstance(df, pd.DataFrame) else list(df)
    if not dfs:
        raise ValueError("no label set given")
    for d in dfs:
        other = sorted(set(d["model_id"]) - {fstore.model_id})
        if other:
            raise ValueError(
                f"the label set was made with model {other[0]!r}, the features are of "
                f"{fstore.model_id!r}: relabel with this model or point --model at that one"
            )
    rows = [{r.sample_id: r for r in d.itertuples(index=False)} for d in dfs]
    for i, other in enumerate(rows[1:], start=1):
        if other.keys() != rows[0].keys():
            missing = sorted(rows[0].keys() ^ other.keys())
            raise ValueError(
                f"label sets 1 and {i + 1} cover different samples (e.g. {missing[0]}, in one "
                "only): label the same samples at every budget"
            )
    out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for sample_id in dfs[0]["sample_id"]:
        feats = fstore.get(sample_id)
        n = feats.tokens.shape[0]
        targets, softs = [], []
        for by_id in rows:
            row = by_id[sample_id]
            if int(row.n_tokens) != n:
                raise ValueError(
                    f"sample {sample_id}: label has {row.n_tokens} tokens, features have {n}"
                )
            target = torch.zeros(n)
            target[torch.as_tensor(list(row.kept), dtype=torch.long)] = 1.0
            targets.append(target)
            if row.soft is not None:
                softs.append(torch.as_tensor(list(row.soft), dtype=torch.float32))
        split = "select" if sample_id in held else rows[0][sample_id].split
        out.setdefault(split, []).append(
            Item(
                visual=feats.tokens,
                grid_pos=feats.cells,
                text=feats.text,
                target=torch.stack(targets).mean(0),
                soft=torch.stack(softs).mean(0) if len(softs) == len(rows) else None,
            )
        )
    return out


def val_cases(val: pd.DataFrame, fstore: FeatureStore) -> list[tuple]:
    """``(sample, features, k)`` of each row of a label set's validation split (the rows carry
    the question, answer and image of :func:`evocomp.labelset.load_label_set`)."""
    from evocomp.data.samples import Sample

    return [
        (
            Sample(row.sample_id, Path(row.image), row.question, row.answer, row.split),
            fstore.get(row.sample_id),
            int(row.k),
        )
        for row in val.itertuples(index=False)
    ]


def answer_loss_monitor(
    cases: Sequence[tuple], mllm, objective: str = "answer"
) -> Callable[[TokenCompressor], float]:
    """``train.monitor: answer_loss``: a model's mean answer loss over ``cases`` (``(sample,
    features, k)``, :func:`val_cases`) when the MLLM sees only the model's top k tokens, k =
    each label's own size.

    The loss is the labels' own (``label.objective``: answer cross-entropy, or KL from the
    all-token answer), taken as the search takes it (:func:`evocomp.labeling.fitness.fitness_fn`,
    on the loss grid), so the number is comparable with the labels' ``loss`` and ``full_loss``
    columns. One forward per sample (scenes-vqa's 117: a scenes epoch, training included, took
    3.7 s alone on 2 cores).
    """
    from evocomp.labeling.fitness import fitness_fn

    scored = [(feats, k, fitness_fn(mllm, sample, feats, objective)) for sample, feats, k in cases]
    if not scored:
        raise ValueError("train.monitor answer_loss: no validation samples to score")

    def score(model: TokenCompressor) -> float:
        device = next(model.parameters()).device
        losses = []
        with torch.no_grad():
            for feats, k, fitness in scored:
                logits = keep_logits(
                    model, feats.tokens.to(device), feats.cells.to(device), feats.text.to(device)
                )
                kept = select_topk(logits.cpu(), k=min(k, logits.shape[-1]))
                losses.append(loss_on_grid(float(fitness(kept[None])[0])))
        return loss_on_grid(sum(losses) / len(losses))

    return score


def train_compressor(
    labels: str | Path | Sequence[str | Path],
    features: str | Path,
    info: dict,
    params: TrainParams,
    out: str | Path,
    device: str = "cpu",
    log: Callable[[dict], None] | None = None,
    mllm=None,
    objective: str = "answer",
) -> tuple[list[dict], dict]:
    """Fit on the train split (early stopping on val), save to ``out``; ``(history, summary)``.

    ``train.select_share`` > 0 leaves that share of the train split's images out of fitting
    (:func:`evocomp.data.samples.held_for_selection`): neither fitted nor early-stopped on,
    they are where ``evaluate.choose: select_answer_loss`` compares compressors.

    ``labels``: one label set, or several of the same samples at different budgets (see
    :func:`items_from_labels`); the first one names the summary's ``label_set_hash``.
    ``mllm`` (the labels' model, loaded) scores ``train.monitor: answer_loss`` with the labels'
    ``objective``. ``train.restarts`` > 1 fits from seeds ``seed``, ``seed + 1``, ... and keeps
    the run whose restored epoch scores best on the monitor (the lower seed on ties); the
    history is that run's, each run's seed, epoch and score are in ``summary["restarts"]``.
    """
    paths = [labels] if isinstance(labels, str | Path) else list(labels)
    dfs = [load_label_set(p) for p in paths]
    fstore = FeatureStore(features, info["model_id"])
    held = {r.sample_id for r in selection_share(dfs[0].itertuples(), params.select_share)}
    items = items_from_labels(dfs, fstore, held)
    if not items["train"]:
        raise ValueError(f"{labels}: no train-split labels to train on")
    val_rows = dfs[0][dfs[0]["split"] == "val"]
    answer_loss = None
    if params.monitor == "answer_loss" and items["val"]:
        if mllm is None:
            raise ValueError("train.monitor answer_loss needs the labels' MLLM (--model)")
        answer_loss = answer_loss_monitor(val_cases(val_rows, fstore), mllm, objective)
    runs, chosen = [], None
    for seed in range(params.seed, params.seed + params.restarts):
        run_params = params.model_copy(update={"seed": seed})
        model, history = fit_compressor(
            items["train"],
            items["val"],
            run_params,
            device,
            None if log is None else lambda row, seed=seed: log({**row, "seed": seed}),
            llm_heads=info.get("heads"),
            llm_ffn=info.get("ffn"),
            answer_loss=answer_loss,
        )
        kept = best_epoch(history, params.monitor)  # the epoch fit_compressor restored
        score = epoch_score(kept, params.monitor)
        runs.append({"seed": seed, "best_epoch": kept["epoch"], "score": score})
        if chosen is None or score < chosen[0]:
            chosen = (score, seed, model, history, kept)
    _, seed, model, history, best = chosen
    summary = {
        "label_set": str(paths[0]),
        "label_set_hash": label_set_hash(dfs[0]),
        "label_sets": [str(p) for p in paths],
        "label_set_hashes": [label_set_hash(d) for d in dfs],
        # the share of its tokens a label keeps (the first set's mean k / N): the size up to
        # which the compressor's ranking was trained; `evocomp_fill` fills beyond it
        "label_keep_ratio": round(float((dfs[0]["k"] / dfs[0]["n_tokens"]).mean()), 4),
        "model_id": info["model_id"],
        "train_samples": len(items["train"]),
        "val_samples": len(items["val"]),
        **({"select_samples": len(held)} if params.select_share else {}),
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "val_loss": best["val_loss"],
        "val_precision": best["val_precision"],
        # the settings that retrain this very model (the kept run's seed, no restarts; also
        # what a single training saved before restarts existed, so its bytes are unchanged)
        # (select_share only when set: a compressor trained without one keeps its bytes)
        "params": json.loads(
            params.model_copy(update={"seed": seed}).model_dump_json(
                exclude={"restarts"} | (set() if params.select_share else {"select_share"})
            )
        ),
    }
    if answer_loss is not None:
        # the yardsticks of val_answer_loss, in its units: the val labels' own mean loss (the
        # searched subsets) and the MLLM's with every token
        summary["val_answer_loss"] = best["val_answer_loss"]
        summary["val_label_loss"] = round(float(val_rows["loss"].mean()), 6)
        summary["val_full_loss"] = round(float(val_rows["full_loss"].mean()), 6)
    if params.restarts > 1:
        summary["seed"] = seed
        summary["restarts"] = runs
    save_compressor(model.cpu(), out, summary)
    # what a scorer that ranks at random reaches: the val labels' mean k / N (the yardstick for
    # val_precision, reported beside it; not in the compressor's config, which it does not shape)
    summary["val_precision_chance"] = chance_precision(items["val"])
    return history, summary


def chance_precision(items: Sequence[Item]) -> float | None:
    """Expected top-k precision of a random ranking: the mean share of its tokens a label keeps,
    over the items that keep any (as ``val_precision`` counts them); ``None`` without such
    items. A compressor near it has learnt next to nothing to rank by."""
    kept = [int((it.target > 0).sum()) for it in items]
    shares = [k / it.target.numel() for k, it in zip(kept, items, strict=True) if k]
    return sum(shares) / len(shares) if shares else None
