"""The encoder-only token scorer: one keep-logit per visual token, from visual and text context.

As in the EvoComp paper: one transformer layer shaped like the LLM's layers but with
bidirectional attention over [visual tokens; question tokens], an extra skip connection around
it, and a linear classifier. Inference keeps the top-k tokens for any ratio, so one compressor
serves every budget. Training is in :mod:`evocomp.compress.fit`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from evocomp.baselines import divprune_fill
from evocomp.tokens import keep_count

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
        ratio: keep ratio in (0, 1]; k = :func:`evocomp.tokens.keep_count` (ratio, N).

    Returns:
        (k,) or (B, k) LongTensor.
    """
    N = logits.shape[-1]
    if (k is None) == (ratio is None):
        raise ValueError("select_topk: pass exactly one of k or ratio")
    if ratio is not None:
        k = keep_count(ratio, N)
    assert k is not None
    if not 1 <= k <= N:
        raise ValueError(f"select_topk: k={k} is outside 1..{N} (number of tokens)")
    return logits.topk(k, dim=-1).indices.sort(dim=-1).values


@torch.no_grad()
def keep_logits(model: TokenCompressor, visual: Tensor, cells: Tensor, text: Tensor) -> Tensor:
    """One image's keep-logits ``(N,)`` from its tokens ``(N, D)``, their cells ``(N, 2)``
    and the question's embeddings ``(T, D)``: a batch of one, as the evaluation scores it."""
    out = model(visual.float()[None], cells.long()[None], None, text.float()[None])
    return out.logits[0]


def select_topk_filled(logits: Tensor, tokens: Tensor, k: int, label_ratio: float) -> Tensor:
    """``evocomp_fill``: the top logits up to ``keep_count(label_ratio, N)`` (the size of the
    labels the compressor learnt to rank), then DivPrune's max-min picks from them, ``k`` in
    all, ascending. ``logits``: (N,); ``tokens``: (N, D)."""
    top = select_topk(logits, k=min(k, keep_count(label_ratio, logits.shape[-1])))
    return divprune_fill(tokens, top.cpu(), k)


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


def compressor_id(directory: str | Path) -> str:
    """Content id of a saved compressor: sha256 of its config and weights (what its scores
    depend on), as ``compressor-<12 hex>``."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"no compressor at {directory}: {directory / name} is missing "
                "(train one with `evocomp train`)"
            )
        h.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return f"compressor-{h.hexdigest()[:12]}"


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
