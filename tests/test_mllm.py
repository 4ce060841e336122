from __future__ import annotations

import pytest
import torch

from evocomp.errors import ModelError
from evocomp.mllm.loader import load_mllm
from evocomp.mllm.recipe import pixels
from tests.conftest import make_tiny_llava


@pytest.fixture(scope="module")
def mllm(tiny_llava):
    return load_mllm(tiny_llava)


def test_loads_like_a_user_checkpoint(mllm, scene):
    img, _ = scene
    v = mllm.visual_tokens([img, img])
    assert v.shape == (2, 36, 64) and mllm.grid == (6, 6)
    assert mllm.vocab_embeddings().shape == (len(mllm.tokenizer), 64)
    assert torch.equal(mllm.pixel_values([img]), pixels([img]))  # fast path == the processor


@pytest.mark.parametrize("P", [1, 7, 48])
def test_batched_subset_loss_equals_single(mllm, scene, P):
    img, qa = scene
    v = mllm.visual_tokens([img])[0]
    p = mllm.encode(qa.question, qa.answer)
    g = torch.Generator().manual_seed(P)
    kept = torch.stack([torch.randperm(36, generator=g)[:12].sort().values for _ in range(P)])
    batched = mllm.subset_loss(p, v, kept)
    single = torch.cat([mllm.subset_loss(p, v, kept[i : i + 1]) for i in range(P)])
    assert batched.shape == (P,)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert len(set(batched.tolist())) > 1 or P == 1  # the subset changes the loss


def test_distill_loss_is_the_kl_from_all_tokens(mllm, scene):
    """``reference``: the mean KL divergence from the all-token answer distribution: zero
    for all tokens, positive for a subset, batched == single, and by hand for one row."""
    img, qa = scene
    v = mllm.visual_tokens([img])[0]
    p = mllm.encode(qa.question, qa.answer + " extra words")  # several answer positions
    ref = mllm.answer_logprobs(p, v)
    assert ref.shape == (len(p.answer), len(mllm.tokenizer))
    torch.testing.assert_close(ref.exp().sum(-1), torch.ones(len(p.answer)))
    everything = torch.arange(36)[None]
    assert float(mllm.subset_loss(p, v, everything, reference=ref)[0]) < 1e-5
    g = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(36, generator=g)[:12].sort().values for _ in range(5)])
    kl = mllm.subset_loss(p, v, kept, reference=ref)
    single = torch.cat([mllm.subset_loss(p, v, kept[i : i + 1], reference=ref) for i in range(5)])
    torch.testing.assert_close(kl, single, rtol=1e-4, atol=1e-6)
    assert (kl > 1e-4).all()
    # by hand: the subset as the all-token sequence with the dropped tokens masked out
    x = torch.cat([mllm._ids(p.prefix), v, mllm._ids(p.suffix + p.answer)])[None]
    mask = torch.ones(1, x.shape[1], dtype=torch.long)
    drop = torch.ones(36, dtype=torch.bool)
    drop[kept[0]] = False
    mask[0, len(p.prefix) : len(p.prefix) + 36][drop] = 0
    h = mllm.lm(
        inputs_embeds=x, attention_mask=mask, position_ids=torch.arange(x.shape[1])[None]
    ).last_hidden_state
    logq = mllm.model.lm_head(h[0, -len(p.answer) - 1 : -1]).float().log_softmax(-1)
    by_hand = (ref.exp() * (ref - logq.detach())).sum(-1).mean()
    torch.testing.assert_close(kl[0], by_hand, rtol=1e-4, atol=1e-5)


def test_subset_equals_masking_the_dropped_tokens(mllm, scene):
    """Removing tokens == masking them out (same original positions): the subset really is what is seen."""
    img, qa = scene
    v = mllm.visual_tokens([img])[0]
    p = mllm.encode(qa.question, qa.answer)
    kept = torch.tensor([2, 3, 17, 30])
    x = torch.cat([mllm._ids(p.prefix), v, mllm._ids(p.suffix + p.answer)])[None]
    mask = torch.ones(1, x.shape[1], dtype=torch.long)
    drop = torch.ones(36, dtype=torch.bool)
    drop[kept] = False
    mask[0, len(p.prefix) : len(p.prefix) + 36][drop] = 0
    h = mllm.lm(
        inputs_embeds=x, attention_mask=mask, position_ids=torch.arange(x.shape[1])[None]
    ).last_hidden_state
    logits = mllm.model.lm_head(h[:, -len(p.answer) - 1 : -1])
    ref = torch.nn.functional.cross_entropy(logits[0], torch.tensor(p.answer))
    torch.testing.assert_close(mllm.subset_loss(p, v, kept[None])[0], ref, rtol=1e-4, atol=1e-5)
    # and the loss depends on which tokens are kept
    other = mllm.subset_loss(p, v, torch.tensor([[0, 1, 5, 9]]))[0]
    assert abs(float(other) - float(ref)) > 1e-6


