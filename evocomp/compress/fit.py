"""Training the compressor: batches of labelled samples, GHM-C + cosine loss, early stopping.

Loss: GHM-C (``evocomp.losses``; plain BCE or the focal loss as ablations) + alpha x cosine
separation of the kept and dropped hidden states, on hard labels or the elite's soft labels.
Early stopping watches ``train.monitor`` (validation top-k precision, validation BCE, or
the MLLM's answer loss on validation samples from the compressor's top k, scored by a
callback the caller builds: :func:`evocomp.compress.training.answer_loss_monitor`);
:func:`epoch_score` is the one rule for which epoch is best, used by the loop and by every
report of it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evocomp.compress.model import CompressorConfig, TokenCompressor, select_topk
from evocomp.config import TrainParams
from evocomp.losses import GHMC, SigmoidFocalLoss, compressor_loss


@dataclass
class Item:
    """One labelled sample, as the compressor sees it (no answer: it is never an input)."""

    visual: Tensor  # (N, D) float, projected visual tokens
    grid_pos: Tensor  # (N, 2) long, (row, col)
    text: Tensor  # (T, D) float, question token embeddings
    target: Tensor  # (N,) float, hard 0/1 label (graded: the fraction of budgets keeping it)
    soft: Tensor | None = None  # (N,) float in [0, 1], how often the elite kept each token


class Batch(NamedTuple):
    visual: Tensor  # (B, N, D)
    grid_pos: Tensor  # (B, N, 2)
    visual_mask: Tensor  # (B, N)
    text: Tensor  # (B, T, D)
    text_mask: Tensor  # (B, T)
    target: Tensor  # (B, N) what the loss fits (hard or soft)
    hard: Tensor  # (B, N) the hard label, for precision


def collate(items: Sequence[Item], soft: bool = False, device: str | torch.device = "cpu") -> Batch:
    """Pad items of variable N and T into one batch."""
    B = len(items)
    N = max(it.visual.shape[0] for it in items)
    T = max(it.text.shape[0] for it in items)
    D = items[0].visual.shape[1]
    visual = torch.zeros(B, N, D)
    grid_pos = torch.zeros(B, N, 2, dtype=torch.long)
    visual_mask = torch.zeros(B, N, dtype=torch.bool)
    text = torch.zeros(B, T, D)
    text_mask = torch.zeros(B, T, dtype=torch.bool)
    target = torch.zeros(B, N)
    hard = torch.zeros(B, N)
    for i, it in enumerate(items):
        n, t = it.visual.shape[0], it.text.shape[0]
        visual[i, :n], grid_pos[i, :n], visual_mask[i, :n] = it.visual, it.grid_pos, True
        text[i, :t], text_mask[i, :t] = it.text, True
        hard[i, :n] = it.target
        target[i, :n] = it.soft if soft and it.soft is not None else it.target
    return Batch(
        *(x.to(device) for x in (visual, grid_pos, visual_mask, text, text_mask, target, hard))
    )


def _check_items(items: Sequence[Item], dim: int, soft: bool, split: str) -> None:
    for i, it in enumerate(items):
        n = it.visual.shape[0]
        ok = (
            it.visual.ndim == 2
            and it.visual.shape[1] == dim
            and it.text.ndim == 2
            and it.text.shape[1] == dim
            and it.grid_pos.shape == (n, 2)
            and it.target.shape == (n,)
            and (it.soft is None or it.soft.shape == (n,))
        )
        if not ok:
            raise ValueError(
                f"{split} item {i}: expected visual (N, {dim}), grid_pos (N, 2), text (T, {dim}), "
                f"target (N,); got visual {tuple(it.visual.shape)}, grid_pos "
                f"{tuple(it.grid_pos.shape)}, text {tuple(it.text.shape)}, target {tuple(it.target.shape)}"
            )
        if soft and it.soft is None:
            raise ValueError(f"{split} item {i} has no soft label but train.soft_labels is true")


def _precision_at_label_k(logits: Tensor, batch: Batch) -> list[float]:
    """Per item: fraction of the top-k predictions that are labelled kept, k = label size.

    With graded targets (several budgets) a token counts as labelled when any budget keeps it.
    """
    out = []
    for row, label, valid in zip(logits, batch.hard, batch.visual_mask, strict=True):
        kept = label[valid] > 0
        k = int(kept.sum())
        if k == 0:
            continue
        top = select_topk(row[valid], k=k)
        out.append(float(kept[top].sum()) / k)
    return out


def _evaluate(
    model: TokenCompressor, items: Sequence[Item], params: TrainParams, device: str | torch.device
) -> tuple[float, float | None]:
    """Validation (BCE, precision at the label's own k).

    The monitored loss is the plain masked BCE against the training targets, not the GHM-C
    value: GHM-C re-normalises every batch by its own gradient density (each non-empty region
    weighs the same), so once most tokens are easy it is dominated by the few hard ones and does
    not decrease as the scorer improves; BCE is also comparable across the ghm/bce ablation.
    """
    model.eval()
    bce_sum, n_tokens, precisions = 0.0, 0, []
    with torch.no_grad():
        for s in range(0, len(items), params.batch_size):
            b = collate(items[s : s + params.batch_size], params.soft_labels, device)
            out = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
            bce = F.binary_cross_entropy_with_logits(out.logits, b.target, reduction="none")
            bce_sum += float((bce * b.visual_mask).sum())
            n_tokens += int(b.visual_mask.sum())
            precisions += _precision_at_label_k(out.logits, b)
    precision = sum(precisions) / len(precisions) if precisions else None
    return bce_sum / max(n_tokens, 1), precision


def epoch_score(row: dict[str, Any], monitor: str) -> float:
    """How good an epoch is for early stopping (lower is better): the one rule for "best".

    ``monitor="precision"`` watches what selection needs, top-k precision at the label's k
    (GHM-C re-weights easy tokens away, so a validation loss can rise while the ranking
    improves), ties to the lower validation BCE; ``monitor="loss"`` watches the validation
    BCE alone (precision at a small k, e.g. 4 tokens, moves in coarse steps);
    ``monitor="answer_loss"`` watches what the compressor is for, the MLLM's answer loss from
    its top k on the validation samples (the labels' own objective, on the loss grid), ties to
    the lower validation BCE. Without validation items the training loss is watched.
    """
    if row["val_loss"] is None:
        return row["train_loss"]
    if monitor == "loss":
        return row["val_loss"]
    if monitor == "answer_loss":
        if row.get("val_answer_loss") is None:
            raise ValueError("train.monitor answer_loss: the epoch has no val_answer_loss")
        return row["val_answer_loss"] + 1e-6 * row["val_loss"]
    if row["val_precision"] is None:
        return row["train_loss"]
    return -row["val_precision"] + 1e-6 * row["val_loss"]


def best_epoch(history: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    """The history row :func:`fit_compressor` restored: the lowest score, earliest on ties."""
    return min(history, key=lambda row: (epoch_score(row, monitor), row["epoch"]))


def classification_loss(params: TrainParams) -> nn.Module | None:
    """The keep/drop loss of ``params.loss``: a GHM-C or focal module, None for plain BCE."""
    if params.loss == "ghm":
        return GHMC(params.ghm_bins, params.ghm_momentum)
    if params.loss == "focal":
        return SigmoidFocalLoss(params.focal_gamma)
    return None


def fit_compressor(
    train: Sequence[Item],
    val: Sequence[Item],
    params: TrainParams,
    device: str | torch.device = "cpu",
    log: Callable[[dict[str, Any]], None] | None = None,
    *,
    llm_heads: int | None = None,
    llm_ffn: int | None = None,
    answer_loss: Callable[[TokenCompressor], float] | None = None,
) -> tuple[TokenCompressor, list[dict[str, Any]]]:
    """Train a compressor on labelled items, early-stopped on ``params.monitor``.

    Loss: :func:`classification_loss` of ``params.loss`` (GHM-C, BCE or focal) +
    ``params.cos_alpha`` x cosine separation, fitting soft labels when ``params.soft_labels``.
    The best epoch's weights (:func:`best_epoch`) are restored. Seeded by ``params.seed``; the caller's global CPU RNG
    state is left untouched. With an empty ``val``, the training loss is monitored instead.

    Args:
        train, val: labelled items (variable N and T).
        params: the ``train`` section of params.yaml.
        device: where to train.
        log: called with each epoch's history row.
        llm_heads, llm_ffn: the LLM's head count and intermediate size, used when ``params``
            leaves heads unset (the layer is "shaped like the LLM's").
        answer_loss: scores the model (in eval mode) on the validation samples after each
            epoch, as ``val_answer_loss``; required by ``params.monitor="answer_loss"``.

    Returns:
        ``(model in eval mode, history)``, history one dict per epoch:
        ``epoch, train_loss, train_cls, train_cos, val_loss, val_precision`` (``val_*`` None
        without validation items). ``val_precision`` is top-k precision at the label's own k,
        which at that k equals recall; with ``answer_loss``, also ``val_answer_loss``.
    """
    if not train:
        raise ValueError("fit_compressor: no training items (are the labels empty?)")
    if params.monitor == "answer_loss" and val and answer_loss is None:
        raise ValueError("train.monitor answer_loss needs the MLLM's answer-loss callback")
    dim = train[0].visual.shape[1]
    _check_items(train, dim, params.soft_labels, "train")
    _check_items(val, dim, params.soft_labels, "val")
    max_grid = 1 + max(
        (int(it.grid_pos.max()) for it in [*train, *val] if it.grid_pos.numel()), default=0
    )
    cfg = CompressorConfig(
        dim=dim,
        layers=params.layers,
        heads=params.heads or llm_heads,
        ffn=llm_ffn,
        max_grid=max_grid,
        use_text=params.use_text,
    )
    history: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        gen = torch.Generator().manual_seed(params.seed)
        model = TokenCompressor(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        criterion = classification_loss(params)
        if criterion is not None:
            criterion = criterion.to(device)
        best, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
        for epoch in range(1, params.epochs + 1):
            model.train()
            sums = {"total": 0.0, "cls": 0.0, "cos": 0.0}
            order = torch.randperm(len(train), generator=gen).tolist()
            for s in range(0, len(order), params.batch_size):
                chunk = [train[i] for i in order[s : s + params.batch_size]]
                b = collate(chunk, params.soft_labels, device)
                out = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
                loss, parts = compressor_loss(
                    out.logits, b.target, out.hidden, b.visual_mask, criterion, params.cos_alpha
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # GHM-C gives a lone token in a sparse region a large weight; clipping keeps
                # such a batch from throwing the scorer off
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                for key in sums:
                    sums[key] += parts[key] * len(chunk)
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": sums["total"] / len(train),
                "train_cls": sums["cls"] / len(train),
                "train_cos": sums["cos"] / len(train),
                "val_loss": None,
                "val_precision": None,
            }
            if val:
                row["val_loss"], row["val_precision"] = _evaluate(model, val, params, device)
                if answer_loss is not None:
                    row["val_answer_loss"] = answer_loss(model.eval())
            history.append(row)
            if log is not None:
                log(row)
            monitored = epoch_score(row, params.monitor)
            if monitored < best:
                best, best_state, stale = monitored, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= params.patience:
                    break
    model.load_state_dict(best_state)
    return model.eval(), history
