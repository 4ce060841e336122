"""Model families on tiny random checkpoints built from configs: prompts from chat templates,
Qwen2-VL / Qwen2.5-VL against the HF model's own forward and generate, and a pipeline run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from evocomp.config import MLLMParams
from evocomp.errors import ModelError
from evocomp.mllm.checkpoint import checkpoint_id, checkpoint_info
from evocomp.mllm.loader import load_mllm
from evocomp.mllm.prompts import render_chat_template
from evocomp.mllm.reference import build_tokenizer
from evocomp.mllm.sequence import DEFAULT_TEMPLATE
from evocomp.mllm.tiny_llava import CHAT_TEMPLATE
from tests.conftest import make_tiny_llava, make_tiny_qwen_vl

QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# ---- prompts from the chat template ------------------------------------------------------------
INTERLEAVE_TEMPLATE = (  # llava-interleave-qwen's format: Qwen's chat markers around <image>
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    """A tiny LLaVA whose tokenizer and processor carry a Qwen-style chat template."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = make_tiny_llava(tmp_path_factory.mktemp("interleave") / "m")
    proc = AutoProcessor.from_pretrained(path)
    proc.tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    proc.tokenizer.add_tokens(["user", "assistant"])
    proc.tokenizer.chat_template = proc.chat_template = INTERLEAVE_TEMPLATE
    model = LlavaForConditionalGeneration.from_pretrained(path)
    model.resize_token_embeddings(len(proc.tokenizer))
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_reference_chat_template_renders_the_llava_prompt():
    assert render_chat_template(build_tokenizer(), CHAT_TEMPLATE, "<image>") == DEFAULT_TEMPLATE


def test_prompt_comes_from_the_chat_template(interleave, scene):
    img, qa = scene
    m = load_mllm(interleave)
    assert m.template == "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    # the processor's own path: render the template, append the answer, expand <image>
    text = m.processor.apply_chat_template(
        user_turn(qa.question), tokenize=False, add_generation_prompt=True
    )
    inputs = m.processor(images=img, text=text + qa.answer, return_tensors="pt")
    p = m.encode(qa.question, qa.answer)
    ids = inputs["input_ids"][0].tolist()
    assert ids == p.prefix + [m.model.config.image_token_id] * m.n_tokens + p.suffix + p.answer
    # the answer follows the assistant tag directly, as the template writes it
    assert m.tokenizer.convert_ids_to_tokens(p.suffix[-2:]) == ["<|im_start|>", "assistant"]
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -len(p.answer) :] = inputs["input_ids"][:, -len(p.answer) :]
    native = m.model(**inputs, labels=labels).loss
    ours = m.subset_loss(p, m.visual_tokens([img])[0], torch.arange(m.n_tokens)[None])[0]
    assert abs(float(ours) - float(native)) < 1e-5


def test_the_override_wins_and_names_another_model(interleave, scene):
    _, qa = scene
    plain = load_mllm(interleave)
    m = load_mllm(interleave, prompt_template=DEFAULT_TEMPLATE)
    assert m.template == DEFAULT_TEMPLATE and m.prompt_override == DEFAULT_TEMPLATE
    assert m.encode(qa.question) != plain.encode(qa.question)
    assert m.model_id != plain.model_id  # labels under another prompt are other labels
    assert checkpoint_info(interleave, DEFAULT_TEMPLATE)["model_id"] == m.model_id
    assert checkpoint_info(interleave)["model_id"] == plain.model_id
    with pytest.raises(ModelError, match="exactly one <image>"):
        load_mllm(interleave, prompt_template="USER: {question} ASSISTANT:")
    with pytest.raises(ValidationError, match="exactly one <image> and one"):
        MLLMParams(prompt_template="<image> <image> {question}")


def test_a_recorded_template_beats_the_chat_template(interleave, tmp_path, scene):
    """The reference model records its prompt in config.json: chat templates do not move it,
    nor its id (the committed label set depends on both)."""
    _, qa = scene
    ref = shutil.copytree(interleave, tmp_path / "ref")
    cfg = json.loads((ref / "config.json").read_text())
    cfg["evocomp"] = {"prompt_template": DEFAULT_TEMPLATE}
    (ref / "config.json").write_text(json.dumps(cfg))
    before = checkpoint_id(ref)
    m = load_mllm(ref)
    assert m.template == DEFAULT_TEMPLATE
    tok = m.tokenizer
    assert tok.convert_ids_to_tokens(m.encode(qa.question).suffix)[-1] == "ASSISTANT:"
    (ref / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert checkpoint_id(ref) == before
    # without a recorded template the chat template decides the prompt, so it is in the id
    other = shutil.copytree(interleave, tmp_path / "other")
    before = checkpoint_id(other)
    (other / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert checkpoint_id(other) != before


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen(request, tmp_path_factory):
    path = make_tiny_qwen_vl(tmp_path_factory.mktemp(request.param) / "m", request.param)
    return load_mllm(path)


def native_inputs(m, img, question: str, answer: str = "") -> dict:
    """What Qwen's processor feeds the model: the chat template rendered, the answer after it,
    ``<|image_pad|>`` repeated N times, ``mm_token_type_ids`` and ``image_grid_thw``."""
    text = m.tokenizer.apply_chat_template(
        user_turn(question), tokenize=False, add_generation_prompt=True
    )
    px, thw = m.pixels([img])
    n = int(thw[0].prod()) // m.merge**2  # this image's N
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n) + answer
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": px,
        "image_grid_thw": thw,
        "mm_token_type_ids": (ids == m.model.config.image_token_id).int(),
    }


