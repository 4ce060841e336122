"""Qwen3-VL on a tiny random checkpoint: M-RoPE positions as Qwen2-VL, plus DeepStack.

Each visual token brings E more vectors (the tower's intermediate blocks, merged) that the LLM
adds to its hidden state after layers 0..E-1; the adapter keeps them per token
(``ImageTokens.extra``, the feature cache's ``extra``), so a kept token brings its own.
"""

from __future__ import annotations

import pytest
import torch

from evocomp.errors import ModelError
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.mllm.loader import load_mllm
from tests.conftest import make_tiny_qwen_vl
from tests.test_mllm_families import answer_labels, native_inputs


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return load_mllm(make_tiny_qwen_vl(tmp_path_factory.mktemp("qwen3") / "m", "qwen3_vl"))


def test_qwen3_loads_with_deepstack_extras(qwen3, scene):
    img, _ = scene
    assert qwen3.family == "qwen3_vl" and qwen3.n_extra == 1
    info = checkpoint_info(qwen3.path)
    assert (info["family"], info["n_tokens"], info["grid"]) == ("qwen3_vl", 36, (6, 6))
    (vis,) = qwen3.image_tokens([img])
    assert vis.tokens.shape == (36, 64) and vis.extra.shape == (1, 36, 64)
    assert not torch.allclose(vis.extra[0], vis.tokens)  # another block's output


@pytest.mark.parametrize("size", [(96, 96), (160, 96)], ids=["square", "wide"])
def test_qwen3_all_tokens_loss_equals_the_model_forward(qwen3, scene, size):
    img, qa = scene
    img = img.resize(size)
    (vis,) = qwen3.image_tokens([img])
    p = qwen3.encode(qa.question, qa.answer)
    inputs = native_inputs(qwen3, img, qa.question, qa.answer)
    labels = answer_labels(inputs["input_ids"], len(p.answer))
    native = float(qwen3.model(**inputs, labels=labels).loss)
    everything = torch.arange(vis.tokens.shape[0])[None]
    ours = float(qwen3.subset_loss(p, vis.tokens, everything, vis.layout, vis.extra)[0])
    assert abs(ours - native) < 2e-6, (ours, native)
    # the trap: without the DeepStack vectors the loss is another model's
    no_deep = torch.zeros_like(vis.extra)
    other = float(qwen3.subset_loss(p, vis.tokens, everything, vis.layout, no_deep)[0])
    assert abs(other - native) > 1e-4
    with pytest.raises(ModelError, match="deepstack"):
        qwen3.subset_loss(p, vis.tokens, everything, vis.layout)


def test_qwen3_subset_equals_the_native_forward_with_the_rest_masked(qwen3, scene):
    """A subset's loss == the model's own forward (pixels in, DeepStack by the model) with the
    unkept image tokens masked out and every token at its full-sequence (t, h, w) ids."""
    img, qa = scene
    (vis,) = qwen3.image_tokens([img])
    p = qwen3.encode(qa.question, qa.answer)
    inputs = native_inputs(qwen3, img, qa.question, qa.answer)
    ids = inputs["input_ids"]
    pos, _ = qwen3.model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    kept = torch.tensor([0, 5, 6, 17, 30, 35])
    keep = ids[0] != qwen3.model.config.image_token_id
    keep[len(p.prefix) + kept] = True
    labels = answer_labels(ids, len(p.answer))
    masked = qwen3.model(
        **{**inputs, "attention_mask": keep[None].long()}, position_ids=pos, labels=labels
    ).loss
    ours = qwen3.subset_loss(p, vis.tokens, kept[None], vis.layout, vis.extra)[0]
    assert abs(float(ours) - float(masked)) < 1e-5, (float(ours), float(masked))


def test_qwen3_generate_equals_hf_generate_and_batches(qwen3, scene):
    img, qa = scene
    inputs = native_inputs(qwen3, img, qa.question)
    out = qwen3.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    native = qwen3.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    square, wide = qwen3.image_tokens([img, img.resize((160, 96))])
    ours = qwen3.generate(
        [qa.question], [square.tokens], [None], 6, layouts=[square.layout], extras=[square.extra]
    )[0]
    assert ours == native.strip() and len(ours.split()) >= 2
    qs = [qa.question, "how many red objects are there ?"]
    vis, lays, extras = [square.tokens, wide.tokens], [square.layout, wide.layout], None
    extras = [square.extra, wide.extra]
    kept = [torch.arange(0, 36, 3), torch.tensor([1, 4, 7])]
    for layer in (0, 1):
        batch = qwen3.generate(qs, vis, kept, 3, prune_layer=layer, layouts=lays, extras=extras)
        alone = [
            qwen3.generate([q], [v], [k], 3, prune_layer=layer, layouts=[lay], extras=[e])[0]
            for q, v, k, lay, e in zip(qs, vis, kept, lays, extras, strict=True)
        ]
        assert batch == alone
    full = [None, None]
    assert qwen3.generate(qs, vis, full, 3, prune_layer=1, layouts=lays, extras=extras) == (
        qwen3.generate(qs, vis, full, 3, layouts=lays, extras=extras)
    )
