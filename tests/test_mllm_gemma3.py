"""Gemma 3 on tiny random checkpoints built from configs: the prompt its processor writes, the
bidirectional image block over the kept tokens, the HF model's own forward and generate, and
a pipeline run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evocomp.errors import ModelError
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.mllm.loader import load_mllm
from evocomp.mllm.prompts import FAMILY_TEMPLATES
from tests.conftest import make_tiny_gemma3, reference_greedy

SEED = 3  # a random model whose greedy answers change from token to token (seed 0 repeats one)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load_mllm(make_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "m", seed=SEED))


@pytest.fixture(scope="module")
def gemma_wide(tmp_path_factory):
    """The same model with a local window longer than any prompt here (as on released models,
    whose 1024-token window holds 256 image tokens and a question)."""
    path = tmp_path_factory.mktemp("gemma3-wide") / "m"
    return load_mllm(make_tiny_gemma3(path, sliding_window=512, seed=SEED))


def native_inputs(m, img, question: str, answer: str = "") -> dict:
    """What Gemma 3's own processor feeds the model: the chat template rendered, the answer
    after it, ``<start_of_image>`` expanded to the image block, and ``token_type_ids``."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = m.processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    # the template writes <bos> itself (as apply_chat_template(tokenize=True) does, no second)
    inputs = m.processor(
        images=img, text=text + answer, return_tensors="pt", add_special_tokens=False
    )
    inputs.pop("num_crops", None)
    return dict(inputs)


def answer_labels(ids: torch.Tensor, n: int) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -n:] = ids[:, -n:]
    return labels


