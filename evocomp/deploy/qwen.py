"""The Qwen2-VL / Qwen2.5-VL hook: a shorter prefill for their ``generate()``, 3-D positions kept.

Qwen's LLM input is LLaVA's (image features scattered into the ``<|image_pad|>`` placeholders),
so the prefill is rewritten as for LLaVA (:class:`evocomp.deploy.llava.LlavaPrefill`): the
kept positions' embeddings, attention mask and position ids only. What differs is where the
tokens sit. Positions are 3-D M-RoPE ids ``(3, B, L)`` (temporal, height, width), which
``generate()`` computes once for the full prompt with the model's own ``get_rope_index`` before
the prefill (``_prepare_position_ids_for_generation``: a ``(4, B, L)`` tensor, 1-D text
positions first) and whose rope delta it stores on ``model.model.rope_deltas``. The hook keeps
each kept token's original (t, h, w) column and the text's columns after it, as the EvoComp
adapter does (:class:`evocomp.mllm.hf_qwen_vl.HFQwenVL`); the image's token grid for the
compressor is read off the same ids (rows = span of h, cols = span of w).

Decoding: the new token ``t`` (0-based) sits at the last prompt position + 1 + t on all three
rows, the full sequence's rope delta, as in ``HFQwenVL.generate``. ``generate()`` gives that
(it grows its full-length position ids by one per step), but the model's own fallback when no
position ids arrive would not: ``compute_3d_position_ids`` counts from the cache length (or the
attention mask), which the shortened prefill left N - k short. So :meth:`QwenPrefill.follow`
sets every decoding step's ``(3, B, s)`` ids itself, from the tokens cached since the prefill.

``AutoProcessor`` of Qwen needs torchvision for its video half (not installed here); the
deployment loads :class:`QwenProcessor` instead: the checkpoint's image processor (PIL
backend, as the adapter uses) and tokenizer, with what Qwen's processor returns for images
and text (``input_ids`` with ``<|image_pad|>`` repeated N times, ``attention_mask``,
``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from evocomp.deploy.llava import LlavaPrefill, Pick, Selection
from evocomp.deploy.processor import ImageTextProcessor


class QwenProcessor(ImageTextProcessor):
    """Qwen2-VL's processor for images and text, without torchvision (see the module doc).

    ``processor(images=[img], text=[prompt])`` as with ``Qwen2VLProcessor``: each
    ``<|image_pad|>`` in the text (one per image, in order) becomes N of them, N the image's
    merged token count. Prompts are padded on the left (what ``generate()`` needs).
    """

    default_image_token = "<|image_pad|>"

    def __init__(self, image_processor, tokenizer) -> None:
        super().__init__(image_processor, tokenizer)
        self.merge = int(image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QwenProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path))

    def counts(self, data: dict, per_prompt: list[int]) -> list[int]:
        return (data["image_grid_thw"].prod(-1) // self.merge**2).tolist()

    def extra(self, data: dict, tokens: dict) -> None:
        data["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).long()


class QwenPrefill(LlavaPrefill):
    """Drops unkept image positions from Qwen2-VL's prefill; see the module doc."""

    DROP = ("pixel_values", "mm_encoder_outputs", "image_grid_thw", "mm_token_type_ids")

    def __init__(self, model, tokenizer, template: str) -> None:
        super().__init__(model, tokenizer, template)
        self._next: torch.Tensor | None = None  # (3, B, 1) ids of the first new token
        self._prefilled = 0  # tokens the prefill put in the cache: L - (N - k)

    def _features(self, inputs: dict) -> list[torch.Tensor] | None:
        """Per-image merged tokens ``(N, D)``: the ones ``generate()`` computed, else our own."""
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return list(mm["image"].pooler_output)
        if inputs.get("pixel_values") is not None:
            out = self.model.model.get_image_features(
                inputs["pixel_values"], inputs.get("image_grid_thw")
            )
            return list(out.pooler_output)
        return None

    def _embeddings(self, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.model.get_input_embeddings()(ids)  # (B, L, D)
        image = torch.cat(feats).to(x.device, x.dtype)  # (B * N, D)
        mask, _ = self.model.model.get_placeholder_mask(ids, inputs_embeds=x, image_features=image)
        return x.masked_scatter(mask, image)

    def _positions(self, inputs: dict, ids: torch.Tensor) -> torch.Tensor:
        """The full prompt's M-RoPE ids ``(3, B, L)``, as ``generate()`` computed them."""
        pos = inputs.get("position_ids")
        if inputs.get("mm_token_type_ids") is None or pos is None or pos.ndim != 3:
            raise ValueError(
                "a compressed Qwen generate() needs the prompt's mm_token_type_ids and "
                "image_grid_thw (pass everything the processor returns): without them "
                "transformers gives the image 1-D positions"
            )
        return pos[-3:]  # generate()'s are (4, B, L): 1-D text positions first

    def _grids(self, pos: torch.Tensor, ids: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's merged grid (rows, cols): the span of its tokens' h and w ids."""
        grids = []
        for b in range(ids.shape[0]):
            image = ids[b] == self.image_token_id
            h, w = pos[1, b, image], pos[2, b, image]
            grid = (int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1)
            if grid[0] * grid[1] != int(image.sum()):
                raise ValueError(
                    f"prompt {b}: {int(image.sum())} image tokens on a {grid[0]}x{grid[1]} "
                    "position grid: one image per prompt, one frame (no video)"
                )
            grids.append(grid)
        return grids

    def prefill(self, inputs: dict, pick: Pick, questions: list[str] | None) -> Selection | None:
        self._next = None
        sel = super().prefill(inputs, pick, questions)
        if sel is not None:
            self._next = inputs["position_ids"][..., -1:] + 1  # (3, B, 1)
            self._prefilled = sel.prefill_tokens
        return sel

    def follow(self, inputs: dict) -> None:
        """A decoding step: the shortened mask, and positions counted on from the full prompt's."""
        super().follow(inputs)
        cache = inputs.get("cache")
        if self._next is None or cache is None:
            return
        fed = cache.get_seq_length() - self._prefilled  # new tokens already in the cache
        n = inputs["input_ids"].shape[1]
        step = torch.arange(fed, fed + n, device=self._next.device)
        inputs["position_ids"] = (self._next + step).to(inputs["input_ids"].device)  # (3, B, n)