def test_full_subset_matches_processor_path(mllm, scene):
    img, qa = scene
    text = f"USER: <image>\n{qa.question} ASSISTANT: {qa.answer}"
    inputs = mllm.processor(images=img, text=text, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -1] = inputs["input_ids"][:, -1]
    ref = mllm.model(**inputs, labels=labels).loss
    ours = mllm.subset_loss(
        mllm.encode(qa.question, qa.answer), mllm.visual_tokens([img])[0], torch.arange(36)[None]
    )
    torch.testing.assert_close(ours[0], ref, rtol=1e-5, atol=1e-5)


def test_batched_generation_matches_single(mllm, scene):
    img, qa = scene
    v = mllm.visual_tokens([img])[0]
    kept = [None, torch.arange(0, 36, 3), torch.tensor([4])]
    qs = [qa.question, "how many red objects are there ?", qa.question]
    batch = mllm.generate(qs, [v, v, v], kept, max_new_tokens=3)
    single = [
        mllm.generate([q], [v], [k], max_new_tokens=3)[0] for q, k in zip(qs, kept, strict=True)
    ]
    assert batch == single


def test_attention_scores(mllm, scene):
    img, qa = scene
    v = mllm.visual_tokens([img])[0]
    a = mllm.text_attention(mllm.encode(qa.question), v, layer=2)
    assert a.shape == (36,) and (a >= 0).all() and a.sum() <= 1 + 1e-5
    c = mllm.cls_attention([img, img])
    assert c.shape == (2, 36) and (c >= 0).all()
    with pytest.raises(ValueError, match="layer 9"):
        mllm.text_attention(mllm.encode(qa.question), v, layer=9)


def test_prompt_attention_matches_the_processor_path(mllm, scene):
    """SparseVLM's rows: each prompt token after the image, its attention to every visual
    token at layer 2, as the HF model's own forward (processor inputs) gives it."""
    img, qa = scene
    prompt = mllm.encode(qa.question)
    v = mllm.visual_tokens([img])[0]
    rows = mllm.prompt_attention(prompt, v, layer=2)
    assert rows.shape == (len(prompt.suffix), 36)
    inputs = mllm.processor(
        images=img, text=f"USER: <image>\n{qa.question} ASSISTANT:", return_tensors="pt"
    )
    with mllm._eager():
        out = mllm.model(**inputs, output_attentions=True)
    ref = out.attentions[1][0].float().mean(0)  # (L, L) at layer 2
    image_cols = (inputs["input_ids"][0] == mllm.model.config.image_token_id).nonzero().flatten()
    torch.testing.assert_close(rows, ref[-len(prompt.suffix) :, image_cols], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mllm.text_attention(prompt, v, layer=2), rows[-1])


def test_other_geometry(tmp_path, scene):
    m = load_mllm(make_tiny_llava(tmp_path / "m", image_size=64, patch=16, hidden=32))
    assert m.n_tokens == 16 and m.grid == (4, 4)
    img, qa = scene
    v = m.visual_tokens([img.resize((64, 64))])[0]
    assert m.subset_loss(m.encode(qa.question, qa.answer), v, torch.arange(16)[None]).shape == (1,)
    with pytest.raises(ModelError, match="do not fit"):  # features of the 36-token model
        m.subset_loss(m.encode(qa.question, qa.answer), torch.zeros(36, 64), torch.arange(4)[None])


def test_unsupported_checkpoints(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelError, match=r"'llama' is not supported \(supported families: llava, "):
        load_mllm(tmp_path / "llama")
    with pytest.raises(ModelError, match="no config.json"):
        load_mllm(tmp_path / "nowhere")


def test_model_id_is_content(tiny_llava, tmp_path):
    import shutil

    shutil.copytree(tiny_llava, tmp_path / "copy")
    from evocomp.mllm.hf_llava import checkpoint_id

    assert (
        checkpoint_id(tiny_llava).split("-")[-1] == checkpoint_id(tmp_path / "copy").split("-")[-1]
    )


def test_prune_at_layer(mllm, scene):
    img, qa = scene
    v = mllm.visual_tokens([img])[0]
    qs = [qa.question, "how many red objects are there ?"]
    x, mask, pos, image = mllm._prompt_rows(qs, [v, v], [None, None])
    assert image.sum(1).tolist() == [36, 36] and not image[mask == 0].any()
    full = mllm.lm(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
    everyone = torch.ones_like(mask, dtype=torch.bool)
    torch.testing.assert_close(
        mllm._hidden_pruned(x, mask, pos, image, everyone, 1), full, rtol=1e-4, atol=1e-5
    )
    some = everyone.clone()
    some[:, 5:30] = False  # drop visual tokens after layer 1: the answer position sees less
    assert not torch.allclose(mllm._hidden_pruned(x, mask, pos, image, some, 1), full, atol=1e-4)
    kept = [torch.arange(0, 36, 2), None]
    batch = mllm.generate(qs, [v, v], kept, 3, prune_layer=1)
    assert batch == [
        mllm.generate([q], [v], [k], 3, prune_layer=1)[0] for q, k in zip(qs, kept, strict=True)
    ]
    with pytest.raises(ValueError, match="prune layer"):
        mllm.generate(qs, [v, v], kept, 3, prune_layer=2)