def test_gemma3_loads_with_its_grid_and_prompt(gemma, scene):
    img, qa = scene
    assert gemma.n_tokens == 36 and gemma.grid == (6, 6) and gemma.n_layers == 2
    info = checkpoint_info(gemma.path)
    assert (info["n_tokens"], info["grid"], info["model_id"]) == (36, (6, 6), gemma.model_id)
    assert info["family"] == "gemma3" and info["hidden_size"] == gemma.hidden_size == 64
    assert gemma.visual_tokens([img, img.rotate(90)]).shape == (2, 36, 64)
    assert gemma.template == (  # the chat template rendered, <start_of_image> made the block
        "<bos><start_of_turn>user\n\n\n<start_of_image><image><end_of_image>\n\n{question}"
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    p = gemma.encode(qa.question, qa.answer)
    ids = native_inputs(gemma, img, qa.question, qa.answer)["input_ids"][0].tolist()
    assert ids == p.prefix + [gemma.model.config.image_token_id] * 36 + p.suffix + p.answer
    assert gemma.tokenizer.convert_ids_to_tokens(p.prefix)[:2] == ["<bos>", "<start_of_turn>"]


def test_gemma3_without_a_chat_template_uses_the_family_format(gemma, tmp_path, scene):
    _, qa = scene
    bare = shutil.copytree(gemma.path, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    m = load_mllm(bare)
    assert m.template == FAMILY_TEMPLATES["gemma3"] != gemma.template
    assert m.encode(qa.question, qa.answer) == gemma.encode(qa.question, qa.answer)


def test_gemma3_all_tokens_loss_equals_the_model_forward(gemma, scene):
    img, qa = scene
    p = gemma.encode(qa.question, qa.answer)
    inputs = native_inputs(gemma, img, qa.question, qa.answer)
    labels = answer_labels(inputs["input_ids"], len(p.answer))
    with torch.no_grad():
        native = float(gemma.model(**inputs, labels=labels).loss)
        causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        causal = float(gemma.model(**causal, labels=labels).loss)
    ours = float(gemma.subset_loss(p, gemma.visual_tokens([img])[0], torch.arange(36)[None])[0])
    assert abs(ours - native) < 1e-5, (ours, native)  # measured <= 2.4e-7 on 8 samples
    assert abs(causal - native) > 1e-4  # measured >= 1.2e-3: the bidirectional block counts


def shortened(m, img, qa, kept: torch.Tensor, types: bool = True) -> dict:
    """The HF model's own inputs without the unkept image tokens: embeddings with the visual
    tokens in place, the kept tokens' and the text's original position ids, and (``types``)
    ``token_type_ids`` of the shortened sequence, from which the model builds its image block."""
    p = m.encode(qa.question, qa.answer)
    inputs = native_inputs(m, img, qa.question, qa.answer)
    ids = inputs["input_ids"]
    image = ids[0] == m.model.config.image_token_id
    with torch.no_grad():
        x = m.model.get_input_embeddings()(ids)
        x[0, image] = m.model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    keep = ~image
    keep[len(p.prefix) + kept] = True
    out = {
        "inputs_embeds": x[:, keep],
        "position_ids": torch.arange(ids.shape[1])[None, keep],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "labels": answer_labels(ids, len(p.answer))[:, keep],
    }
    if types:
        out["token_type_ids"] = inputs["token_type_ids"][:, keep]
    return out


KEPT = torch.tensor([0, 5, 6, 17, 30, 35])


def test_gemma3_subset_is_the_model_on_the_shortened_sequence(gemma, scene):
    """A subset's loss == the HF forward on the sequence without the unkept image tokens, the
    kept ones at their original positions and forming the bidirectional image block."""
    img, qa = scene
    p = gemma.encode(qa.question, qa.answer)
    v = gemma.visual_tokens([img])[0]
    ref = shortened(gemma, img, qa, KEPT)
    assert ref["position_ids"].shape[1] > gemma.lm.config.sliding_window  # the local layer slides
    with torch.no_grad():
        native = float(gemma.model(**ref).loss)
        causal = float(gemma.model(**shortened(gemma, img, qa, KEPT, types=False)).loss)
    ours = float(gemma.subset_loss(p, v, KEPT[None])[0])
    assert abs(ours - native) < 1e-5, (ours, native)
    assert abs(causal - native) > 1e-4, (causal, native)  # a causal-only mask fails here
    other = float(gemma.subset_loss(p, v, torch.tensor([[1, 2, 3, 4, 7, 8]]))[0])
    assert abs(other - ours) > 1e-6  # which tokens are kept matters
    # rows of one population forward are independent of each other
    rows = gemma.subset_loss(p, v, torch.stack([KEPT, torch.tensor([1, 2, 3, 4, 7, 8])]))
    torch.testing.assert_close(rows, torch.tensor([ours, other]), rtol=0, atol=1e-5)


def test_gemma3_subset_equals_masking_when_the_window_holds_the_prompt(gemma_wide, gemma, scene):
    """With a window longer than the prompt, dropping tokens == masking them out of the full
    sequence. With a shorter one it does not: a local layer's window counts the tokens fed."""
    img, qa = scene
    for m, same in ((gemma_wide, True), (gemma, False)):
        p = m.encode(qa.question, qa.answer)
        inputs = native_inputs(m, img, qa.question, qa.answer)
        image = inputs["input_ids"][0] == m.model.config.image_token_id
        keep = ~image
        keep[len(p.prefix) + KEPT] = True
        labels = answer_labels(inputs["input_ids"], len(p.answer))
        with torch.no_grad():
            masked = float(
                m.model(**{**inputs, "attention_mask": keep[None].long()}, labels=labels).loss
            )
        ours = float(m.subset_loss(p, m.visual_tokens([img])[0], KEPT[None])[0])
        assert (abs(ours - masked) < 1e-5) == same, (m.lm.config.sliding_window, ours, masked)


def test_gemma3_generate_equals_hf_generate(gemma, scene):
    img, qa = scene
    inputs = native_inputs(gemma, img, qa.question)
    with torch.no_grad():
        out = gemma.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    native = gemma.tokenizer.decode(new, skip_special_tokens=True).strip()
    v = gemma.visual_tokens([img])[0]
    ours = gemma.generate([qa.question], [v], [None], max_new_tokens=6)[0]
    assert ours == native and len(set(ours.split())) >= 2  # several distinct steps
    # a subset: the prefill without the unkept tokens, then the cache, == full HF forwards
    p = gemma.encode(qa.question)
    ref = shortened(gemma, img, qa, KEPT)
    ref = {k: t[:, : -len(gemma.encode(qa.question, qa.answer).answer)] for k, t in ref.items()}
    assert ref["inputs_embeds"].shape[1] == len(p.prefix) + len(KEPT) + len(p.suffix)
    ids = reference_greedy(gemma, ref, 6)
    expected = gemma.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert gemma.generate([qa.question], [v], [KEPT], max_new_tokens=6)[0] == expected


def test_gemma3_batched_and_pruned_generation(gemma, scene):
    img, qa = scene
    v = gemma.visual_tokens([img])[0]
    qs = [qa.question, "how many red objects are there ?", qa.question]
    kept = [None, torch.arange(0, 36, 3), torch.tensor([4])]
    batch = gemma.generate(qs, [v, v, v], kept, max_new_tokens=3)  # left-padded image blocks
    assert batch == [gemma.generate([q], [v], [k], 3)[0] for q, k in zip(qs, kept, strict=True)]
    full = [None, None, None]
    assert gemma.generate(qs, [v] * 3, full, 3, prune_layer=1) == gemma.generate(
        qs, [v] * 3, full, 3
    )
    pruned = gemma.generate(qs, [v, v, v], kept, 3, prune_layer=1)
    assert pruned == [
        gemma.generate([q], [v], [k], 3, prune_layer=1)[0] for q, k in zip(qs, kept, strict=True)
    ]
    with pytest.raises(ValueError, match="prune layer"):
        gemma.generate(qs, [v] * 3, kept, 3, prune_layer=2)


def test_gemma3_pruning_path_is_the_model_forward(gemma, scene):
    """The layer-by-layer forward (per-layer-type masks and RoPE) == the LLM's own forward
    when every token survives; dropping tokens after layer 1 changes the last position."""
    img, qa = scene
    v = gemma.visual_tokens([img])[0]
    qs = [qa.question, "how many red objects are there ?"]
    x, mask, pos, image = gemma._prompt_rows(qs, [v, v], [None, None])
    with torch.no_grad():
        attn = gemma.llm_mask(x, mask, pos, image)
        full = gemma.lm(inputs_embeds=x, attention_mask=attn, position_ids=pos).last_hidden_state
        everyone = torch.ones_like(mask, dtype=torch.bool)
        pruned = gemma._hidden_pruned(x, mask, pos, image, everyone, 1)
        torch.testing.assert_close(pruned, full[:, -1], rtol=1e-4, atol=1e-5)
        some = everyone.clone()
        some[:, 10:30] = False
        assert not torch.allclose(gemma._hidden_pruned(x, mask, pos, image, some, 1), pruned)


def test_gemma3_attention_scores(gemma, scene):
    img, qa = scene
    v = gemma.visual_tokens([img])[0]
    p = gemma.encode(qa.question)
    a = gemma.text_attention(p, v, layer=2)
    # FastV: the HF model's own eager attention at layer 2, image block included
    inputs = native_inputs(gemma, img, qa.question)
    with gemma._eager(), torch.no_grad():
        res = gemma.model(**inputs, output_attentions=True)
    start = len(p.prefix)
    native = res.attentions[1][0, :, -1, start : start + 36].float().mean(0)
    torch.testing.assert_close(a, native, rtol=1e-4, atol=1e-6)
    c = gemma.cls_attention([img, img.rotate(90)])
    heads = gemma.model.config.vision_config.num_attention_heads
    assert c.shape == (2, 36) and (c >= 0).all() and not torch.allclose(c[0], c[1])
    torch.testing.assert_close(c.sum(1), torch.full((2,), float(heads)), rtol=1e-4, atol=1e-4)
    # in token order: each token's patches, as the projector's own pooling groups them
    with gemma._eager(), torch.no_grad():
        out = gemma.model.model.vision_tower(gemma.pixel_values([img]), output_attentions=True)
    received = out.attentions[-1].float().sum(1).mean(1).reshape(1, 1, 12, 12)
    proj = gemma.model.model.multi_modal_projector
    torch.testing.assert_close(c[:1], proj.avg_pool(received).flatten(1) * proj.kernel_size**2)


def test_gemma3_checkpoint_checks(tmp_path):
    for name, cfg, match in [
        ("clip", {"vision_config": {"model_type": "clip_vision_model"}}, "vision tower 'clip"),
        ("odd", {"mm_tokens_per_image": 35}, "mm_tokens_per_image 35 is not a square"),
        ("uneven", {"mm_tokens_per_image": 25}, "pools the tower's 14x14 patches evenly"),
    ]:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "gemma3", **cfg}))
        (path / "model.safetensors").write_bytes(b"\0" * 16)
        with pytest.raises(ModelError, match=match):
            checkpoint_info(path)
