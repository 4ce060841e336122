"""Generation with visual tokens dropped after LLM layer l (the paper's l = 2).

The first l decoder layers see every visual token; the unkept ones' hidden states are removed
before layer l. No KV cache on this path (the first l layers would need one of N tokens, the
rest one of k): one forward of the whole sequence per generated token. Mixed into
:class:`evocomp.mllm.hf_adapter.HFAdapter`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evocomp.mllm.decoding import greedy
from evocomp.mllm.sequence import left_pad, left_pad_flags


class PrunedDecoding:
    """``generate(..., prune_layer=l)`` for l > 0 (uses the adapter's LLM, masks, blocks)."""

    def _hidden_pruned(self, x, mask, pos, image, survive, layer: int, deep=None):
        """Last-position hidden states ``(B, D)``: all tokens for ``layer`` layers, then only ``survive``.

        The paper's pruning at LLM layer l (l=2): the first l layers see every visual token,
        the dropped ones' hidden states are removed before layer l. ``deep (B, L, E, D)``: the
        extras added after layers 0..E-1 (zero off the visual tokens), pruned with them.
        """
        h, B = x, x.shape[0]
        inputs = self.layer_inputs(h, mask, pos, image)
        for i, block in enumerate(self.lm.layers[: self.n_layers]):
            if i == layer:
                keep = [survive[b] & mask[b].bool() for b in range(B)]
                image = [image[b][keep[b]] for b in range(B)]
                if deep is not None:  # rides along as channels, like _visual's
                    h = torch.cat([h, deep.flatten(2)], dim=-1)
                h, mask, pos = left_pad(
                    [h[b][keep[b]] for b in range(B)],
                    [pos[..., b, :][..., keep[b]] for b in range(B)],
                )
                h, deep = self._split(h)
                image = left_pad_flags(image, h.shape[1])
                inputs = self.layer_inputs(h, mask, pos, image)
            cm, pe = inputs[i]
            h = block(
                h, attention_mask=cm, position_embeddings=pe, position_ids=self.text_positions(pos)
            )
            if deep is not None and i < self.n_extra:
                h = h + deep[:, :, i]
        return self.lm.norm(h)[:, -1]

    def _generate_pruned(
        self, questions, visual, kept, max_new_tokens: int, layer: int, layouts=None, extras=None
    ) -> list[str]:
        if not 0 < layer < self.n_layers:
            raise ValueError(
                f"prune layer {layer} must be in 1..{self.n_layers - 1} for {self.path}"
            )
        x, mask, pos, image = self._prompt_rows(
            questions, visual, [None] * len(questions), layouts=layouts, extras=extras
        )
        x, deep = self._split(x)
        survive = torch.ones_like(mask, dtype=torch.bool)
        for b, (q, k) in enumerate(zip(questions, kept, strict=True)):
            if k is not None:
                n, slots, fixed_slots, _ = self.block(layouts[b] if layouts is not None else None)
                start = mask.shape[1] - int(mask[b].sum()) + len(self.encode(q).prefix)
                vis = torch.zeros(n + fixed_slots.shape[0], dtype=torch.bool, device=self.device)
                vis[slots[k.to(self.device)]] = True
                vis[fixed_slots] = True  # always fed
                survive[b, start : start + vis.shape[0]] = vis
        B = x.shape[0]
        state = {"x": x, "mask": mask, "pos": pos, "image": image, "survive": survive, "deep": deep}

        def step(prev: torch.Tensor | None) -> torch.Tensor:
            # No KV cache on this path: the whole sequence goes through every layer again.
            if prev is not None:
                one = torch.ones(B, 1, dtype=mask.dtype, device=mask.device)
                state["x"] = torch.cat([state["x"], self.embed(prev.to(self.device))[:, None]], 1)
                state["mask"] = torch.cat([state["mask"], one], 1)
                state["pos"] = torch.cat([state["pos"], state["pos"][..., -1:] + 1], -1)
                state["survive"] = torch.cat([state["survive"], one.bool()], 1)
                state["image"] = torch.cat([state["image"], ~one.bool()], 1)
                if state["deep"] is not None:
                    state["deep"] = F.pad(state["deep"], (0, 0, 0, 0, 0, 1))
            h = self._hidden_pruned(
                state["x"], state["mask"], state["pos"], state["image"], state["survive"], layer,
                state["deep"],
            )  # fmt: skip
            return self.model.lm_head(h)

        return self._decode(greedy(step, B, max_new_tokens, self.tokenizer.eos_token_id))
