"""The reference MLLM: a tiny LLaVA trained on shapes-vqa, saved as an HF checkpoint.

Built from the real ``transformers`` classes (CLIP vision tower, LLaVA projector,
Llama LM) and a word-level tokenizer made offline, so it loads exactly like a
downloaded llava-hf checkpoint (model + processor + chat template).

The training recipe (alignment, then the LM on cached visual tokens, one question
per row) is in ``recipe.py``; the FACTS probe it starts from and what changed are in
BENCHMARKS.md.

    evocomp mllm train --out models/mllm
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from evocomp.config import MLLMParams
from evocomp.data import shapes, variants
from evocomp.mllm import tiny_llava
from evocomp.mllm.recipe import align, pixels, recipe_record, train_lm, visual
from evocomp.mllm.sequence import DEFAULT_TEMPLATE

# What a shapes-vqa recipe dump leaves out: how the model is used, and the knobs of the
# scenes-vqa model (shapes-vqa's is fixed), so its config.json, hence its id, stays as it was.
NOT_RECIPE = {"prompt_template", "benchmark", "grid", "lm_layers", "vision_layers", "vision_heads"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    return tiny_llava.build_tokenizer(shapes.WORDS)


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    return tiny_llava.build_processor(tokenizer, shapes.IMAGE_SIZE, shapes.CELL)


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int, heads: int = 8
) -> LlavaForConditionalGeneration:
    return tiny_llava.build_model(tokenizer, seed, shapes.IMAGE_SIZE, shapes.CELL, heads)


def train_reference(
    out: str | Path, params: MLLMParams, log: Callable[[str], None] = print
) -> Path:
    """Train the reference model with ``params`` and save it to ``out`` in HF format."""
    torch.set_num_threads(params.threads)
    t0 = time.time()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, params.seed, params.lm_heads)
    rng = random.Random(params.seed)
    objs = [shapes.make_scene(rng) for _ in range(params.n_images + params.val_images)]
    mix = variants.training_mix(params.backgrounds, len(objs), params.seed, "plain")
    scenes = [(shapes.render(o, *bg), o) for o, bg in zip(objs, mix, strict=True)]
    scenes, val_scenes = scenes[: params.n_images], scenes[params.n_images :]
    log(
        f"built model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {len(scenes)} images"
    )
    align(model, tokenizer, scenes, params, log)
    with torch.no_grad():
        feats, val_feats = (
            torch.cat(
                [
                    visual(model, pixels([s[0] for s in sc[i : i + 256]]))
                    for i in range(0, len(sc), 256)
                ]
            )
            for sc in (scenes, val_scenes)
        )
    log(f"alignment done in {time.time() - t0:.0f} s; training the LM")
    report = train_lm(model, tokenizer, scenes, feats, val_scenes, val_feats, params, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.evocomp = {
        # how to use a model is not how it was trained: prompt_template stays out of the recipe
        "recipe": recipe_record(params, NOT_RECIPE),
        "prompt_template": DEFAULT_TEMPLATE,
        "lm_steps_run": report["steps"],
        "held_out_accuracy": report["held_out"],
        # no wall time here: config.json is part of the model id, which must not change
        # when the same weights are trained again (the log line below has the time)
    }
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    log(f"saved reference model to {out} ({time.time() - t0:.0f} s in all)")
    return out
