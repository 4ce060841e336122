"""The encoder-only token scorer: one keep-logit per visual token, from visual and text context.

As in the EvoComp paper: one transformer layer shaped like the LLM's layers but with
bidirectional attention over [visual tokens; question tokens], an extra skip connection around
it, and a linear classifier. Inference keeps the top-k tokens for any ratio, so one compressor
serves every budget. Training (``fit_compressor``) is GHM-C + alpha x cosine separation
(``evocomp.losses``), with early stopping on the validation loss.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from evocomp.config import TrainParams
from evocomp.losses import GHMC, compressor_loss

# Logit given to padded visual positions: finite (no NaN in BCE or sigmoid), sigmoid ~ 0, and far
# below any real logit, so padding sorts last in top-k. Losses mask it out with `valid` anyway.
PAD_LOGIT = -1e4

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def default_heads(width: int) -> int:
    """4 heads when they divide the width, else the largest divisor of the width <= 8."""
    if width % 4 == 0:
        return 4
    return max(h for h in range(1, 9) if width % h == 0)


@dataclass
class CompressorConfig:
    """Shape of the compressor; the defaults follow the LLM it serves (paper default)."""

    dim: int  # D, the LLM hidden size (visual tokens come out of the projector with it)
    width: int | None = None  # None -> dim: the layer is shaped like the LLM's layers
    layers: int = 1  # the paper uses one layer
    heads: int | None = None  # None -> default_heads(width); pass the LLM's when known
    ffn: int | None = None  # None -> 4 * width; pass the LLM's intermediate size when known
    max_grid: int = 64  # largest patch-grid side, for the row/col position embeddings
    use_text: bool = True  # False: the "compressor without text" ablation
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.width = self.width or self.dim
        self.heads = self.heads or default_heads(self.width)
        self.ffn = self.ffn or 4 * self.width
        if self.width % self.heads:
            raise ValueError(
                f"compressor width {self.width} is not divisible by heads {self.heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown compressor config keys: {sorted(unknown)}")
        return cls(**d)


class CompressorOutput(NamedTuple):
    logits: Tensor  # (B, N) keep-logits; PAD_LOGIT at padded positions
    hidden: Tensor  # (B, N, width) what the classifier reads (for the cosine term)


class TokenCompressor(nn.Module):
    """Scores visual tokens for keeping (EvoComp paper, Sec. 4)."""

    def __init__(self, cfg: CompressorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        assert width is not None and cfg.heads is not None and cfg.ffn is not None
        self.proj = nn.Linear(cfg.dim, width) if width != cfg.dim else nn.Identity()
        self.row_emb = nn.Embedding(cfg.max_grid, width)
        self.col_emb = nn.Embedding(cfg.max_grid, width)
        self.type_emb = nn.Embedding(2, width)  # 0 visual, 1 text
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                cfg.heads,
                cfg.ffn,
                cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, 1)
        for emb in (self.row_emb, self.col_emb, self.type_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(
        self,
        visual: Tensor,
        grid_pos: Tensor,
        visual_mask: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> CompressorOutput:
        """Keep-logits and features of every visual token.

        Args:
            visual: (B, N, D) projected visual tokens.
            grid_pos: (B, N, 2) long (row, col) of each token in the patch grid.
            visual_mask: (B, N) bool, True for real tokens; None means all real.
            text: (B, T, D) the question's token embeddings (never the answer); ignored when
                ``cfg.use_text`` is False.
            text_mask: (B, T) bool, True for real tokens; None means all real.
        """
        B, N, _ = visual.shape
        if visual_mask is None:
            visual_mask = torch.ones(B, N, dtype=torch.bool, device=visual.device)
        if grid_pos.numel() and (grid_pos.min() < 0 or grid_pos.max() >= self.cfg.max_grid):
            raise ValueError(
                f"grid positions must lie in [0, {self.cfg.max_grid}); got "
                f"[{int(grid_pos.min())}, {int(grid_pos.max())}] (max_grid of this compressor)"
            )
        v = self.proj(visual) + self.row_emb(grid_pos[..., 0]) + self.col_emb(grid_pos[..., 1])
        v = v + self.type_emb.weight[0]  # (B, N, W)
        x, mask = v, visual_mask
        if self.cfg.use_text and text is not None and text.shape[1] > 0:
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            t = self.proj(text) + self.type_emb.weight[1]  # (B, T, W)
            x, mask = torch.cat([v, t], 1), torch.cat([visual_mask, text_mask], 1)
        # A row with nothing to attend to would softmax over -inf only (NaN); let it attend to
        # its padding instead; its outputs are masked below.
        pad = ~mask & mask.any(1, keepdim=True)  # (B, N+T) True = ignore
        h = x
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        h = self.norm(h + x)[:, :N]  # the extra skip connection: layer output + layer input
        logits = self.classifier(h).squeeze(-1).masked_fill(~visual_mask, PAD_LOGIT)  # (B, N)
        return CompressorOutput(logits, h)


def select_topk(logits: Tensor, k: int | None = None, ratio: float | None = None) -> Tensor:
    """Indices of the k highest logits, in ascending (original token) order.

    Args:
        logits: (N,) or (B, N) keep-logits.
        k: how many to keep, 1..N; or
        ratio: keep ratio in (0, 1]; k = max(1, round(ratio * N)).

    Returns:
        (k,) or (B, k) LongTensor.
    """
    N = logits.shape[-1]
    if (k is None) == (ratio is None):
        raise ValueError("select_topk: pass exactly one of k or ratio")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio {ratio} is outside (0, 1]")
        k = max(1, round(ratio * N))
    assert k is not None
    if not 1 <= k <= N:
        raise ValueError(f"select_topk: k={k} is outside 1..{N} (number of tokens)")
    return logits.topk(k, dim=-1).indices.sort(dim=-1).values


def save_compressor(model: TokenCompressor, directory: str | Path, extra: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` (config + ``extra``) into ``directory``.

    Each file is written under a temporary name and renamed, so a crash never leaves a half
    written compressor behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        meta = json.dumps({"config": model.cfg.to_dict(), "extra": extra}, indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"save_compressor: `extra` must be JSON-serialisable: {err}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_c = directory / (WEIGHTS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_w))
    tmp_c.write_text(meta + "\n")
    os.replace(tmp_w, directory / WEIGHTS_FILE)
    os.replace(tmp_c, directory / CONFIG_FILE)


def load_compressor(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[TokenCompressor, dict[str, Any]]:
    """Load a compressor written by ``save_compressor``; returns ``(model in eval mode, extra)``."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"no compressor at {directory}: {directory / name} is missing "
                "(train one with `evocomp train`)"
            )
    meta = json.loads((directory / CONFIG_FILE).read_text())
    model = TokenCompressor(CompressorConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.to(device).eval(), meta.get("extra", {})


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Item:
    """One labelled sample, as the compressor sees it (no answer: it is never an input)."""

    visual: Tensor  # (N, D) float, projected visual tokens
    grid_pos: Tensor  # (N, 2) long, (row, col)
    text: Tensor  # (T, D) float, question token embeddings
    target: Tensor  # (N,) float, hard 0/1 label
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
    """Per item: fraction of the top-k predictions that are labelled kept, k = label size."""
    out = []
    for row, label, valid in zip(logits, batch.hard, batch.visual_mask, strict=True):
        k = int(label[valid].sum())
        if k == 0:
            continue
        top = select_topk(row[valid], k=k)
        out.append(float(label[valid][top].sum()) / k)
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


def fit_compressor(
    train: Sequence[Item],
    val: Sequence[Item],
    params: TrainParams,
    device: str | torch.device = "cpu",
    log: Callable[[dict[str, Any]], None] | None = None,
    *,
    llm_heads: int | None = None,
    llm_ffn: int | None = None,
) -> tuple[TokenCompressor, list[dict[str, Any]]]:
    """Train a compressor on labelled items; early stopping on the validation loss.

    Loss: GHM-C(params.ghm_bins, params.ghm_momentum) (BCE when ``params.loss == "bce"``) +
    ``params.cos_alpha`` x cosine separation, fitting soft labels when ``params.soft_labels``.
    The best epoch's weights are restored. Seeded by ``params.seed``; the caller's global CPU RNG
    state is left untouched. With an empty ``val``, the training loss is monitored instead.

    Args:
        train, val: labelled items (variable N and T).
        params: the ``train`` section of params.yaml.
        device: where to train.
        log: called with each epoch's history row.
        llm_heads, llm_ffn: the LLM's head count and intermediate size, used when ``params``
            leaves heads unset (the layer is "shaped like the LLM's").

    Returns:
        ``(model in eval mode, history)``, history one dict per epoch:
        ``epoch, train_loss, train_cls, train_cos, val_loss, val_precision`` (``val_*`` None
        without validation items). ``val_precision`` is top-k precision at the label's own k,
        which at that k equals recall.
    """
    if not train:
        raise ValueError("fit_compressor: no training items (are the labels empty?)")
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
        ghm = (
            GHMC(params.ghm_bins, params.ghm_momentum).to(device) if params.loss == "ghm" else None
        )
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
                    out.logits, b.target, out.hidden, b.visual_mask, ghm, params.cos_alpha
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
            history.append(row)
            if log is not None:
                log(row)
            # Early stopping watches what selection needs: by default top-k precision at the
            # label's k (GHM-C re-weights easy tokens away, so a validation loss can rise while
            # the ranking improves), ties to the lower validation BCE; `monitor: loss` watches
            # the BCE alone (precision at a small k, e.g. 4 tokens, moves in coarse steps).
            if val and params.monitor == "loss":
                monitored = row["val_loss"]
            elif val and row["val_precision"] is not None:
                monitored = -row["val_precision"] + 1e-6 * row["val_loss"]
            else:
                monitored = row["train_loss"]
            if monitored < best:
                best, best_state, stale = monitored, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= params.patience:
                    break
    model.load_state_dict(best_state)
    return model.eval(), history
