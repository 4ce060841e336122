"""Where an image's visual tokens sit in the LLM's sequence: the image block of every adapter.

A family's tokens fill an image block of N selectable entries and M always-fed ones
(:meth:`ImageBlock.block`: LLaVA-NeXT's ``image_newline`` rows); a kept subset feeds its
tokens and all M, each at its full-sequence position (:meth:`ImageBlock.layout`: 1-D, or
Qwen's ``(3, L)`` M-RoPE ids). Per-token extras (Qwen3-VL's DeepStack vectors) ride along as
extra channels of their token's row, so every selection and reordering carries them.
Mixed into :class:`evocomp.mllm.hf_adapter.HFAdapter`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evocomp.errors import ModelError


class ImageBlock:
    """Positions, the image block and its per-token extras (needs the adapter's ``grid``,
    ``hidden_size``, ``n_extra``, ``device``, ``dtype``, ``embed``, ``path``)."""

    def layout(self, n_prefix: int, n_tail: int, layout=None) -> torch.Tensor:
        """Position ids ``(..., n_prefix + N + M + n_tail)`` of the full sequence: every one of
        the image's N tokens and its M always-fed ones (:meth:`block`)."""
        n, _, fixed, _ = self.block(layout)
        return torch.arange(n_prefix + n + fixed.shape[0] + n_tail, device=self.device)

    def default_layout(self) -> torch.Tensor:
        """The layout of the model's default image (``n_tokens`` tokens on ``grid``)."""
        return torch.tensor(self.grid)

    def block(self, layout=None):
        """The image block of a layout: ``(N, slots (N,), fixed_slots (M,), fixed (M, D))``.

        ``slots[i]`` is where selectable token i sits in the image block of N + M entries;
        ``fixed`` are embeddings fed whatever is kept (LLaVA-NeXT's ``image_newline`` after
        each tile row) at ``fixed_slots``. The default: N = rows * cols of a (rows, cols)
        layout, token i in slot i, nothing fixed.
        """
        rows, cols = (int(x) for x in (self.grid if layout is None else layout))
        n = rows * cols
        return (
            n,
            torch.arange(n, device=self.device),
            torch.zeros(0, dtype=torch.long, device=self.device),
            torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device),
        )

    # ---- positions -------------------------------------------------------------------------------
    def positions(self, n_prefix: int, kept: torch.Tensor, n_tail: int, layout=None):
        """Position ids ``(..., P, L)`` of rows ``kept (P, k)``: each token's original one
        (the always-fed tokens included, in block order)."""
        _, cols = self._block_rows(None, kept.to(self.device), layout)
        return self._columns(n_prefix, cols, n_tail, layout)

    def _columns(self, n_prefix: int, cols: torch.Tensor, n_tail: int, layout) -> torch.Tensor:
        """Position ids ``(..., P, L)`` of ``[prefix][block entries cols (P, j)][tail]``."""
        full = self.layout(n_prefix, n_tail, layout)
        P, width = cols.shape[0], full.shape[-1] - n_prefix - n_tail
        pre = torch.arange(n_prefix, device=self.device).expand(P, -1)
        tail = (n_prefix + width + torch.arange(n_tail, device=self.device)).expand(P, -1)
        return full[..., torch.cat([pre, n_prefix + cols, tail], dim=1)]

    def _block_rows(self, emb, idx: torch.Tensor, layout):
        """The image block each row feeds: embeddings ``(P, j, D)`` (None without ``emb``) and
        block slots ``(P, j)`` of ``emb (P, k, D)``, the tokens at selectable indices
        ``idx (P, k)``, and of the always-fed tokens, in block order (a family with none keeps
        the row's own order)."""
        _, slots, fixed_slots, fixed = self.block(layout)
        cols = slots[idx]
        if fixed_slots.numel():
            P = idx.shape[0]
            cols, order = torch.cat([cols, fixed_slots.expand(P, -1)], dim=1).sort(dim=1)
            if emb is not None:
                fixed = F.pad(fixed.to(emb.dtype), (0, emb.shape[-1] - fixed.shape[-1]))
                emb = torch.cat([emb, fixed.expand(P, -1, -1)], dim=1)
                emb = emb.gather(1, order[..., None].expand(-1, -1, emb.shape[-1]))
        return emb, cols

    # ---- per-token extras (deepstack) ----------------------------------------------------------
    # The extras ride along as extra channels of each visual row, (N, D) -> (N, (1 + E) * D),
    # so every selection, reordering and left-padding above carries them with their token;
    # _split takes them off again before the LLM. Families with E = 0 never see the channels.
    def _visual(self, visual: torch.Tensor, extra) -> torch.Tensor:
        """The visual rows on the device, with their extras ``(E, N, D)`` as channels."""
        vis = visual.to(self.device, self.dtype)
        if not self.n_extra:
            return vis
        if extra is None or extra.shape != (self.n_extra, *visual.shape):
            got = None if extra is None else tuple(extra.shape)
            raise ModelError(
                f"{self.path} adds {self.n_extra} deepstack vectors per visual token: expected "
                f"extra of shape ({self.n_extra}, {visual.shape[0]}, {visual.shape[1]}), got "
                f"{got} (features from another model? run `evocomp features` again)"
            )
        deep = extra.to(self.device, self.dtype).permute(1, 0, 2).flatten(1)
        return torch.cat([vis, deep], dim=1)

    def _split(self, x: torch.Tensor):
        """``(inputs_embeds (..., D), extras (..., E, D) or None)`` of rows built by _visual."""
        if not self.n_extra:
            return x, None
        return x[..., : self.hidden_size], x[..., self.hidden_size :].unflatten(
            -1, (self.n_extra, self.hidden_size)
        )

    def _deep_kwargs(self, deep, image) -> dict:
        """What the LLM's forward takes to add the extras at the visual positions."""
        if deep is None:
            return {}
        embeds = [deep[..., e, :][image] for e in range(self.n_extra)]
        return {"visual_pos_masks": image, "deepstack_visual_embeds": embeds}

    @staticmethod
    def text_positions(pos: torch.Tensor) -> torch.Tensor | None:
        """What masks and decoder layers take as ``position_ids``: 1-D ones, none for M-RoPE
        (3-D ids would be read as packed sequences; the mask comes from ``attention_mask``)."""
        return pos if pos.ndim == 2 else None

    def check_visual(self, visual: torch.Tensor, layout=None) -> None:
        n = self.block(layout)[0]
        if visual.ndim != 2 or visual.shape != (n, self.hidden_size):
            raise ModelError(
                f"visual tokens of shape {tuple(visual.shape)} do not fit {self.path} "
                f"(expects ({n}, {self.hidden_size})); features from another model?"
            )

    def _ids(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings ``(len, D)`` (zero extras appended when the family has any)."""
        emb = self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))
        return F.pad(emb, (0, self.n_extra * self.hidden_size)) if self.n_extra else emb
