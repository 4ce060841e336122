"""HF Qwen2-VL / Qwen2.5-VL backend: ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration`` checkpoints.

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

One N per model until variable N lands (issue 13): the token count of a square image at the
processor's ``max_pixels`` cap (:func:`evocomp.mllm.checkpoint.qwen_grid`); an image giving
another count is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from evocomp.errors import ModelError
from evocomp.mllm.checkpoint import qwen_grid
from evocomp.mllm.hf_adapter import HFAdapter


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

    def layout(self, n_prefix: int, n_tail: int) -> torch.Tensor:
        """M-RoPE ids ``(3, n_prefix + N + n_tail)``, from the model's own ``get_rope_index``."""
        key = (n_prefix, n_tail)
        if key not in self._layouts:
            L = n_prefix + self.n_tokens + n_tail
            ids = torch.zeros(1, L, dtype=torch.long, device=self.device)
            ids[0, n_prefix : n_prefix + self.n_tokens] = self.model.config.image_token_id
            types = (ids == self.model.config.image_token_id).int()  # text 0, image 1
            thw = torch.tensor([[1, self.grid[0] * self.merge, self.grid[1] * self.merge]])
            pos, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=types, image_grid_thw=thw.to(self.device)
            )
            self._layouts[key] = pos[:, 0]  # (3, L)
        return self._layouts[key]

    # ---- visual side -------------------------------------------------------------------------
    def pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values (sum of patches, C*T*P*P)`` and ``image_grid_thw (B, 3)``, checked
        to give this model's N tokens per image."""
        out = self.image_processor(images=images, return_tensors="pt")
        thw = out["image_grid_thw"]
        for img, (t, h, w) in zip(images, thw.tolist(), strict=True):
            rows, cols = h // self.merge, w // self.merge
            if (t, rows, cols) != (1, *self.grid):
                side = self.grid[0] * self.merge * self.image_processor.patch_size
                raise ModelError(
                    f"an image of {img.width}x{img.height} px gives {t * rows * cols} visual "
                    f"tokens ({rows}x{cols}) on {self.path}, whose N is {self.n_tokens} "
                    f"({self.grid[0]}x{self.grid[1]}: square images of at least {side} px, from "
                    "preprocessor_config.json size.longest_edge): variable token counts per "
                    "sample are not supported yet (issue 13); resize the images or set "
                    "longest_edge to fit them"
                )
        return out["pixel_values"].to(self.device, self.dtype), thw.to(self.device)

    @torch.no_grad()
    def visual_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        px, thw = self.pixels(images)
        out = self.model.model.get_image_features(px, thw)
        return torch.stack(list(out.pooler_output)).float().cpu()  # (B, N, D)

    @torch.no_grad()
    def cls_attention(self, images: list[Image.Image]) -> torch.Tensor:
        """VisionZip's score without a CLS token ``(B, N)``: the attention each merged token's
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
        units = received.reshape(-1, self.merge**2).sum(1)  # (B * N,) in the blocks' order
        return self.token_order(units, thw).reshape(len(images), self.n_tokens)

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
