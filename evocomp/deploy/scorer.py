"""A trained compressor as a token picker: visual tokens + question -> the kept indices.

Scores exactly as the evaluation harness does (``evocomp.evaluation.harness.Selector``):
the same batch layout (:func:`evocomp.compress.fit.collate`), the same grid positions and the
same top-k rule (:func:`evocomp.compress.model.select_topk`), so a deployed model keeps the
tokens the evaluation measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from evocomp.compress.fit import Item, collate
from evocomp.compress.model import load_compressor, select_topk, select_topk_filled
from evocomp.errors import ModelError
from evocomp.evaluation.routes import (  # route_of_evaluation: deployment's API too
    resolve_route,
    route_of_evaluation,  # noqa: F401
)
from evocomp.tokens import grid_positions, grid_shape, keep_count, nearest_budget, ratio_key


class TokenScorer:
    """The compressor saved in ``directory`` (by ``evocomp train``), checked against its model.

    Args:
        directory: the compressor folder (``config.json`` + ``model.safetensors``).
        hidden_size: the LLM's embedding width D; a compressor of another width is refused.
        model_id: the checkpoint's content id (``evocomp.mllm.hf_llava.checkpoint_id``); when
            both it and the compressor's recorded id are known they must agree.
        device: where the compressor runs (the model's device).
        fill: keep the compressor's top tokens only up to its training labels' keep ratio
            (``label_keep_ratio``) and the rest by DivPrune's max-min diversity from them
            (``evocomp_fill`` in ``evocomp evaluate``); False: its top k.

    Raises:
        FileNotFoundError: no compressor in ``directory``.
        ModelError: a compressor trained for another model, or ``fill`` with a compressor
            that does not record its labels' keep ratio.
    """

    def __init__(
        self,
        directory: str | Path,
        hidden_size: int,
        model_id: str | None = None,
        device: str | torch.device = "cpu",
        fill: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.compressor, self.extra = load_compressor(self.directory, device)
        self.label_ratio = self.extra.get("label_keep_ratio") if fill else None
        if fill and self.label_ratio is None:
            raise ModelError(
                f"{self.directory} does not record its labels' keep ratio (trained before "
                "fill existed): retrain it (`evocomp train`) to keep tokens with fill"
            )
        self.device = torch.device(device)
        trained_for = self.extra.get("model_id")
        if model_id is not None and trained_for not in (None, model_id):
            raise ModelError(
                f"{self.directory} was trained for model {trained_for!r}, not {model_id!r}: "
                "train a compressor on this model's labels (`evocomp train`)"
            )
        dim = self.compressor.cfg.dim
        if dim != hidden_size:
            raise ModelError(
                f"{self.directory} scores {dim}-wide visual tokens, the model's are "
                f"{hidden_size}-wide: a compressor of another model ({trained_for or 'unknown'})"
            )

    @torch.no_grad()
    def kept(
        self,
        visual: list[torch.Tensor],
        text: list[torch.Tensor],
        ratio: float,
        grids: list[tuple[int, int] | torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Kept token indices per image, ascending: the top ``keep_count(ratio, N)`` scores
        (with ``fill``: the top ones up to the labels' size, then DivPrune's picks).

        Args:
            visual: per image, its projected visual tokens ``(N, D)``.
            text: per image, the question's token embeddings ``(T, D)`` (T may be 0).
            ratio: keep ratio in (0, 1].
            grids: per image, its token grid (rows, cols) in row-major order (Qwen knows it
                from the image's size) or each token's cell ``(N, 2)`` (LLaVA-NeXT's base and
                tile tokens, :func:`evocomp.mllm.anyres.layout_cells`); None:
                ``grid_shape(N)``, a fixed-N model's grid.

        Returns:
            per image a ``(k,)`` LongTensor on the CPU.

        Raises:
            ValueError: a grid wider or taller than any the compressor was trained on.
        """
        grids = grids or [grid_shape(v.shape[0]) for v in visual]
        cells = [
            g.long().cpu() if isinstance(g, torch.Tensor) else grid_positions(v.shape[0], g)
            for v, g in zip(visual, grids, strict=True)
        ]
        top = self.compressor.cfg.max_grid
        for c in cells:
            rows, cols = (int(x) + 1 for x in c.max(0).values) if c.numel() else (0, 0)
            if max(rows, cols) > top:
                raise ValueError(
                    f"an image of {rows}x{cols} visual tokens: {self.directory} scores grids of "
                    f"at most {top} rows and {top} columns (the largest it was trained on); "
                    "resize the image to the size the compressor's labels were made at"
                )
        items = [
            Item(v.float().cpu(), c, t.float().cpu(), torch.zeros(v.shape[0]))
            for v, t, c in zip(visual, text, cells, strict=True)
        ]
        b = collate(items, device=self.device)
        logits = self.compressor(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask).logits
        return [
            self._kept(row[: v.shape[0]], v, keep_count(ratio, v.shape[0]))
            for row, v in zip(logits, visual, strict=True)
        ]

    def _kept(self, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """One image's kept indices: the top ``k`` logits, or with ``fill`` the evaluation's
        ``evocomp_fill`` rule (:func:`evocomp.compress.model.select_topk_filled`)."""
        if self.label_ratio is None:
            return select_topk(logits, k=k).cpu()
        return select_topk_filled(logits.cpu(), tokens.float().cpu(), k, self.label_ratio)


class BudgetScorers:
    """Several compressors, one per label budget (``label.budgets``), as one token picker:
    each keep ratio is served by the compressor ``route`` names for it, else by the one whose
    training labels' keep ratio is nearest it (:func:`evocomp.tokens.nearest_budget`) — the
    rule ``evocomp evaluate`` serves its ratios by, so a deployed model keeps what the
    evaluation measured. A single compressor serves every ratio.

    Args:
        scorers: the compressors (:class:`TokenScorer`); with several, each must record its
            labels' keep ratio (``label_keep_ratio``), and no two the same one.
        route: keep ratio (``ratio_key``, ``"0.333"``) -> compressor folder, one of the
            scorers' (an evaluation's ``compressor_for_ratio``, :func:`route_of_evaluation`);
            a ratio it does not name goes to the nearest budget.

    Raises:
        ModelError: several compressors without their label ratio or with one ratio twice,
            or a route naming a folder not among them.
    """

    def __init__(
        self, scorers: Sequence[TokenScorer], route: Mapping[str, str | Path] | None = None
    ) -> None:
        if not scorers:
            raise ModelError("no compressor given")
        self.by_budget: dict[float | None, TokenScorer] = {}
        for sc in scorers:
            budget = sc.extra.get("label_keep_ratio")
            if len(scorers) > 1 and budget is None:
                raise ModelError(
                    f"{sc.directory} does not record its labels' keep ratio (trained before "
                    "per-budget compressors existed): retrain it (`evocomp train`) or pass "
                    "one compressor"
                )
            if budget in self.by_budget:
                raise ModelError(
                    f"{sc.directory} and {self.by_budget[budget].directory} were both trained "
                    f"on labels of keep ratio {budget}: pass one compressor per label budget"
                )
            self.by_budget[budget] = sc
        self.route: dict[str, TokenScorer] = resolve_route(
            route or {}, {sc.directory: sc for sc in scorers}
        )

    def for_ratio(self, ratio: float) -> TokenScorer:
        """The compressor serving keep ratio ``ratio`` (its :meth:`TokenScorer.kept` picks)."""
        if ratio_key(ratio) in self.route:
            return self.route[ratio_key(ratio)]
        if len(self.by_budget) == 1:
            return next(iter(self.by_budget.values()))
        return self.by_budget[nearest_budget(self.by_budget, ratio)]
