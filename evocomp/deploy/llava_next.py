"""The LLaVA-NeXT / LLaVA-OneVision hook: a shorter prefill for their ``generate()``, newlines kept.

The LLM input is LLaVA's (image features scattered into the ``<image>`` placeholders, 1-D
positions), so the prefill is rewritten as for LLaVA (:class:`evocomp.deploy.llava.LlavaPrefill`):
the kept positions' embeddings, attention mask and original position ids only. What differs is
the image block: the model's own ``pack_image_features`` writes an image as its base crop's
tokens, then its tile rows each followed by the learnt ``image_newline``
(:mod:`evocomp.mllm.hf_llava_next`), so one image fills N + rows placeholders and N varies
with the image's size. As in labeling and evaluation, the selectable tokens are the N base and
tile tokens; the newlines are fed whatever is kept, at their own places. The hook scores the
selectable tokens with their cells (:func:`evocomp.mllm.anyres.layout_cells`), keeps
``keep_count(ratio, N)`` of them and drops the other N - k positions.

The layout ``(side, rows, cols, single)``: ``generate()`` encodes the images before its first
iteration and consumes ``image_sizes`` doing so (it pops the image encoder's arguments from
its model kwargs), so the hook reads the layout off the packed features themselves: where the ``image_newline`` rows land (:func:`evocomp.mllm.anyres.packed_layout`),
which is how :func:`evocomp.mllm.anyres.image_layout` reads the layout of an image size off a
dummy packing too. The same size gives the same layout, so the kept set is the one the
evaluation harness picks from the cached features.

A batch's images must give one N (every prompt drops N - k, and ``generate()``'s batch stays
rectangular); images of different sizes usually give different N and are refused in one line:
generate them in separate calls.

``AutoProcessor`` of OneVision needs torchvision for its video half (not installed here), and
that of a LLaVA-NeXT checkpoint counts the placeholders with its own copy of the shape
arithmetic; the deployment loads :class:`AnyresProcessor` for both: the checkpoint's image
processor (PIL backend) and tokenizer, each ``<image>`` repeated as many times as the model's
own packing writes tokens for that image (base, tiles and newlines).
"""

from __future__ import annotations

from pathlib import Path

import torch

from evocomp.deploy.llava import LlavaPrefill
from evocomp.deploy.processor import ImageTextProcessor
from evocomp.mllm.anyres import image_layout, layout_block, layout_cells, packed_layout


class AnyresProcessor(ImageTextProcessor):
    """LLaVA-NeXT / OneVision's processor for images and text, without torchvision.

    ``processor(images=[img], text=[prompt])``: the image processor's ``pixel_values`` and
    ``image_sizes`` (OneVision's also ``batch_num_images``), each ``<image>`` written once per
    packed token of its image. Prompts are padded on the left.
    """

    def __init__(self, image_processor, tokenizer, config) -> None:
        super().__init__(image_processor, tokenizer)
        self.config = config
        self._placed: dict[tuple[int, int, bool], int] = {}  # (h, w, untiled) -> tokens

    @classmethod
    def from_pretrained(cls, path: str | Path) -> AnyresProcessor:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        return cls(
            AutoImageProcessor.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            AutoConfig.from_pretrained(path),
        )

    def counts(self, data: dict, per_prompt: list[int]) -> list[int]:
        """Each image's packed tokens. OneVision packs an image untiled (base + one newline)
        when its prompt holds several (its ``batch_num_images``)."""
        several = self.config.model_type == "llava_onevision"
        untiled = [several and n > 1 for n in per_prompt for _ in range(n)]
        out = []
        for (h, w), single in zip(data["image_sizes"].tolist(), untiled, strict=True):
            key = (h, w, single)
            if key not in self._placed:
                layout = image_layout(self.config, (h, w), crops=1 if single else None)
                n, _, fixed = layout_block(layout)
                self._placed[key] = n + fixed.shape[0]
            out.append(self._placed[key])
        return out


class LlavaNextPrefill(LlavaPrefill):
    """Drops unkept base and tile positions from LLaVA-NeXT's prefill; see the module doc."""

    DROP = ("pixel_values", "mm_encoder_outputs", "image_sizes", "batch_num_images")

    def __init__(self, model, tokenizer, template: str) -> None:
        super().__init__(model, tokenizer, template)
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size  # base crop: side x side tokens
        self.layouts: list[torch.Tensor] = []  # the latest prefill's layout per image

    def _features(self, inputs: dict) -> list[torch.Tensor] | None:
        """Per image its packed tokens ``(N + rows, D)``, newlines included."""
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return list(mm["image"].pooler_output)
        if inputs.get("pixel_values") is not None:
            extra = {}
            if inputs.get("batch_num_images") is not None:  # OneVision's untiled images
                extra["batch_num_images"] = inputs["batch_num_images"]
            out = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
                vision_feature_layer=inputs.get("vision_feature_layer"),
                vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
                **extra,
            )
            return list(out.pooler_output)
        return None

    def _embeddings(self, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """LLaVA's, with OneVision's placeholder mask (it returns the image and video masks)."""
        x = self.model.get_input_embeddings()(ids)  # (B, L, D)
        image = torch.cat(feats).to(x.device, x.dtype)  # (sum of N + rows, D)
        mask = self.model.model.get_placeholder_mask(ids, inputs_embeds=x, image_features=image)
        mask = mask[0] if isinstance(mask, tuple) else mask
        return x.masked_scatter(mask, image)

    def _selectable(self, feats: list[torch.Tensor]) -> tuple[list, list, list]:
        """The base and tile tokens of each image, their slots and cells; newlines stay."""
        newline = self.model.model.image_newline
        tokens, slots, cells, self.layouts = [], [], [], []
        for packed in feats:  # (N + rows, D)
            lines = (packed == newline.to(packed.device, packed.dtype)).all(-1).nonzero()[:, 0]
            length = packed.shape[0]
            layout = packed_layout(self.side, lines, length, length == self.side**2 + 1)
            _, sel, _ = layout_block(layout)
            tokens.append(packed[sel.to(packed.device)])
            slots.append(sel)
            cells.append(layout_cells(layout))
            self.layouts.append(layout)
        return tokens, slots, cells
