"""The LLaVA-1.5 hook: a shorter prefill for ``LlavaForConditionalGeneration.generate()``.

transformers builds LLaVA's LLM input inside ``LlavaModel.forward`` (token embeddings, image
features scattered into the ``<image>`` placeholders) at a fixed sequence length, and its own
hooks (``get_image_features``, ``get_placeholder_mask``) can change what fills a placeholder,
not how many there are. What it does offer is the ``inputs_embeds`` route of
``prepare_inputs_for_generation``: on the first iteration the model takes ready-made
embeddings instead of ``input_ids``. So the hook rewrites the prefill's model inputs there —
embeddings, attention mask and position ids of the kept positions only — and leaves
everything else to ``generate()``: the image features it already computed
(``mm_encoder_outputs``), the KV cache (which now holds ``N - k`` fewer entries), sampling,
stopping and the returned ``sequences`` (the caller's full prompt ids + the new tokens).

Positions: kept visual tokens keep their *original* position ids and the text after them too
(:mod:`evocomp.mllm.sequence`, as in labeling, training and evaluation). ``generate()`` derives
the prompt's position ids from the full-length prompt and continues them by one per new token,
so decoding steps get the positions the evaluation harness gives them. Only the 2-D attention
mask, which ``generate()`` keeps growing at full length, must be shortened again at every step
(:meth:`LlavaPrefill.follow`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from evocomp.deploy.prompt import question_embeddings, question_from_text


@dataclass(frozen=True)
class Selection:
    """What one ``generate()`` call kept."""

    kept: list[torch.Tensor]  # per prompt row, the kept visual-token indices (k,), ascending
    n_tokens: int  # N, selectable visual tokens per image
    k: int  # kept per image
    questions: list[str]  # the question each row was scored with
    prompt_tokens: int  # prompt length L with all N visual tokens
    prefill_tokens: int  # what the LLM's prefill (and KV cache) holds: L - (N - k)


# (visual per image, question embeddings per image, grid or cells (N, 2) per image, or None)
# -> kept indices
Pick = Callable[
    [list[torch.Tensor], list[torch.Tensor], list[tuple[int, int] | torch.Tensor] | None],
    list[torch.Tensor],
]


class LlavaPrefill:
    """Drops unkept image positions from LLaVA's prefill; see the module doc.

    A family whose prefill differs only in where its image features come from, which of them
    are selectable, how it embeds them, where its tokens sit or how decoding continues
    (:mod:`evocomp.deploy.qwen`, :mod:`evocomp.deploy.llava_next`) overrides those steps:
    :meth:`_features`, :meth:`_selectable`, :meth:`_embeddings`, :meth:`_positions`,
    :meth:`_grids`, :meth:`follow`; one whose LLM input is not ready-made embeddings
    (:mod:`evocomp.deploy.qwen3`) overrides :meth:`_feed`.
    """

    DROP = ("pixel_values", "mm_encoder_outputs", "image_sizes")  # inputs the prefill consumed

    def __init__(self, model, tokenizer, template: str) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.image_token_id = int(model.config.image_token_id)
        self._keep: torch.Tensor | None = None  # (B, L) bool, prompt positions the LLM saw

    def _features(self, inputs: dict) -> list[torch.Tensor] | None:
        """Per-image projected tokens ``(N, D)``: the ones ``generate()`` computed, else our own."""
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return list(mm["image"].pooler_output)
        if inputs.get("pixel_values") is not None:
            out = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                vision_feature_layer=inputs.get("vision_feature_layer"),
                vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
                image_sizes=inputs.get("image_sizes"),
            )
            return list(out.pooler_output)
        return None

    def _selectable(self, feats: list[torch.Tensor]) -> tuple[list, list, list | None]:
        """Per image: its selectable tokens ``(N, D)``, their slots in the image's placeholder
        block ``(N,)`` (the other slots are always fed) and their cells ``(N, 2)`` for the
        compressor, or None to use :meth:`_grids`. LLaVA: every token, in order."""
        return feats, [torch.arange(f.shape[0]) for f in feats], None

    def _questions(self, ids: torch.Tensor) -> list[str]:
        """Each row's question: the ids after the last image token, from the first ordinary
        token up to the next special one (a chat template's end of turn, ``<|im_end|>``),
        decoded, then cut at the template's text (:func:`question_from_text`). An unknown
        word's ``<unk>`` stays in: it is part of the question labeling tokenized."""
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        out = []
        for row in ids:
            last = int((row == self.image_token_id).nonzero()[-1])
            after = row[last + 1 :].tolist()
            start = next((i for i, t in enumerate(after) if t not in special), len(after))
            end = next((i for i, t in enumerate(after) if i > start and t in special), len(after))
            text = self.tokenizer.decode(after[start:end], skip_special_tokens=False)
            out.append(question_from_text(text, self.template))
        return out

    def _embeddings(self, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """What the model's forward feeds the LLM ``(B, L, D)``: image features in the placeholders."""
        x = self.model.get_input_embeddings()(ids)  # (B, L, D)
        image = torch.cat(feats).to(x.device, x.dtype)  # (B * N, D)
        mask = self.model.model.get_placeholder_mask(ids, inputs_embeds=x, image_features=image)
        return x.masked_scatter(mask, image)

    def _feed(
        self,
        inputs: dict,
        ids: torch.Tensor,
        feats: list[torch.Tensor],
        keep: torch.Tensor,
        kept: list[torch.Tensor],
    ) -> None:
        """Put the LLM input of the kept positions ``keep (B, L)`` into ``inputs``: LLaVA's is
        their embeddings ``inputs_embeds (B, L_kept, D)`` (no ``input_ids``)."""
        x = self._embeddings(ids, feats)  # (B, L, D)
        inputs["inputs_embeds"] = x[keep].view(ids.shape[0], -1, x.shape[-1])
        inputs["input_ids"] = None

    def _positions(self, inputs: dict, ids: torch.Tensor) -> torch.Tensor:
        """The full prompt's position ids ``(B, L)``: as ``generate()`` derives them (original
        positions, left padding at 0)."""
        pos = inputs.get("position_ids")
        if pos is None:
            attn = inputs.get("attention_mask")
            ones = torch.ones_like(ids) if attn is None else attn.long()
            pos = (ones.cumsum(-1) - 1).masked_fill(ones == 0, 0)
        return pos

    def _grids(self, pos: torch.Tensor, ids: torch.Tensor) -> list[tuple[int, int]] | None:
        """Each image's token grid (rows, cols) for the compressor; None: ``grid_shape(N)``,
        the grid of a fixed-N model as labeling and evaluation use it."""
        return None

    def prefill(self, inputs: dict, pick: Pick, questions: list[str] | None) -> Selection | None:
        """Rewrite the first iteration's model ``inputs`` in place to the kept positions.

        Args:
            inputs: what ``prepare_inputs_for_generation`` returned for the prompt.
            pick: ``(visual per image, question embeddings per image, grids) -> kept indices``.
            questions: one per row, or None to read them from the prompt (:mod:`.prompt`).

        Returns:
            the selection, or None for a prompt without an image (left untouched).
        """
        self._keep = None
        ids = inputs.get("input_ids")
        feats = self._features(inputs)
        if feats is None:
            return None
        if ids is None:
            raise ValueError(
                "a compressed generate() needs the prompt's input_ids (the processor's output), "
                "not inputs_embeds"
            )
        if inputs.get("use_cache") is False:
            raise ValueError(
                "a compressed generate() needs the KV cache (use_cache=True): without one every "
                "step would feed the whole uncompressed prompt again"
            )
        cache = inputs.get("cache")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                "a compressed generate() does not support static (compileable) caches: "
                "use the default dynamic cache"
            )
        B, L = ids.shape
        n_img = (ids == self.image_token_id).sum(1)  # (B,)
        placed = [f.shape[0] for f in feats]  # each image's placeholders
        if len(feats) != B or n_img.tolist() != placed:
            raise ValueError(
                f"a compressed generate() needs exactly one image per prompt and one prefill "
                f"pass (no prefill_chunk_size): {B} prompts, {len(feats)} images, "
                f"{n_img.tolist()} image tokens per prompt (the images give {placed})"
            )
        tokens, slots, cells = self._selectable(feats)
        if len({t.shape[0] for t in tokens}) > 1:
            raise ValueError(
                f"a compressed generate() batches images of one token count N only (every "
                f"prompt must drop N - k, the batch stays rectangular); these give N = "
                f"{[t.shape[0] for t in tokens]}: generate them in separate calls"
            )
        N = tokens[0].shape[0]
        if questions is None:
            questions = self._questions(ids)
        elif len(questions) != B:
            raise ValueError(f"{len(questions)} questions for {B} prompts")
        text = [question_embeddings(self.model, self.tokenizer, q) for q in questions]
        pos = self._positions(inputs, ids)  # (..., B, L)
        kept = pick(tokens, text, self._grids(pos, ids) if cells is None else cells)

        keep = torch.ones(B, L, dtype=torch.bool, device=ids.device)
        for b in range(B):
            block = (ids[b] == self.image_token_id).nonzero().squeeze(1)  # the image's positions
            drop = torch.ones(N, dtype=torch.bool)
            drop[kept[b]] = False
            keep[b, block[slots[b][drop].to(block.device)]] = False
        k = int(kept[0].numel())
        L_kept = L - (N - k)  # every row drops N - k: the batch stays rectangular

        attn = inputs.get("attention_mask")
        if attn is None:
            # Always an explicit mask: with none, transformers reads the gaps left in the
            # position ids as packed-sequence boundaries and walls the text off the image.
            attn = torch.ones_like(ids)
        inputs["attention_mask"] = attn[keep].view(B, L_kept)
        inputs["position_ids"] = pos[..., keep.to(pos.device)].view(*pos.shape[:-2], B, L_kept)
        for key in self.DROP:
            inputs.pop(key, None)
        self._feed(inputs, ids, feats, keep, kept)
        self._keep = keep
        return Selection(kept, N, k, questions, L, L_kept)

    def follow(self, inputs: dict) -> None:
        """A decoding step: drop the pruned prompt positions from the full-length mask."""
        attn = inputs.get("attention_mask")
        if self._keep is None or attn is None:
            return  # no mask: the cache's own length is the truth
        B, L = self._keep.shape
        new = torch.ones(B, attn.shape[1] - L, dtype=torch.bool, device=attn.device)
        keep = torch.cat([self._keep.to(attn.device), new], dim=1)
        inputs["attention_mask"] = attn[keep].view(B, -1)
