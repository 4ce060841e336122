"""The Gemma 3 hook: a shorter prefill for ``Gemma3ForConditionalGeneration.generate()``.

Gemma 3's LLM input is LLaVA's (image features scattered into the ``<image_soft_token>``
placeholders, text embeddings scaled by sqrt(D) inside the embedding layer itself), and its
positions are 1-D, so the prefill is rewritten as for LLaVA
(:class:`evocomp.deploy.llava.LlavaPrefill`): the kept positions' embeddings, attention mask
and original position ids only. What differs is the attention: an image's tokens attend to
each other both ways, the rest is causal (local layers: within the sliding window). The model
builds that from ``token_type_ids`` (1 on the image tokens) at the forward that gets them,
which in ``generate()`` is the prefill only (``prepare_inputs_for_generation`` passes them on
the first iteration and None after, so decoding steps are causal over the cache). The hook
shortens them with the rest: the kept image tokens stay one bidirectional block, as labeling
and evaluation build it (:class:`evocomp.mllm.hf_gemma3.HFGemma3`), and the masks are the
model's own (``create_masks_for_vision_model``) on the shortened sequence. A local layer's
window counts the tokens fed, as in labeling.

The processor writes an image as ``\\n\\n<start_of_image>`` + N soft tokens +
``<end_of_image>\\n\\n`` where the text has ``<start_of_image>``; the soft tokens are the ones
dropped, the markers stay. :func:`evocomp.deploy.prompt.processor_text` writes a prompt from
the template (``CompressedModel.prompt``); ``AutoProcessor`` loads without torchvision.
"""

from __future__ import annotations

import torch

from evocomp.deploy.llava import LlavaPrefill, Pick, Selection


class Gemma3Prefill(LlavaPrefill):
    """Drops unkept image positions from Gemma 3's prefill, the rest one block; see the module doc."""

    def _features(self, inputs: dict) -> list[torch.Tensor] | None:
        """Per-image projected tokens ``(N, D)``: the ones ``generate()`` computed, else our own."""
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return list(mm["image"].pooler_output)
        if inputs.get("pixel_values") is not None:
            return list(self.model.model.get_image_features(inputs["pixel_values"]).pooler_output)
        return None

    def _embeddings(self, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """The LLM input ``(B, L, D)``: text embeddings (scaled by sqrt(D) in the embedding
        layer), image features unscaled in the placeholders. The placeholders are embedded as
        id 0 first, as the model's forward does when the image id is outside the vocabulary."""
        image = ids == self.image_token_id  # (B, L)
        x = self.model.get_input_embeddings()(ids.masked_fill(image, 0))  # (B, L, D)
        feats = torch.cat(feats).to(x.device, x.dtype)  # (B * N, D)
        return x.masked_scatter(image.unsqueeze(-1).to(x.device), feats)

    def prefill(self, inputs: dict, pick: Pick, questions: list[str] | None) -> Selection | None:
        types = inputs.get("token_type_ids")  # (B, L), read before the prefill drops positions
        sel = super().prefill(inputs, pick, questions)
        if sel is None:
            return None
        if types is None:
            raise ValueError(
                "a compressed Gemma 3 generate() needs the prompt's token_type_ids (pass "
                "everything the processor returns): without them the image block is causal, "
                "not the bidirectional one labeling scored"
            )
        B = types.shape[0]
        inputs["token_type_ids"] = types[self._keep.to(types.device)].view(B, sel.prefill_tokens)
        return sel
