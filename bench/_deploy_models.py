"""The models ``bench/deploy_speed.py`` times: random weights in released checkpoints' shapes.

Not a benchmark itself. Each ``*_subject`` builds a model with its processor and the prompt
around the test image (:class:`Subject`); nothing is downloaded, and the weights (random) do
not change the time.

- LLaVA: ``bench/speedup.py``'s model (llava-interleave-qwen-0.5b: SigLIP-so400m at 384 px,
  729 visual tokens, Qwen2-0.5B), driven by the reference model's word-level tokenizer.
- Qwen2.5-VL: Qwen2.5-VL-3B-Instruct's config (:class:`QwenShape`; a 32-block ViT, windowed
  but for 4 full-attention blocks, and Qwen2.5-3B: 3.75B parameters), a word-level tokenizer
  over shapes-vqa's words with Qwen's special tokens, Qwen2-VL's PIL image processor (no
  torchvision) with the released pixel range: a 448 x 448 image gives 32 x 32 patches of
  14 px, merged 2 x 2 into 16 x 16 = 256 visual tokens. The vocabulary is Qwen2.5's (151,936
  rows, tied input and output embeddings, as in the 3B checkpoint) unless ``vocab`` shrinks
  it; the tokenizer uses only its first few dozen ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from speedup import Shape, build_model

from evocomp.deploy import QwenProcessor
from evocomp.deploy.prompt import prompt_text, template_of
from evocomp.mllm.sequence import DEFAULT_TEMPLATE

QUESTION = "is there a red circle ? how many blue objects are there ? what colour is the cross ?"
TINY = Shape(
    vision_hidden=32, vision_ffn=64, vision_layers=2, vision_heads=2, image_size=96,
    patch_size=16, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=256,
)  # fmt: skip
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN25_VOCAB = 151936
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Subject:
    """A timing model with what ``deploy_speed.measure`` needs around it."""

    model: Any
    processor: Any
    prompt: str  # the processor's text=: the question in the family's template
    side: int  # px, the square test image
    grid: int  # visual tokens per image side
    vision: torch.nn.Module  # the vision tower: it runs whatever is kept
    info: dict[str, Any]  # the report's "model" entry


def build(shape: Shape, device, dtype):
    """``(model, processor)``: the timing model, driven by the reference word-level tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from evocomp.mllm.reference import build_tokenizer

    tok = build_tokenizer()
    model = build_model(shape, device, dtype)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")  # within any vocab
    size = shape.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tok,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="full",  # as build_model: no CLS to drop
        num_additional_image_tokens=0,
    )
    return model, processor


def llava_subject(tiny: bool, device, dtype, vocab: int | None = None) -> Subject:
    """The model of ``bench/speedup.py``: llava-interleave-qwen-0.5b's shape."""
    shape = TINY if tiny else Shape()
    model, processor = build(shape, device, dtype)
    vcfg = model.config.vision_config
    name = (
        "tiny smoke-run shape"
        if tiny
        else "llava-interleave-qwen-0.5b shapes (SigLIP-so400m + Qwen2-0.5B)"
    )
    info = {
        "name": name + ", random weights",
        "shape": asdict(shape),
        "params": sum(p.numel() for p in model.parameters()),
    }
    prompt = DEFAULT_TEMPLATE.replace("{question}", QUESTION)
    grid = vcfg.image_size // vcfg.patch_size
    return Subject(model, processor, prompt, vcfg.image_size, grid, model.model.vision_tower, info)


@dataclass(frozen=True)
class QwenShape:
    """Dimensions of the Qwen timing model; the defaults are Qwen2.5-VL-3B-Instruct's."""

    hidden: int = 2048  # text: Qwen2.5-3B
    ffn: int = 11008
    layers: int = 36
    heads: int = 16  # head_dim 128
    kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # (t, h, w) halves of head_dim 128
    vocab: int = QWEN25_VOCAB
    vision_depth: int = 32  # vision: a 669M ViT
    vision_hidden: int = 1280
    vision_ffn: int = 3420
    vision_heads: int = 16
    patch_size: int = 14
    merge: int = 2  # 2 x 2 patches -> one visual token
    window_size: int = 112  # px: windows of 4 x 4 merged tokens
    fullatt_blocks: tuple[int, ...] = (7, 15, 23, 31)  # the other blocks attend within windows
    image_size: int = 448  # px, square: (448 / 28)^2 = 256 visual tokens

    @property
    def grid(self) -> int:
        """Visual tokens per image side."""
        return self.image_size // (self.patch_size * self.merge)


# 96 px / 16 = 6 x 6 = 36 visual tokens, in 3 x 3 windows of 2 x 2; block 1 attends fully
TINY_QWEN = QwenShape(
    hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, mrope_section=(2, 3, 3), vocab=256,
    vision_depth=2, vision_hidden=32, vision_ffn=64, vision_heads=2, patch_size=8,
    window_size=32, fullatt_blocks=(1,), image_size=96,
)  # fmt: skip


def qwen_tokenizer():
    """A word-level tokenizer with Qwen's special tokens (offline; ``<unk>`` for other words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from evocomp.data import shapes

    words = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant."]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*QWEN_SPECIALS, *words, *shapes.WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    return fast


def build_qwen(shape: QwenShape, device: torch.device | str = "cpu", dtype=torch.float32):
    """``(model, processor)``: a random ``Qwen2_5_VLForConditionalGeneration`` in eval mode,
    built directly in ``dtype`` (no float32 copy first), and a :class:`QwenProcessor`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = qwen_tokenizer()
    if shape.vocab < len(tok):
        raise ValueError(f"vocab {shape.vocab} is smaller than the tokenizer's {len(tok)} ids")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    rope = {"rope_type": "default", "mrope_section": list(shape.mrope_section), "rope_theta": 1e6}
    text = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, rms_norm_eps=1e-6, max_position_embeddings=128000,
        rope_parameters=rope, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
    )  # fmt: skip
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_ffn, num_heads=shape.vision_heads,
        patch_size=shape.patch_size, spatial_merge_size=shape.merge, temporal_patch_size=2,
        window_size=shape.window_size, out_hidden_size=shape.hidden,
        fullatt_block_indexes=list(shape.fullatt_blocks), tokens_per_second=2,
    )  # fmt: skip
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,  # as the 3B checkpoint
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    # the released checkpoint's preprocessor_config.json
    images = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=shape.patch_size,
        merge_size=shape.merge, temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return model.eval(), QwenProcessor(images, tok)


def qwen_subject(tiny: bool, device, dtype, vocab: int | None = None) -> Subject:
    """Qwen2.5-VL-3B-Instruct's shape, the vocabulary shrunk to ``vocab`` if given."""
    shape = TINY_QWEN if tiny else QwenShape()
    shape = replace(shape, vocab=vocab) if vocab else shape
    model, processor = build_qwen(shape, device, dtype)
    name = (
        "tiny smoke-run shape"
        if tiny
        else "Qwen2.5-VL-3B-Instruct shapes (32-block windowed ViT + Qwen2.5-3B)"
    )
    vocab_note = (
        "Qwen2.5's full vocabulary, tied embeddings"
        if shape.vocab == QWEN25_VOCAB
        else f"shrunk from {QWEN25_VOCAB}: the embedding and the LM head shrink; the head runs "
        "on one position per step, in every variant alike"
    )
    info = {
        "name": name + ", random weights",
        "shape": asdict(shape),
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "vocab_note": vocab_note,
    }
    prompt = prompt_text(template_of(model, processor), QUESTION, processor.image_token)
    return Subject(model, processor, prompt, shape.image_size, shape.grid, model.model.visual, info)
