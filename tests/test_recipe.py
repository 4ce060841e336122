"""The reference model's training recipe: inputs as at inference, alignment, a whole run."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from evocomp.config import MLLMParams
from evocomp.data import shapes
from evocomp.features.grouping import nearest_vocab
from evocomp.mllm.hf_llava import HFLlava
from evocomp.mllm.recipe import Questions, align, lm_batch, lr_factor, pixels, visual
from evocomp.mllm.reference import build_model, build_tokenizer, train_reference


@pytest.fixture(scope="module")
def mllm(tiny_llava):
    return HFLlava(tiny_llava)


def _scenes(n: int, seed: int):
    rng = random.Random(seed)
    objs = [shapes.make_scene(rng) for _ in range(n)]
    return [(shapes.render(o), o) for o in objs]


def test_training_rows_are_the_inference_sequence(mllm):
    """The LM is trained on exactly what subset_loss scores: masked tokens == removed tokens."""
    scenes = _scenes(3, seed=4)
    rng = random.Random(0)
    qas = [shapes.make_question(objs, rng) for _, objs in scenes]
    feats = mllm.visual_tokens([img for img, _ in scenes])  # (3, 36, D)
    questions = Questions(mllm.tokenizer)
    keep = torch.ones(3, 36, dtype=torch.long)
    kept_sets = [torch.arange(36), torch.tensor([0, 5, 6, 20, 35]), torch.tensor([3])]
    for r, kept in enumerate(kept_sets):
        keep[r] = 0
        keep[r, kept] = 1
    x, mask, labels, pos = lm_batch(
        [(i, questions(qa)) for i, qa in enumerate(qas)], questions.prefix, feats, mllm.embed, keep
    )
    with torch.no_grad():
        h = mllm.lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        logits = mllm.model.lm_head(h.last_hidden_state)  # (B, L, V)
    for r, (qa, kept) in enumerate(zip(qas, kept_sets, strict=True)):
        sel = labels[r] != -100
        answer_ids = labels[r, sel][:-1]  # the last label is EOS, which subset_loss does not score
        assert answer_ids.tolist() == mllm.encode(qa.question, qa.answer).answer
        ce = F.cross_entropy(logits[r, sel][:-1], answer_ids)
        expected = mllm.subset_loss(mllm.encode(qa.question, qa.answer), feats[r], kept[None])
        torch.testing.assert_close(ce, expected[0], rtol=1e-4, atol=1e-5)


def test_lr_factor_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert lr_factor(100, 100, 10) == pytest.approx(0.05)
    assert lr_factor(55, 100, 10, cosine=True) == pytest.approx(0.525)


def test_alignment_puts_every_patch_on_its_words():
    """After a short alignment, each token's nearest word names its patch (colour/shape/background)."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    params = MLLMParams(align_steps=120, align_batch_size=32, seed=0)
    align(model, tok, _scenes(600, seed=1), params, log=lambda _: None)
    held_out = _scenes(40, seed=2)
    with torch.no_grad():
        v = visual(model, pixels([img for img, _ in held_out]))  # (40, 36, D)
    vocab = model.get_input_embeddings().weight.detach()
    words = tok.convert_ids_to_tokens
    ok_obj, ok_bg, n_obj, n_bg = 0, 0, 0, 0
    for (_, objs), tokens in zip(held_out, v, strict=True):
        near = words(nearest_vocab(tokens, vocab).tolist())
        cells = {o.cell: o for o in objs}
        for i, w in enumerate(near):
            if i in cells:
                n_obj += 1
                ok_obj += w in (cells[i].colour, cells[i].shape)
            else:
                n_bg += 1
                ok_bg += w == "background"
    assert ok_bg / n_bg > 0.99
    assert ok_obj / n_obj > 0.9


def test_train_reference_writes_a_checkpoint_that_loads(tmp_path):
    params = MLLMParams(
        n_images=64, val_images=16, align_steps=3, lm_steps=4, eval_every=2, batch_size=8, align_batch_size=16,
        curriculum_steps=2, threads=1, seed=3,
    )  # fmt: skip
    out = train_reference(tmp_path / "ref", params, log=lambda _: None)
    m = HFLlava(out)
    assert m.n_tokens == 36 and m.grid == (6, 6)
    assert m.model.config.evocomp["lm_steps_run"] == 4
    assert set(m.model.config.evocomp["held_out_accuracy"]) == set(shapes.QTYPES)
    img = shapes.render(_scenes(1, seed=9)[0][1])
    assert isinstance(
        m.generate(["what colour is the circle ?"], m.visual_tokens([img]), [None])[0], str
    )


def test_oracle_sets_put_what_they_promise_first():
    from evocomp.data.samples import Sample
    from evocomp.mllm.reference_eval import oracle_sets

    objects = [{"cell": c, "colour": "red", "shape": "circle"} for c in (3, 10, 20)]
    s = Sample(id="x", image=None, question="q", answer="a",
               meta={"relevant": [10], "objects": objects})  # fmt: skip
    sets = oracle_sets(s, 36, 3)
    assert 10 in sets["oracle"] and not {3, 20} & set(sets["oracle"].tolist())  # + background
    assert sets["objects"].tolist() == [3, 10, 20]
    assert 10 not in sets["anti"]
    assert all(v.tolist() == sorted(v.tolist()) and len(v) == 3 for v in sets.values())
