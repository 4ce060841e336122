"""The scenes-vqa reference MLLM: a tiny LLaVA for 144 (or 576) tokens, saved as an HF checkpoint.

The same real ``transformers`` classes and word-level tokenizer as shapes-vqa's
(``tiny_llava.py``), at ``grid x 16`` px; the recipe is in ``scenes_recipe.py``.

    evocomp --profile scenes mllm train --out models/scenes/mllm
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evocomp.config import MLLMParams
from evocomp.data import scenes, scenes_qa, variants
from evocomp.mllm import scenes_recipe, tiny_llava
from evocomp.mllm.recipe import pixels, recipe_record, visual
from evocomp.mllm.sequence import DEFAULT_TEMPLATE


def train_scenes_reference(
    out: str | Path, params: MLLMParams, log: Callable[[str], None] = print
) -> Path:
    """Train the scenes-vqa reference model with ``params`` and save it to ``out``."""
    torch.set_num_threads(params.threads)
    t0 = time.time()
    size = params.grid * scenes.CELL
    tokenizer = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    model = tiny_llava.build_model(
        tokenizer,
        params.seed,
        size,
        scenes.CELL,
        params.lm_heads,
        params.lm_layers,
        params.vision_layers,
        params.vision_heads,
    )
    rng = random.Random(params.seed)
    made = [scenes.make_scene(rng, params.grid) for _ in range(params.n_images + params.val_images)]
    mix = variants.training_mix(params.backgrounds, len(made), params.seed, "texture")
    # a scene draws its own noise seed (Scene.background_seed): the mix's goes unused
    data = [(scenes.render(s, style), s) for s, (style, _) in zip(made, mix, strict=True)]
    data, val = data[: params.n_images], data[params.n_images :]
    log(
        f"built model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
        f"{len(data)} images of {params.grid} x {params.grid} patches ({time.time() - t0:.0f} s)"
    )
    scenes_recipe.align(model, tokenizer, data, params, log)
    with torch.no_grad():
        feats, val_feats = (
            torch.cat(
                [
                    visual(model, pixels([d[0] for d in part[i : i + 128]]))
                    for i in range(0, len(part), 128)
                ]
            )
            for part in (data, val)
        )
    log(f"alignment done in {time.time() - t0:.0f} s; training the LM")
    report = scenes_recipe.train_lm(model, tokenizer, data, feats, val, val_feats, params, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.evocomp = {
        "recipe": recipe_record(params, {"prompt_template"}),
        "prompt_template": DEFAULT_TEMPLATE,
        "lm_steps_run": report["steps"],
        "held_out_accuracy": report["held_out"],
    }
    model.save_pretrained(out)
    tiny_llava.build_processor(tokenizer, size, scenes.CELL).save_pretrained(out)
    log(f"saved reference model to {out} ({time.time() - t0:.0f} s in all)")
    return out
