"""A tiny LLaVA built from the real ``transformers`` classes, with a word-level tokenizer.

CLIP vision tower, LLaVA projector and Llama LM, and a tokenizer made offline from a word
list, so the saved folder loads exactly like a downloaded llava-hf checkpoint (model +
processor + chat template). The reference models of both built-in benchmarks are these.
"""

from __future__ import annotations

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

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(words) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (plus the specials), BOS first."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *words]))}
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


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch: int
) -> LlavaProcessor:
    """CLIP preprocessing at ``image_size`` px (mean = std = 0.5) and LLaVA's prompt expansion."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    image_size: int,
    patch: int,
    heads: int = 8,
    lm_layers: int = 2,
    vision_layers: int = 2,
    vision_heads: int = 2,
) -> LlavaForConditionalGeneration:
    """A 128-wide LLaVA for ``image_size`` px images of ``patch`` px patches, seeded."""
    torch.manual_seed(seed)
    n_tok = (image_size // patch) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            projection_dim=128,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=lm_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max(256, 2 * n_tok),
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
