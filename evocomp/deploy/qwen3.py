"""The Qwen3-VL hook: Qwen2-VL's shorter prefill, each kept token with its DeepStack vectors.

Qwen3-VL's sequence and 3-D M-RoPE positions are Qwen2-VL's, so the prefill's kept columns,
their original (t, h, w) ids and the decoding positions after the full sequence's rope delta
are :class:`evocomp.deploy.qwen.QwenPrefill`'s. What Qwen3-VL adds is DeepStack: the vision
tower gives E more vectors per visual token (``get_image_features(...).deepstack_features``,
a list over E of per-image ``(N, D)`` tuples), which the LLM adds to the visual positions'
hidden states after layers 0..E-1. ``Qwen3VLModel.forward`` builds that addition itself (the
visual positions from ``input_ids == image_token_id``, the vectors from
``mm_encoder_outputs["image"]``) and only on its ``input_ids`` route: fed ready-made
``inputs_embeds`` the LLM would get no DeepStack at all, and the forward does not let a caller
pass ``visual_pos_masks`` / ``deepstack_visual_embeds`` through to its language model.

So the prefill stays on the ``input_ids`` route (:meth:`Qwen3Prefill._feed`): the prompt ids of
the kept positions (the unkept ``<|image_pad|>`` placeholders removed) and an image encoder
output holding each image's kept rows only, its merged tokens and its E DeepStack vectors
alike. The model scatters the kept tokens into the kept placeholders and adds each one's own
DeepStack vectors at its position, as labeling and evaluation do
(:class:`evocomp.mllm.hf_qwen_vl.HFQwen3VL`: ``ImageTokens.extra``); a dropped token's vectors
go with it. The position ids are passed, so the model never recomputes them from the
shortened ids (which ``image_grid_thw`` would no longer describe).
"""

from __future__ import annotations

import torch

from evocomp.deploy.qwen import QwenPrefill


class Qwen3Prefill(QwenPrefill):
    """Drops unkept image positions from Qwen3-VL's prefill, DeepStack kept; see the module doc."""

    def __init__(self, model, tokenizer, template: str) -> None:
        super().__init__(model, tokenizer, template)
        self._out = None  # the prompt's image encoder output: pooler_output, deepstack_features

    def _features(self, inputs: dict) -> list[torch.Tensor] | None:
        """Per-image merged tokens ``(N, D)``: the ones ``generate()`` computed, else our own;
        the whole encoder output (DeepStack included) is kept for :meth:`_feed`."""
        mm = inputs.get("mm_encoder_outputs") or {}
        out = mm.get("image")
        if out is None and inputs.get("pixel_values") is not None:
            out = self.model.model.get_image_features(
                inputs["pixel_values"], inputs.get("image_grid_thw")
            )
        self._out = out
        return None if out is None else list(out.pooler_output)

    def _feed(
        self,
        inputs: dict,
        ids: torch.Tensor,
        feats: list[torch.Tensor],
        keep: torch.Tensor,
        kept: list[torch.Tensor],
    ) -> None:
        """The kept positions' ids ``(B, L_kept)`` and an encoder output of each image's kept
        rows: merged tokens ``(k, D)`` and, per DeepStack layer, ``(k, D)``."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            BaseModelOutputWithDeepstackFeatures,
        )

        rows = [r.to(f.device) for r, f in zip(kept, feats, strict=True)]  # ascending: id order
        deep = self._out.deepstack_features
        inputs["input_ids"] = ids[keep.to(ids.device)].view(ids.shape[0], -1)
        inputs["inputs_embeds"] = None
        inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(f[r] for f, r in zip(feats, rows, strict=True)),
                deepstack_features=[
                    tuple(d[r] for d, r in zip(layer, rows, strict=True)) for layer in deep
                ],
            )
        }
        self._out = None
