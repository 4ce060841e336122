"""HF Gemma 3 backend: ``Gemma3ForConditionalGeneration`` checkpoints (SigLIP tower).

Visual tokens are the SigLIP tower's patches average-pooled to ``mm_tokens_per_image`` (256
on released models: a 16x16 grid) and projected; the processor resizes every image to the
tower's size, so N is fixed per model. The processor writes an image as
``\\n\\n<start_of_image>`` + N soft tokens + ``<end_of_image>\\n\\n`` where the chat template
puts ``<start_of_image>`` (:data:`evocomp.mllm.prompts.GEMMA3_IMAGE_BLOCK`); the template
here is written the same way. Positions are 1-D; token embeddings are scaled by sqrt(D),
visual tokens are not.

Attention: an image's tokens attend to each other both ways (the model builds that block
from ``token_type_ids``), the rest is causal, in sliding-window (local) and global layers
with a RoPE base each. A subset's kept tokens form the image block: they see each other both
ways, keep their original positions, and so does the text after them. The masks are
transformers' own (``create_masks_for_vision_model``), so a subset forward is the model's
forward on the shortened sequence. A local layer's window counts the tokens fed, as the
model's does for any sequence: once tokens are dropped, a prompt longer than the window sees
further back than with all N (released windows, 1024 tokens, hold 256 image tokens and a
question). Pruning after LLM layer l > 0 keeps the surviving image tokens one block.

The processor is ``AutoProcessor`` (its image processor falls back to the PIL backend,
``Gemma3ImageProcessorPil``, without torchvision); pan-and-scan crops are off (one image,
N tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from evocomp.mllm.checkpoint import gemma3_grid
from evocomp.mllm.hf_adapter import HFAdapter


class HFGemma3(HFAdapter):
    """The MLLM protocol over a local Gemma 3 checkpoint directory."""

    family = "gemma3"
    n_tokens_key = "mm_tokens_per_image"  # the config key that fixes N
    model_class = "Gemma3ForConditionalGeneration"

    def token_grid(self, path: Path, cfg: dict) -> tuple[int, tuple[int, int]]:
        grid = gemma3_grid(path, cfg)
        return grid[0] * grid[1], grid

    def vocab_embeddings(self) -> torch.Tensor:
        """The input embeddings as the LLM sees them ``(V, D)`` (scaled by sqrt(D))."""
        return (self.embed.weight * self.embed.embed_scale).detach().float().cpu()

    # ---- attention ---------------------------------------------------------------------------
    def llm_mask(self, x, mask, pos, image):
        """Gemma's masks per layer type: causal (local: within the window) or-ed with one
        bidirectional block over the visual tokens of each row."""
        from transformers.models.gemma3.modeling_gemma3 import (
            create_masks_for_vision_model,
            get_block_sequence_ids_for_mask,
        )

        return create_masks_for_vision_model(
            config=self.lm.config,
            inputs_embeds=x,
            attention_mask=mask,
            cache=None,
            position_ids=pos,
            block_sequence_ids=get_block_sequence_ids_for_mask(image.long(), device=x.device),
        )

    def layer_inputs(self, h, mask, pos, image) -> list[tuple]:
        """Each layer's type picks its mask and its RoPE (local and global bases differ)."""
        masks = self.llm_mask(h, mask, pos, image)
        types = self.lm.config.layer_types[: self.n_layers]
        rope = {t: self.lm.rotary_emb(h, pos, t) for t in set(types)}
        return [(masks[t], rope[t]) for t in types]

    # ---- visual side -------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.processor.image_processor(
            images=images, do_pan_and_scan=False, return_tensors="pt"
        )
        return out["pixel_values"].to(self.device, self.dtype)

    @torch.no_grad()
    def cls_attention(self, images: list[Image.Image]) -> torch.Tensor:
        """VisionZip's score without a CLS token ``(B, N)``: the attention each patch receives
        in the tower's last layer (mean over queries, summed over heads), summed over the
        k x k patches each visual token pools, as for a SigLIP tower in LLaVA."""
        with self._eager():
            out = self.model.model.vision_tower(self.pixel_values(images), output_attentions=True)
        received = out.attentions[-1].float().sum(1).mean(1)  # (B, S), S = P * P patches
        proj = self.model.model.multi_modal_projector
        side, k = proj.tokens_per_side, proj.kernel_size
        # patches are row-major on a P x P grid; token (r, c) pools rows r*k.. and cols c*k..
        blocks = received.reshape(len(images), side, k, side, k)
        return blocks.sum((2, 4)).flatten(1).cpu()
