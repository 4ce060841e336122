"""HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL backend: ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` checkpoints.

Visual tokens are the vision tower's output after its 2x2 patch merger, in row-major
order of the merged grid ``(h / merge, w / merge)``. Positions are 3-D M-RoPE: the full
sequence's ``(3, L)`` ids come from the model's own ``get_rope_index`` (text tokens share one
id on all three rows; a visual token at merged cell (r, c) has (t, h, w) = (p, p + r, p + c)
after a p-token prefix, and the text after the image resumes at p + max(rows, cols)); a
subset keeps each kept token's column, and decoding continues after the last prompt id, the
rope delta of the full sequence.

The processor (``AutoProcessor``) needs torchvision for its video half; this adapter loads the
image processor (``AutoImageProcessor``, the PIL backend without torchvision) and the tokenizer
instead, and takes the chat template from the tokenizer or ``chat_template.json``.

N varies per image: the processor keeps each image's aspect ratio within ``[min_pixels,
max_pixels]``, so a 160x96 image gives another merged grid than a square one. Each image's
layout is its merged grid ``(rows, cols)`` (:class:`evocomp.mllm.base.ImageTokens`), from
which its M-RoPE ids are rebuilt; ``n_tokens`` / ``grid`` are those of a square image at the
``max_pixels`` cap (:func:`evocomp.mllm.checkpoint.qwen_grid`), the model's default.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from evocomp.errors import ModelError
from evocomp.mllm.base import ImageTokens
from evocomp.mllm.checkpoint import qwen_grid
from evocomp.mllm.hf_adapter import HFAdapter
from evocomp.tokens import grid_positions


class HFQwenVL(HFAdapter):
    """The MLLM protocol over a local Qwen2-VL checkpoint directory."""

    family = "qwen2_vl"

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def load(self, path: Path):
        from transformers import AutoImageProcessor, AutoTokenizer

        model = self.model_class().from_pretrained(path, dtype=self.dtype)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self._layouts: dict[tuple[int, int], torch.Tensor] = {}
        return model.to(self.device).eval(), AutoTokenizer.from_pretrained(path), None

    def token_grid(self, path: Path, cfg: dict) -> tuple[int, tuple[int, int]]:
        self.merge = int(self.model.config.vision_config.spatial_merge_size)
        if int(getattr(self.image_processor, "merge_size", self.merge)) != self.merge:
            raise ModelError(
                f"{path}: preprocessor merge_size {self.image_processor.merge_size} differs from "
                f"the vision tower's spatial_merge_size {self.merge}"
            )
        grid = qwen_grid(path, cfg)
        return grid[0] * grid[1], grid

    def layout(self, n_prefix: int, n_tail: int, layout=None) -> torch.Tensor:
        """M-RoPE ids ``(3, n_prefix + N + n_tail)``, from the model's own ``get_rope_index``."""
        rows, cols = (int(x) for x in (self.grid if layout is None else layout))
        key = (n_prefix, n_tail, rows, cols)
        if key not in self._layouts:
            n = rows * cols
            L = n_prefix + n + n_tail
            ids = torch.zeros(1, L, dtype=torch.long, device=self.device)
            ids[0, n_prefix : n_prefix + n] = self.model.config.image_token_id
            types = (ids == self.model.config.image_token_id).int()  # text 0, image 1
            thw = torch.tensor([[1, rows * self.merge, cols * self.merge]])
            pos, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=types, image_grid_thw=thw.to(self.device)
            )
            self._layouts[key] = pos[:, 0]  # (3, L)
        return self._layouts[key]

    # ---- visual side -------------------------------------------------------------------------
    def pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values (sum of patches, C*T*P*P)`` and ``image_grid_thw (B, 3)``."""
        out = self.image_processor(images=images, return_tensors="pt")
        thw = out["image_grid_thw"]
        for img, (t, h, w) in zip(images, thw.tolist(), strict=True):
            if t != 1 or h % self.merge or w % self.merge:
                raise ModelError(
                    f"an image of {img.width}x{img.height} px gives a {t}x{h}x{w} patch grid on "
                    f"{self.path}, not one frame of whole {self.merge}x{self.merge} merges"
                )
        return out["pixel_values"].to(self.device, self.dtype), thw.to(self.device)

    def grids(self, thw: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's merged-token grid ``(rows, cols)``."""
        return [(h // self.merge, w // self.merge) for _, h, w in thw.tolist()]

    @torch.no_grad()
    def image_tokens(self, images: list[Image.Image]) -> list[ImageTokens]:
        px, thw = self.pixels(images)
        out = self.model.model.get_image_features(px, thw)
        return [
            ImageTokens(t.float().cpu(), grid_positions(r * c, (r, c)), torch.tensor([r, c]))
            for t, (r, c) in zip(out.pooler_output, self.grids(thw), strict=True)
        ]

    visual_tokens = HFAdapter.stacked_tokens  # N follows the image: image_tokens is the source

    @torch.no_grad()
    def cls_attention(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """VisionZip's score without a CLS token, ``(N_i,)`` per image: the attention each merged token's
        patches receive in the last vision block (mean over queries, summed over heads and
        over the merge x merge patches), as the LLaVA adapter does for a SigLIP tower."""
        px, thw = self.pixels(images)
        visual = self.model.model.visual
        attn, seen = visual.blocks[-1].attn, {}

        def grab(module, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]
            seen["cu"], seen["pe"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

        handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            visual(px.type(visual.dtype), grid_thw=thw)
        finally:
            handle.remove()
        h, cu = seen["h"], seen["cu"].tolist()
        S = h.shape[0]
        q, k, _ = attn.qkv(h).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(self.model).__module__].apply_rotary_pos_emb_vision
        q, k = (t.float() for t in rope(q, k, *seen["pe"]))
        received = torch.empty(S)
        for a, b in zip(cu[:-1], cu[1:], strict=True):  # one image (or window) at a time
            w = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling
            received[a:b] = w.softmax(-1).sum(0).mean(0).cpu()
        units = received.reshape(-1, self.merge**2).sum(1)  # (sum N,) in the blocks' order
        sizes = [r * c for r, c in self.grids(thw)]
        return list(self.token_order(units, thw).split(sizes))

    def token_order(self, units: torch.Tensor, thw: torch.Tensor) -> torch.Tensor:
        """Rows ``(B * N, ...)`` in the vision blocks' order, put in visual-token order.

        Qwen2.5-VL's blocks see merged units grouped by attention window (its merger output
        is put back afterwards); Qwen2-VL's are in token order already.
        """
        visual = self.model.model.visual
        if not hasattr(visual, "fullatt_block_indexes"):
            return units
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(
            thw.cpu(), visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return units[torch.argsort(order).to(units.device)]


class HFQwen25VL(HFQwenVL):
    """Qwen2.5-VL: Qwen2-VL's sequence and positions, a windowed vision tower."""

    family = "qwen2_5_vl"

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration


class HFQwen3VL(HFQwenVL):
    """Qwen3-VL: Qwen2-VL's sequence and M-RoPE positions (interleaved sections, the model's own
    ``get_rope_index``), plus DeepStack: the vision tower's intermediate blocks, merged like its
    output, give E more vectors per visual token that the LLM adds to that token's hidden state
    after layers 0..E-1. They are each token's :attr:`ImageTokens.extra`: a kept token brings
    its own, a dropped token's go with it (as the model does with a shorter image), and the
    pruned path (l > 0) drops them with the token."""

    family = "qwen3_vl"

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def extra_layers(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    @torch.no_grad()
    def image_tokens(self, images: list[Image.Image]) -> list[ImageTokens]:
        px, thw = self.pixels(images)
        out = self.model.model.get_image_features(px, thw)
        deep = [torch.stack(per_image) for per_image in zip(*out.deepstack_features, strict=True)]
        return [
            ImageTokens(
                t.float().cpu(),
                grid_positions(r * c, (r, c)),
                torch.tensor([r, c]),
                extra=d.float().cpu(),  # (E, N, D)
            )
            for t, d, (r, c) in zip(out.pooler_output, deep, self.grids(thw), strict=True)
        ]
