"""HF LLaVA-family backend: any local ``LlavaForConditionalGeneration`` checkpoint.

Loads the reference model and real checkpoints (llava-1.5-7b-hf,
llava-interleave-qwen-0.5b-hf, ...) from a directory, never from a hub. N is the
config's ``image_seq_length``, positions are 1-D; the LLM side is
:class:`evocomp.mllm.hf_adapter.HFAdapter`. Build with :func:`evocomp.mllm.loader.load_mllm`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from evocomp.mllm.checkpoint import (  # noqa: F401 - re-exported: callers predate checkpoint.py
    DTYPES,
    SUPPORTED,
    check_checkpoint,
    checkpoint_id,
    checkpoint_info,
)
from evocomp.mllm.hf_adapter import HFAdapter
from evocomp.tokens import grid_shape


class HFLlava(HFAdapter):
    """The MLLM protocol over a local HF LLaVA checkpoint directory."""

    family = "llava"
    n_tokens_key = "image_seq_length"  # the config key that fixes N
    model_class = "LlavaForConditionalGeneration"

    def token_grid(self, path: Path, cfg: dict) -> tuple[int, tuple[int, int]]:
        n = int(self.model.config.image_seq_length)
        return n, grid_shape(n)

    # ---- visual side -------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        px = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    @torch.no_grad()
    def cls_attention(self, images: list[Image.Image]) -> torch.Tensor:
        cfg = self.model.config
        layer = (
            cfg.vision_feature_layer
            if isinstance(cfg.vision_feature_layer, int)
            else cfg.vision_feature_layer[-1]
        )
        with self._eager():
            out = self.model.model.vision_tower(self.pixel_values(images), output_attentions=True)
        attn = out.attentions[layer].float().sum(1)  # (B, S, S), summed over heads
        if cfg.vision_feature_select_strategy == "default":
            return attn[:, 0, 1:].cpu()  # CLS row, patch columns
        return attn.mean(1).cpu()  # no CLS (e.g. SigLIP): attention each token receives