def answer_labels(ids: torch.Tensor, n: int) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -n:] = ids[:, -n:]
    return labels


def test_qwen_loads_with_its_grid_and_prompt(qwen, scene):
    img, qa = scene
    assert qwen.n_tokens == 36 and qwen.grid == (6, 6)
    info = checkpoint_info(qwen.path)
    assert (info["n_tokens"], info["grid"], info["model_id"]) == (36, (6, 6), qwen.model_id)
    assert info["family"] == qwen.family and info["layers"] == qwen.n_layers == 2
    assert qwen.visual_tokens([img, img]).shape == (2, 36, 64)
    p = qwen.encode(qa.question, qa.answer)
    toks = qwen.tokenizer.convert_ids_to_tokens(p.prefix + p.suffix + p.answer)
    assert toks[len(p.prefix) - 1] == "<|vision_start|>" and toks[len(p.prefix)] == "<|vision_end|>"
    assert toks[-3:] == ["<|im_start|>", "assistant", qa.answer]


def test_qwen_all_tokens_loss_equals_the_model_forward(qwen, scene):
    img, qa = scene
    p = qwen.encode(qa.question, qa.answer)
    inputs = native_inputs(qwen, img, qa.question, qa.answer)
    ids = inputs["input_ids"]
    assert (
        ids[0].tolist() == p.prefix + [qwen.model.config.image_token_id] * 36 + p.suffix + p.answer
    )
    labels = answer_labels(ids, len(p.answer))
    native = float(qwen.model(**inputs, labels=labels).loss)
    ours = float(qwen.subset_loss(p, qwen.visual_tokens([img])[0], torch.arange(36)[None])[0])
    assert abs(ours - native) < 2e-6, (ours, native)  # measured <= 5e-7 on 8 samples
    # the trap this guards against: 1-D positions are broadcast to all three M-RoPE sections
    flat = torch.arange(ids.shape[1])[None]
    wrong = float(qwen.model(**inputs, position_ids=flat, labels=labels).loss)
    assert abs(wrong - native) > 1e-5  # measured >= 4e-5 on 8 samples


def test_qwen_subset_keeps_original_positions(qwen, scene):
    """A subset's loss == the HF forward with the unkept image tokens removed and the kept
    ones given their original (t, h, w) ids; == masking the unkept ones out."""
    img, qa = scene
    p = qwen.encode(qa.question, qa.answer)
    inputs = native_inputs(qwen, img, qa.question, qa.answer)
    ids, thw = inputs["input_ids"], inputs["image_grid_thw"]
    pos, _ = qwen.model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=thw
    )  # (3, 1, L)
    tail = len(p.suffix) + len(p.answer)
    assert torch.equal(qwen.layout(len(p.prefix), tail), pos[:, 0])
    v = qwen.visual_tokens([img])[0]
    x = qwen.model.get_input_embeddings()(ids)
    image = ids[0] == qwen.model.config.image_token_id
    x[0, image] = v
    kept = torch.tensor([0, 5, 6, 17, 30, 35])
    keep = ~image
    keep[len(p.prefix) + kept] = True
    labels = answer_labels(ids, len(p.answer))
    removed = qwen.model(
        inputs_embeds=x[:, keep], position_ids=pos[:, :, keep], labels=labels[:, keep]
    ).loss
    masked = qwen.model(
        inputs_embeds=x, position_ids=pos, attention_mask=keep[None].long(), labels=labels
    ).loss
    ours = qwen.subset_loss(p, v, kept[None])[0]
    assert abs(float(ours) - float(removed)) < 1e-5 and abs(float(ours) - float(masked)) < 1e-5
    other = qwen.subset_loss(p, v, torch.tensor([[1, 2, 3, 4, 7, 8]]))[0]
    assert abs(float(other) - float(ours)) > 1e-6  # which tokens are kept matters
    # the first answer token of a subset generation is that forward's argmax
    first = qwen.model(
        inputs_embeds=x[:, keep][:, : -len(p.answer)],
        position_ids=pos[:, :, keep][..., : -len(p.answer)],
    )
    token = qwen.tokenizer.decode(first.logits[0, -1].argmax(), skip_special_tokens=True).strip()
    assert qwen.generate([qa.question], [v], [kept], max_new_tokens=1)[0] == token


def test_qwen_generate_equals_hf_generate(qwen, scene):
    img, qa = scene
    inputs = native_inputs(qwen, img, qa.question)
    out = qwen.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    native = qwen.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    v = qwen.visual_tokens([img])[0]
    ours = qwen.generate([qa.question], [v], [None], max_new_tokens=6)[0]
    assert ours == native.strip() and len(ours.split()) >= 2  # several steps past the prompt


