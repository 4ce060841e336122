"""HF LLaVA-NeXT / LLaVA-OneVision backend: ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration`` checkpoints (CLIP or SigLIP tower).

An image is cut into crops (anyres): the whole image resized to the tower's size (the base
crop) and a tile grid chosen from ``image_grid_pinpoints``. The model's own
``pack_image_features`` writes one image as the base crop's ``side x side`` tokens, then the
tiles' tokens on their joint grid with the padding cut off (``unpad``; OneVision then
bilinearly shrinks a grid larger than ``anyres_max_k`` crops), row by row, each row followed
by the learnt ``image_newline``. A crop that is not tiled (OneVision's multi-image case) is
its base tokens and one trailing newline.

Selectable tokens are all packed tokens but the newlines, in packed order: the N = side**2 +
rows * cols tokens; the newlines are fed whatever is kept (:meth:`HFAdapter.block`'s fixed
tokens), at their own places. A layout is ``(side, rows, cols, single)``: the unpadded (and
interpolated) tile grid and 1 for the untiled case; it is found by running the model's
``pack_image_features`` on dummy features (width 1, newline 1) and reading where the
newlines land, not by redoing its shape arithmetic. Positions are 1-D over the whole block.

Cells: a tile token's (row, col) on the unpadded tile grid; a base token's cell is its
centre scaled onto that grid (so base and tile tokens of one region share cells). Untiled:
the base grid itself.

The processor is not loaded (OneVision's needs torchvision for its video half): the image
processor comes from ``AutoImageProcessor`` (the PIL backend without torchvision), the
tokenizer and its chat template from ``AutoTokenizer``. ``n_tokens`` / ``grid`` are those
of the default image, a square one of the tower's size (336 px on llava-v1.6: 576 base and
24 x 24 tile tokens), with ``grid = (1, N)`` since base + tiles is no rectangle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from evocomp.errors import ModelError
from evocomp.mllm.anyres import (
    default_layout_of,
    image_layout,
    layout_block,
    layout_cells,
    num_crops,
    pack,
)
from evocomp.mllm.base import ImageTokens
from evocomp.mllm.hf_adapter import HFAdapter
from evocomp.tokens import grid_shape


class HFLlavaNext(HFAdapter):
    """The MLLM protocol over a local LLaVA-NeXT checkpoint directory."""

    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"

    def load(self, path: Path):
        import transformers

        model = getattr(transformers, self.model_class).from_pretrained(path, dtype=self.dtype)
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self._size_layouts: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) px -> layout
        return model.to(self.device).eval(), tokenizer, None

    def token_grid(self, path: Path, cfg: dict) -> tuple[int, tuple[int, int]]:
        config = self.model.config
        pins = getattr(self.image_processor, "image_grid_pinpoints", None)
        if pins is not None and [list(p) for p in pins] != [
            list(p) for p in config.image_grid_pinpoints
        ]:
            raise ModelError(
                f"{path}: preprocessor image_grid_pinpoints {pins} differ from config.json's "
                f"{config.image_grid_pinpoints}"
            )
        self._default = default_layout_of(config)
        n = layout_block(self._default)[0]
        return n, grid_shape(n)

    def default_layout(self) -> torch.Tensor:
        return self._default

    def block(self, layout=None):
        """Base and tile tokens in packed order; the newline after each tile row is fixed."""
        n, slots, fixed = layout_block(self._default if layout is None else layout)
        newline = self.model.model.image_newline.to(self.dtype)
        return (
            n,
            slots.to(self.device),
            fixed.to(self.device),
            newline.expand(fixed.shape[0], -1),
        )

    # ---- visual side -------------------------------------------------------------------------
    def pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values (B, crops, C, H, W)`` (padded to the most crops) and ``image_sizes (B, 2)``."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype), out["image_sizes"]

    def layouts(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Each image's layout from its ``(h, w)`` px (one dummy packing per size seen)."""
        keys = [tuple(s) for s in sizes.tolist()]
        for s in keys:
            if s not in self._size_layouts:
                self._size_layouts[s] = image_layout(self.model.config, s)
        return [self._size_layouts[s] for s in keys]

    @torch.no_grad()
    def image_tokens(self, images: list[Image.Image]) -> list[ImageTokens]:
        px, sizes = self.pixels(images)
        out = self.model.model.get_image_features(pixel_values=px, image_sizes=sizes)
        result = []
        for packed, layout in zip(out.pooler_output, self.layouts(sizes), strict=True):
            n, slots, fixed = layout_block(layout)
            newline = self.model.model.image_newline.to(packed.dtype)
            if packed.shape[0] != n + fixed.shape[0] or not torch.equal(
                packed[fixed.to(packed.device)], newline.expand(fixed.shape[0], -1)
            ):
                raise ModelError(
                    f"{self.path}: the model packed {packed.shape[0]} tokens, the layout "
                    f"{layout.tolist()} expects {n} + {fixed.shape[0]} newlines"
                )
            tokens = packed[slots.to(packed.device)].float().cpu()
            result.append(ImageTokens(tokens, layout_cells(layout), layout))
        return result

    visual_tokens = HFAdapter.stacked_tokens  # N follows the image: image_tokens is the source

    @torch.no_grad()
    def cls_attention(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """VisionZip's score ``(N_i,)`` per image: each crop's CLS attention (summed over heads;
        a tower without CLS: the attention each patch receives, mean over queries) at the
        feature layer, packed like the tokens (OneVision's shrunk grid: the score map
        interpolated the same way), newlines dropped."""
        cfg = self.model.config
        layer = cfg.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        px, sizes = self.pixels(images)
        crops = [num_crops(cfg, tuple(s)) for s in sizes.tolist()]
        flat = torch.cat([p[:c] for p, c in zip(px, crops, strict=True)])
        with self._eager():
            out = self.model.model.vision_tower(flat, output_attentions=True)
        attn = out.attentions[layer].float().sum(1)  # (crops, S, S), summed over heads
        # the CLS row's patch columns; no CLS (SigLIP): the attention each patch receives
        cls = cfg.vision_feature_select_strategy == "default"
        score = attn[:, 0, 1:] if cls else attn.mean(1)  # (crops, side**2)
        per_image = [s[..., None].cpu() for s in score.split(crops)]  # (crops, side**2, 1)
        packed = pack(cfg, per_image, sizes, torch.zeros(1))
        return [
            p[layout_block(lay)[1], 0] for p, lay in zip(packed, self.layouts(sizes), strict=True)
        ]


class HFLlavaOnevision(HFLlavaNext):
    """LLaVA-OneVision: LLaVA-NeXT's packing with the tile grid shrunk to ``anyres_max_k``."""

    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
