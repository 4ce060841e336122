"""LLaVA-NeXT and LLaVA-OneVision on tiny random checkpoints built from configs: the packed
base + tile sequence with its newlines against the HF model's own forward and generate,
images of different N in one batch, and a pipeline run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from evocomp.errors import ModelError
from evocomp.mllm.anyres import image_layout, layout_cells, pack
from evocomp.mllm.checkpoint import check_checkpoint, checkpoint_info
from evocomp.mllm.loader import load_mllm
from evocomp.mllm.reference import build_tokenizer
from tests.conftest import qwen_tokenizer
from tests.test_mllm_families import INTERLEAVE_TEMPLATE, answer_labels, user_turn

FAMILIES = ["llava_next", "llava_onevision"]
# 48-px crops of 16-px patches: a 3 x 3 base; a 96x96 image tiles 2 x 2 (a 6 x 6 grid), a
# 96-wide 160-high one 2 x 2 unpadded to 6 x 4. OneVision's anyres_max_2 then shrinks
# grids over 2 crops' worth of tokens (6 x 6 -> 4 x 4, 6 x 4 -> 5 x 3).
PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]


def make_tiny_llava_next(path, family: str = "llava_next", seed: int = 0):
    """A random LLaVA-NeXT (CLIP, Llama) or LLaVA-OneVision (SigLIP, Qwen2) with hidden 64,
    2 layers, saved with its PIL image processor and tokenizer like a downloaded one."""
    import transformers as tf
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    vision = dict(image_size=48, patch_size=16, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=PINPOINTS)
    if family == "llava_next":
        tok = build_tokenizer()
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(**vision),
            text_config=tf.LlamaConfig(
                vocab_size=len(tok), pad_token_id=tok.pad_token_id, **ids, **text
            ),  # fmt: skip
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        cls = tf.LlavaNextForConditionalGeneration
        proc = LlavaNextImageProcessorPil(size={"shortest_edge": 48},
                                          crop_size={"height": 48, "width": 48}, **norm)  # fmt: skip
    else:
        tok = qwen_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
        tok.chat_template = INTERLEAVE_TEMPLATE  # OneVision's format: Qwen markers, <image>
        ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        cfg = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**vision),
            text_config=tf.Qwen2Config(vocab_size=len(tok), **ids, **text),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            video_token_id=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=PINPOINTS,
            vision_aspect_ratio="anyres_max_2",
        )
        cls = tf.LlavaOnevisionForConditionalGeneration
        proc = LlavaOnevisionImageProcessorPil(size={"height": 48, "width": 48}, **norm)
    torch.manual_seed(seed)
    model = cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def next_vl(request, tmp_path_factory):
    return load_mllm(
        make_tiny_llava_next(tmp_path_factory.mktemp(request.param) / "m", request.param)
    )


def tall(img: Image.Image) -> Image.Image:
    return img.resize((96, 160))  # 96 wide, 160 high: another tile grid, another N


def native_inputs(m, img, question: str, answer: str = "") -> dict:
    """What the HF model takes: the chat template rendered, the answer after it, ``<image>``
    repeated once per packed token (newlines included), ``pixel_values`` and ``image_sizes``."""
    text = m.tokenizer.apply_chat_template(
        user_turn(question), tokenize=False, add_generation_prompt=True
    )
    px, sizes = m.pixels([img])
    n_packed = len(
        m.model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output[0]
    )
    sep = " " if answer and not text[-1:].isspace() else ""  # ASSISTANT: red, assistant\nred
    text = text.replace("<image>", "<image>" * n_packed) + sep + answer
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px,
            "image_sizes": sizes}  # fmt: skip


def test_loads_with_its_layout_and_info(next_vl, scene):
    img, _ = scene
    square, other = next_vl.image_tokens([img, tall(img)])
    side, rows, cols, single = square.layout.tolist()
    expect = (4, 4) if next_vl.family == "llava_onevision" else (6, 6)
    assert (side, (rows, cols), single) == (3, expect, 0)
    assert (
        square.tokens.shape == (9 + rows * cols, 64) and next_vl.n_tokens == 9 + 9
    )  # a 48-px square: one tile
    _, r2, c2, _ = other.layout.tolist()
    assert (r2, c2) == ((5, 3) if next_vl.family == "llava_onevision" else (6, 4))
    assert other.tokens.shape[0] == 9 + r2 * c2 != square.tokens.shape[0]
    # base token (1, 1) sits at the tile grid's centre; tile tokens on their grid, row-major
    assert square.cells[4].tolist() == [rows // 2, cols // 2]
    assert square.cells[9:].tolist() == [[r, c] for r in range(rows) for c in range(cols)]
    info = checkpoint_info(next_vl.path)
    assert (info["n_tokens"], info["family"], info["model_id"]) == (
        next_vl.n_tokens, next_vl.family, next_vl.model_id)  # fmt: skip
    if next_vl.family == "llava_next":  # the HF processor writes as many <image> as we feed
        from transformers import LlavaNextProcessor

        proc = LlavaNextProcessor(next_vl.image_processor, next_vl.tokenizer, patch_size=16,
                                  vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)  # fmt: skip
        for v, im in ((square, img), (other, tall(img))):
            ids = proc(images=[im], text=["<image> red"], return_tensors="pt")["input_ids"]
            n_fed = v.tokens.shape[0] + next_vl.block(v.layout)[2].shape[0]
            assert int((ids == next_vl.model.config.image_token_id).sum()) == n_fed
    scores = next_vl.cls_attention([img, tall(img)])
    assert [s.shape[0] for s in scores] == [9 + rows * cols, 9 + r2 * c2]
    assert all((s >= 0).all() for s in scores)


@pytest.mark.parametrize("wide", [False, True])
def test_all_tokens_loss_equals_the_model_forward(next_vl, scene, wide):
    img, qa = scene
    img = tall(img) if wide else img
    p = next_vl.encode(qa.question, qa.answer)
    inputs = native_inputs(next_vl, img, qa.question, qa.answer)
    (vis,) = next_vl.image_tokens([img])
    n_packed = inputs["input_ids"].shape[1] - len(p.prefix) - len(p.suffix) - len(p.answer)
    image_id = next_vl.model.config.image_token_id
    assert inputs["input_ids"][0].tolist() == p.prefix + [image_id] * n_packed + p.suffix + p.answer
    labels = answer_labels(inputs["input_ids"], len(p.answer))
    with torch.no_grad():
        native = float(next_vl.model(**inputs, labels=labels).loss)
    everything = torch.arange(vis.tokens.shape[0])[None]
    ours = float(next_vl.subset_loss(p, vis.tokens, everything, vis.layout)[0])
    assert abs(ours - native) < 2e-6, (ours, native)
    if wide:
        with pytest.raises(ModelError, match="do not fit"):
            next_vl.subset_loss(p, vis.tokens, everything)  # the default layout: another N


def test_subset_keeps_newlines_and_original_positions(next_vl, scene):
    """A subset's loss == the HF forward with the unkept tokens removed, every newline kept
    and the kept ones at their original positions."""
    img, qa = scene
    img = tall(img)
    p = next_vl.encode(qa.question, qa.answer)
    inputs = native_inputs(next_vl, img, qa.question, qa.answer)
    ids = inputs["input_ids"]
    (vis,) = next_vl.image_tokens([img])
    _, slots, fixed, _ = next_vl.block(vis.layout)
    packed = next_vl.model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    ).pooler_output[0]
    x = next_vl.model.get_input_embeddings()(ids)
    x[0, ids[0] == next_vl.model.config.image_token_id] = packed
    n = vis.tokens.shape[0]
    kept = torch.tensor([0, 4, 8, 9, 12, n - 1])  # base and tile tokens
    keep = ids[0] != next_vl.model.config.image_token_id
    keep[len(p.prefix) + slots[kept]] = True
    keep[len(p.prefix) + fixed] = True
    pos = torch.arange(ids.shape[1])[None]
    labels = answer_labels(ids, len(p.answer))
    removed = next_vl.model(
        inputs_embeds=x[:, keep].detach(),
        position_ids=pos[:, keep],
        attention_mask=torch.ones_like(pos[:, keep]),
        labels=labels[:, keep],
    ).loss.detach()
    ours = next_vl.subset_loss(p, vis.tokens, kept[None], vis.layout)[0]
    assert abs(float(ours) - float(removed)) < 2e-6, (float(ours), float(removed))
    other = next_vl.subset_loss(p, vis.tokens, torch.tensor([[1, 2, 3, 10, 11, 13]]), vis.layout)
    assert abs(float(other[0]) - float(ours)) > 1e-6  # which tokens are kept matters


def test_generate_equals_hf_generate(next_vl, scene):
    img, qa = scene
    for image in (img, tall(img)):
        inputs = native_inputs(next_vl, image, qa.question)
        out = next_vl.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        native = next_vl.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        (vis,) = next_vl.image_tokens([image])
        ours = next_vl.generate([qa.question], [vis.tokens], [None], 6, layouts=[vis.layout])[0]
        assert ours == native and len(ours.split()) >= 2, (ours, native)


def test_batched_images_of_different_n_and_pruned_generation(next_vl, scene):
    img, qa = scene
    square, other = next_vl.image_tokens([img, tall(img)])
    assert square.tokens.shape[0] != other.tokens.shape[0]
    qs = [qa.question, "how many red objects are there ?", qa.question]
    vis = [square.tokens, other.tokens, other.tokens]
    lays = [square.layout, other.layout, other.layout]
    kept = [None, torch.arange(0, other.tokens.shape[0], 3), torch.tensor([4, 20])]
    for layer in (0, 1):
        batch = next_vl.generate(qs, vis, kept, 3, prune_layer=layer, layouts=lays)
        alone = [
            next_vl.generate([q], [v], [k], 3, prune_layer=layer, layouts=[lay])[0]
            for q, v, k, lay in zip(qs, vis, kept, lays, strict=True)
        ]
        assert batch == alone
    full = [None] * 3
    assert next_vl.generate(qs, vis, full, 3, prune_layer=1, layouts=lays) == next_vl.generate(
        qs, vis, full, 3, layouts=lays
    )
    a = next_vl.text_attention(next_vl.encode(qa.question), other.tokens, layout=other.layout)
    assert a.shape == (other.tokens.shape[0],) and (a >= 0).all() and a.sum() <= 1 + 1e-5


def test_an_untiled_image_is_its_base_and_one_newline(next_vl):
    """OneVision's multi-image case (one crop): the model packs the base crop and a newline."""
    config = next_vl.model.config
    layout = image_layout(config, (96, 96), crops=1)
    assert layout.tolist() == [3, 0, 0, 1]
    n, slots, fixed, _ = next_vl.block(layout)
    assert (n, slots.tolist(), fixed.tolist()) == (9, list(range(9)), [9])
    feats = torch.randn(1, 9, 64)
    packed = pack(config, [feats], torch.tensor([[96, 96]]), next_vl.model.model.image_newline)[0]
    newline = next_vl.model.model.image_newline.detach()
    assert torch.equal(packed[slots], feats[0]) and torch.equal(packed[9], newline)
    assert layout_cells(layout).tolist() == [[r, c] for r in range(3) for c in range(3)]


def test_unsupported_tower_is_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = {"model_type": "llava_onevision", "vision_config": {"model_type": "pixtral"}}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="llava_onevision checkpoint with vision tower 'pixtral'"):
        check_checkpoint(ckpt)
    cfg["vision_config"]["model_type"] = "siglip_vision_model"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="needs preprocessor_config.json"):
        check_checkpoint(ckpt)
