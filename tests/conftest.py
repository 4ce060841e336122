"""Test environment: offline, project-local Prefect home, robust Prefect settings."""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

# Set before anything imports transformers or prefect.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "evocomp-test-prefect"))
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("EVOCOMP_DB_URL", None) if os.environ.get("CI") else None

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def bench_module(monkeypatch):
    """``bench_module("name")`` imports bench/name.py as the scripts import each other
    (bench/ on sys.path for the test only)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module


def make_tiny_llava(
    path: Path, image_size: int = 96, patch: int = 16, hidden: int = 64, seed: int = 0
) -> Path:
    """A random LlavaForConditionalGeneration built from configs and saved like a downloaded one."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from evocomp.mllm.reference import build_processor, build_tokenizer

    tok = build_tokenizer()
    n = (image_size // patch) ** 2
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    proc = build_processor(tok)
    proc.image_processor.size = {"shortest_edge": image_size}
    proc.image_processor.crop_size = {"height": image_size, "width": image_size}
    proc.patch_size = patch
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A small shapes-vqa dataset in LLaVA format (2 questions per image)."""
    from evocomp.data.synth import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, n=40, seed=3, questions_per_image=2)
    return out


@pytest.fixture(scope="module")
def scene():
    """One shapes-vqa image and a question about it (the model-family tests' sample)."""
    import random

    from evocomp.data import shapes

    rng = random.Random(5)
    objs = shapes.make_scene(rng)
    return shapes.render(objs), shapes.make_question(objs, rng)


from tests.pg import postgres_server, postgres_url  # noqa: E402, F401  (session PostgreSQL fixtures)

QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_CHAT_TEMPLATE = (  # Qwen2-VL's chat template, reduced to images and text
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """A word-level tokenizer with Qwen's special tokens and chat template (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from evocomp.data import shapes

    words = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant."]
    words = list(dict.fromkeys([*QWEN_SPECIALS, *words, *shapes.WORDS]))  # 'a', 'are' twice
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def make_tiny_qwen_vl(
    path: Path, family: str = "qwen2_vl", image_size: int = 96, patch: int = 8, seed: int = 0
) -> Path:
    """A random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (hidden 64, 2 layers) saved like a downloaded one.

    The processor's pixel range is pinned to ``image_size`` squared, so a square image of that
    size gives ``(image_size / (2 * patch))**2`` visual tokens (36 by default).
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
    )
    common = dict(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, depth=2)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        cls, config = Qwen3VLForConditionalGeneration, Qwen3VLConfig
        text = {**text, "head_dim": 16}
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        # deepstack: the tower's block 0 output, merged, is added after LLM layer 0
        vision = dict(**common, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=2, num_position_embeddings=144, deepstack_visual_indexes=[0])  # fmt: skip
    elif family == "qwen2_vl":
        cls, config = Qwen2VLForConditionalGeneration, Qwen2VLConfig
        vision = dict(**common, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    else:
        cls, config = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
        # window 4 * patch: 2x2 merged tokens per window, block 0 windowed, block 1 full
        vision = dict(**common, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=2, window_size=4 * patch, fullatt_block_indexes=[1])  # fmt: skip
    torch.manual_seed(seed)
    cfg = config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = cls(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    pixels = image_size * image_size
    Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=2,
        temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(path)  # fmt: skip
    return path


GEMMA3_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)  # fmt: skip
GEMMA3_CHAT_TEMPLATE = (  # Gemma 3's chat template, reduced to images and text
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma3_tokenizer():
    """A word-level tokenizer with Gemma 3's special tokens, BOS and chat template (offline);
    newlines are tokens of their own, as the image block's ``\\n\\n`` needs."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from evocomp.data import shapes

    words = list(dict.fromkeys([*GEMMA3_SPECIALS, "\n", "user", "model", *shapes.WORDS]))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
            pre_tokenizers.Split("\n", "isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    fast.chat_template = GEMMA3_CHAT_TEMPLATE
    return fast


def make_tiny_gemma3(
    path: Path, sliding_window: int = 24, image_size: int = 96, patch: int = 8, seed: int = 0
) -> Path:
    """A random Gemma3ForConditionalGeneration (hidden 64, a local and a global layer) saved
    with its processor like a downloaded one.

    SigLIP 96 px / patch 8 gives 12x12 patches, pooled 2x2 to 36 visual tokens (6x6). The
    local layer's window (24) is shorter than a prompt with 36 image tokens, so it slides.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = gemma3_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    rope = {"rope_type": "default"}
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], sliding_window=sliding_window,
        rope_parameters={"sliding_attention": {**rope, "rope_theta": 1e4},
                         "full_attention": {**rope, "rope_theta": 1e6}},
        max_position_embeddings=512, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )  # fmt: skip
    vision = SiglipVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, vision_use_head=False,
    )  # fmt: skip
    n = (image_size // patch // 2) ** 2
    torch.manual_seed(seed)
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=n,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    model = Gemma3ForConditionalGeneration(cfg)
    # the projector starts at zero (every visual token alike): give it random weights
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    model.generation_config.eos_token_id = ids["<eos>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(path)
    images = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    Gemma3Processor(
        images, tok, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=n
    ).save_pretrained(path)
    return path


def reference_greedy(m, ref: dict, steps: int) -> list[int]:
    """Gemma 3's greedy decoding by full HF forwards (no cache) on one prompt given as
    ``inputs_embeds``, ``position_ids`` and ``token_type_ids`` (the image block): each new
    token at the next position after the last prompt one, a text token."""
    x, pos, types = ref["inputs_embeds"], ref["position_ids"], ref["token_type_ids"]
    out: list[int] = []
    for _ in range(steps):
        # a mask, else transformers reads the gaps in the position ids as packed sequences
        mask = torch.ones_like(types)
        with torch.no_grad():
            logits = m.model(
                inputs_embeds=x, attention_mask=mask, position_ids=pos, token_type_ids=types
            ).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok == m.tokenizer.eos_token_id:
            break
        x = torch.cat([x, m.model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], 1)
    return out
