"""The compressor inside Qwen3-VL ``generate()`` (evocomp.deploy.qwen3).

As for Qwen2-VL (tests/test_deploy_qwen.py): the harness's kept tokens, the logits of the
project's own decoding over them at every step (``HFQwen3VL.generate``, each kept token with
its own DeepStack vectors, ``extras``), a prefill and KV cache N - k shorter. Plus what is
Qwen3's own: the LLM is handed the kept tokens' DeepStack vectors, and a prefill without them
(zeroed, or Qwen2-VL's ready-made embeddings, which carry none) would be caught.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.deploy import FAMILIES, QwenProcessor, compress_model
from evocomp.deploy.qwen import QwenPrefill
from evocomp.deploy.qwen3 import Qwen3Prefill
from evocomp.tokens import keep_count
from tests.conftest import make_tiny_qwen_vl
from tests.deploy_helpers import (
    NEW,
    assert_cli_refuses_other_model,
    assert_keep_one_is_plain,
    compressed_generate,
    harness_kept,
    hf_generate,
    project_generate,
    trained_world,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def world(shapes_data, tmp_path_factory):
    """A tiny Qwen3-VL (one DeepStack layer), a compressor trained on GA labels of a few
    samples, and test samples."""
    from evocomp.mllm.loader import load_mllm

    root = tmp_path_factory.mktemp("deploy-qwen3")
    mllm = load_mllm(make_tiny_qwen_vl(root / "model", "qwen3_vl"))
    processor = QwenProcessor.from_pretrained(mllm.path)  # what load_checkpoint gives
    return trained_world(mllm, shapes_data, root, 3, processor)


class LMInputs:
    """Records what the language model gets at each forward: length and DeepStack input."""

    def __init__(self, mllm):
        self.seen: list[dict] = []
        self._h = mllm.lm.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kw):
        deep = kw.get("deepstack_visual_embeds")
        self.seen.append(
            {
                "length": kw["inputs_embeds"].shape[1],
                "mask": kw.get("visual_pos_masks"),
                "deep": None if deep is None else [d.detach().clone() for d in deep],
            }
        )

    def close(self):
        self._h.remove()


def recorded(world, samples, ratio):
    """``compressed_generate`` and what the language model got at each forward."""
    rec = LMInputs(world.mllm)
    try:
        return *compressed_generate(world, samples, ratio), rec.seen
    finally:
        rec.close()


# ---- keep everything: the unmodified model ---------------------------------------------------------


def test_keep_ratio_one_is_the_unmodified_model(world):
    assert_keep_one_is_plain(world, world.test)


# ---- the harness's tokens, the project's decoding, DeepStack included ------------------------------


@pytest.mark.parametrize("ratio", [0.5, 1 / 3])
def test_generate_matches_the_evaluation_path(world, ratio):
    mllm = world.mllm
    for s in world.test:
        answers, logits, sel, seen = recorded(world, [s], ratio)
        kept = harness_kept(world, [s], ratio)
        N, k = mllm.n_tokens, keep_count(ratio, mllm.n_tokens)
        assert sel.n_tokens == N and sel.k == k == kept[0].numel()
        assert torch.equal(sel.kept[0], kept[0]), s.id
        assert sel.questions == [s.question]
        # the prefill is N - k shorter; decoding feeds one token a step, no DeepStack
        prefill, *steps = seen
        assert sel.prompt_tokens - sel.prefill_tokens == N - k
        assert prefill["length"] == sel.prefill_tokens
        assert [(t["length"], t["deep"]) for t in steps] == [(1, None)] * len(steps)
        # the LLM adds exactly the kept tokens' own DeepStack vectors, at the kept positions
        extra = world.fstore.get(s.id).extra  # (E, N, D), as labeling computed them
        assert int(prefill["mask"].sum()) == k and len(prefill["deep"]) == mllm.n_extra == 1
        for e, d in enumerate(prefill["deep"]):
            torch.testing.assert_close(d, extra[e, kept[0]], rtol=1e-5, atol=1e-5)
        ref_answers, ref_logits = project_generate(world, [s], kept)
        assert answers == ref_answers
        steps_run = logits.shape[1]
        torch.testing.assert_close(logits, ref_logits[:, :steps_run], rtol=1e-4, atol=1e-4)
        _, full = project_generate(world, [s], [None])
        m = min(steps_run, full.shape[1])
        assert not torch.allclose(logits[:, :m], full[:, :m], atol=1e-3)  # it did compress


def test_batched_generate_matches(world):
    samples = world.test
    answers, logits, sel, seen = recorded(world, samples, 1 / 3)
    kept = harness_kept(world, samples, 1 / 3)
    assert all(torch.equal(a, b) for a, b in zip(sel.kept, kept, strict=True))
    assert seen[0]["deep"][0].shape[0] == len(samples) * sel.k  # every image's kept rows
    ref_answers, ref_logits = project_generate(world, samples, kept)
    assert answers == ref_answers
    torch.testing.assert_close(logits, ref_logits[:, : logits.shape[1]], rtol=1e-4, atol=1e-4)


def test_prefill_and_cache_shrink_by_the_dropped_tokens(world):
    mllm, s = world.mllm, world.test[0]
    _, full = hf_generate(world, [s], min_new_tokens=NEW)  # both answers NEW tokens long
    with compress_model(mllm.model, world.processor, world.compressor, 1 / 3) as handle:
        _, short = hf_generate(world, [s], min_new_tokens=NEW)
    n, k = mllm.n_tokens, keep_count(1 / 3, mllm.n_tokens)
    assert handle.last.prompt_tokens - handle.last.prefill_tokens == n - k
    assert full.cache.get_seq_length() - short.cache.get_seq_length() == n - k


@pytest.mark.parametrize("wrong", ["zeroed", "inputs_embeds"])
def test_a_prefill_without_deepstack_would_be_caught(world, wrong, monkeypatch):
    """The comparison above has teeth: with the kept tokens' DeepStack vectors zeroed, or fed
    as Qwen2-VL's hook feeds its prefill (ready-made ``inputs_embeds``: the model then adds no
    DeepStack at all), the logits move far past the 1e-4 tolerance; and the project's own
    decoding with zeroed extras is another model's too."""
    s = world.test[0]
    if wrong == "zeroed":
        feed = Qwen3Prefill._feed

        def zeroed(self, inputs, ids, feats, keep, kept):
            feed(self, inputs, ids, feats, keep, kept)
            out = inputs["mm_encoder_outputs"]["image"]
            out.deepstack_features = [
                tuple(torch.zeros_like(d) for d in x) for x in out.deepstack_features
            ]

        monkeypatch.setattr(Qwen3Prefill, "_feed", zeroed)
    else:
        family = FAMILIES["qwen3_vl"]
        monkeypatch.setitem(
            FAMILIES, "qwen3_vl", type(family)(**{**vars(family), "hook": QwenPrefill})
        )
    _, logits, sel, seen = recorded(world, [s], 1 / 3)
    assert (seen[0]["deep"] is None) == (wrong == "inputs_embeds")
    _, ref_logits = project_generate(world, [s], sel.kept)
    gap = (logits - ref_logits[:, : logits.shape[1]]).abs().max()
    assert gap > 1e-3, float(gap)
    no_deep = [torch.zeros_like(world.fstore.get(s.id).extra)]
    _, other = project_generate(world, [s], sel.kept, extras=no_deep)
    assert (other[:, : ref_logits.shape[1]] - ref_logits[:, : other.shape[1]]).abs().max() > 1e-3


# ---- the command ----------------------------------------------------------------------------------


def cli(world, *args: str):
    s = world.test[0]
    return runner.invoke(app, [
        "generate", "--model", str(world.mllm.path), "--compressor", str(world.compressor),
        "--image", str(s.image), "--question", s.question, *args,
    ])  # fmt: skip


def test_cli_answers_with_the_api(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s, mllm = world.test[0], world.mllm
    res = cli(world, "--keep-ratio", "0.333", "--max-new-tokens", str(NEW), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    answers, _, sel = compressed_generate(world, [s], 0.333)
    assert out["answer"] == answers[0] and out["question"] == s.question
    assert out["kept"] == sel.kept[0].tolist() and out["k"] == 12 and out["n_tokens"] == 36
    assert out["prefill_tokens"] == out["prompt_tokens"] - 24
    assert out["model_id"] == mllm.model_id


def test_cli_refuses_a_compressor_of_another_model(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_cli_refuses_other_model(world, tmp_path, cli)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # nothing written
