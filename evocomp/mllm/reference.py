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
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from evocomp.config import MLLMParams
from evocomp.data import shapes
from evocomp.mllm.recipe import align, pixels, train_lm, visual
from evocomp.mllm.sequence import DEFAULT_TEMPLATE

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIALS, *shapes.WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shapes.CELL,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int, heads: int = 8
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    n_tok = shapes.GRID * shapes.GRID
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=shapes.IMAGE_SIZE,
            patch_size=shapes.CELL,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=128,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_tok,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config).eval()


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
    scenes = [(shapes.render(o), o) for o in objs]
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
        "recipe": params.model_dump(exclude={"prompt_template"}),
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