def test_qwen_batched_and_pruned_generation(qwen, scene):
    img, qa = scene
    v = qwen.visual_tokens([img])[0]
    qs = [qa.question, "how many red objects are there ?", qa.question]
    kept = [None, torch.arange(0, 36, 3), torch.tensor([4])]
    batch = qwen.generate(qs, [v, v, v], kept, max_new_tokens=3)  # left-padded 3-D positions
    single = [qwen.generate([q], [v], [k], 3)[0] for q, k in zip(qs, kept, strict=True)]
    assert batch == single
    full = [None, None, None]
    assert qwen.generate(qs, [v, v, v], full, 3, prune_layer=1) == qwen.generate(
        qs, [v] * 3, full, 3
    )
    pruned = qwen.generate(qs, [v, v, v], kept, 3, prune_layer=1)
    assert pruned == [
        qwen.generate([q], [v], [k], 3, prune_layer=1)[0] for q, k in zip(qs, kept, strict=True)
    ]


def test_qwen_attention_scores(qwen, scene):
    img, qa = scene
    v = qwen.visual_tokens([img])[0]
    a = qwen.text_attention(qwen.encode(qa.question), v, layer=2)
    assert a.shape == (36,) and (a >= 0).all() and a.sum() <= 1 + 1e-5
    c = torch.stack(qwen.cls_attention([img, img.rotate(90)]))
    heads = qwen.model.config.vision_config.num_heads
    assert c.shape == (2, 36) and (c >= 0).all() and not torch.allclose(c[0], c[1])
    # each image's patches receive one unit of attention per head in all (last block: full)
    torch.testing.assert_close(c.sum(1), torch.full((2,), float(heads)), rtol=1e-4, atol=1e-4)


def test_qwen_vision_scores_are_in_token_order(qwen, scene):
    """The blocks' order (Qwen2.5-VL: by attention window) maps back to token order: the
    merger's output on the last block's states, so mapped, is the model's visual tokens."""
    img, _ = scene
    px, thw = qwen.pixels([img, img.rotate(90)])
    visual, seen = qwen.model.model.visual, {}
    hook = visual.merger.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    try:
        tokens = qwen.model.model.get_image_features(px, thw).pooler_output
    finally:
        hook.remove()
    torch.testing.assert_close(qwen.token_order(seen["out"], thw), torch.cat(tokens))
    if qwen.family == "qwen2_5_vl":  # the test has teeth: the windows do reorder
        assert not torch.allclose(seen["out"], torch.cat(tokens))


def test_qwen_variable_token_counts(qwen, scene):
    """A 160x96 image gives its own merged grid (N per image): its all-tokens loss is the
    model's forward on that image, a subset keeps its original (t, h, w) ids, and a batch of
    images of different N generates as each alone."""
    img, qa = scene
    wide = img.resize((160, 96))
    square, other = qwen.image_tokens([img, wide])
    assert square.tokens.shape[0] == 36 and square.layout.tolist() == [6, 6]
    rows, cols = other.layout.tolist()
    assert rows != cols and other.tokens.shape == (rows * cols, 64)
    assert other.cells.tolist() == [[r, c] for r in range(rows) for c in range(cols)]
    p = qwen.encode(qa.question, qa.answer)
    inputs = native_inputs(qwen, wide, qa.question, qa.answer)
    ids = inputs["input_ids"]
    labels = answer_labels(ids, len(p.answer))
    native = float(qwen.model(**inputs, labels=labels).loss)
    v, lay = other.tokens, other.layout
    everything = torch.arange(rows * cols)[None]
    assert abs(float(qwen.subset_loss(p, v, everything, lay)[0]) - native) < 2e-6
    with pytest.raises(ModelError, match="do not fit"):
        qwen.subset_loss(p, v, everything)  # the default (square) layout: another N
    pos, _ = qwen.model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    x = qwen.model.get_input_embeddings()(ids)
    image = ids[0] == qwen.model.config.image_token_id
    x[0, image] = v
    kept = torch.tensor([0, 3, cols + 1, rows * cols - 1])
    keep = ~image
    keep[len(p.prefix) + kept] = True
    removed = qwen.model(
        inputs_embeds=x[:, keep], position_ids=pos[:, :, keep], labels=labels[:, keep]
    ).loss
    assert abs(float(qwen.subset_loss(p, v, kept[None], lay)[0]) - float(removed)) < 1e-5
    qs = [qa.question, qa.question]
    both = qwen.generate(qs, [square.tokens, v], [None, kept], 3, layouts=[square.layout, lay])
    alone = [
        qwen.generate([qa.question], [square.tokens], [None], 3, layouts=[square.layout])[0],
        qwen.generate([qa.question], [v], [kept], 3, layouts=[lay])[0],
    ]
    assert both == alone
    a = qwen.text_attention(qwen.encode(qa.question), v, layout=lay)
    assert a.shape == (rows * cols,) and [c.shape[0] for c in qwen.cls_attention([img, wide])] == [
        36,
        rows * cols,
    ]
