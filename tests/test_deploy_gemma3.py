"""The compressor inside Gemma 3's ``generate()`` (evocomp.deploy.gemma3).

Keep 1.0 must be the plain model token for token. At keep 1/3 the LLM must get N - k fewer
tokens, the harness's kept ones, at their original 1-D positions and forming one
bidirectional image block: the answer and every step's logits are checked against the
model's own forwards fed those tokens (no cache, ``token_type_ids`` marking the block), a
causal block would fail that check, and the project's own decoding (``HFGemma3.generate``)
gives the same. The command runs it and refuses a compressor of another model.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.deploy import compress_model
from evocomp.tokens import keep_count
from tests.conftest import make_tiny_gemma3, reference_greedy
from tests.deploy_helpers import (
    NEW,
    LogitTape,
    assert_cli_refuses_other_model,
    assert_keep_one_is_plain_padded,
    compressed_generate,
    harness_kept,
    hf_inputs,
    project_generate,
    trained_world,
)

SEED = 3  # a random model whose greedy answers change from token to token (as test_mllm_gemma3)
runner = CliRunner()


@pytest.fixture(scope="module")
def world(shapes_data, tmp_path_factory):
    """The tiny Gemma 3, a compressor trained on GA labels of a few samples, and test samples."""
    from evocomp.mllm.loader import load_mllm

    root = tmp_path_factory.mktemp("deploy-gemma3")
    mllm = load_mllm(make_tiny_gemma3(root / "model", seed=SEED))
    mllm.processor.tokenizer.padding_side = "left"  # what generate() needs for a batch
    return trained_world(mllm, shapes_data, root, 3)


class LMInputs:
    """Records the length and the position ids of what the language model gets at each forward."""

    def __init__(self, mllm):
        self.seen: list[tuple[int, torch.Tensor]] = []
        self._h = mllm.lm.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kw):
        self.seen.append((kw["inputs_embeds"].shape[1], kw["position_ids"].clone()))

    def close(self):
        self._h.remove()


def reference_inputs(world, s, kept: torch.Tensor, block: bool = True) -> dict:
    """The prompt as the model's own forward takes it without the unkept image tokens: the
    processor's ids embedded, the image features in place, the kept tokens and the text at
    their original positions, ``token_type_ids`` marking the kept tokens as the image block
    (``block=False``: all text, a causal image)."""
    model = world.mllm.model
    inputs = hf_inputs(world, [s])
    ids = inputs["input_ids"]
    image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)
        x[0, image] = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    keep = ~image
    keep[image.nonzero()[kept, 0]] = True
    types = inputs["token_type_ids"][:, keep]
    return {
        "inputs_embeds": x[:, keep],
        "position_ids": torch.arange(ids.shape[1])[None, keep],
        "token_type_ids": types if block else torch.zeros_like(types),
    }


def reference_generate(world, s, kept, block: bool = True) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits of the model's forwards on the kept prompt."""
    tape = LogitTape(world.mllm.model)
    try:
        tokens = reference_greedy(world.mllm, reference_inputs(world, s, kept, block), NEW)
        return tokens, tape.take()
    finally:
        tape.close()


def test_the_prompt_is_the_one_labeling_fed(world):
    """One BOS (the chat template writes it, the tokenizer would add another), the processor's
    image block where the template has it, the question read back out of the ids."""
    mllm = world.mllm
    for s in world.test:
        p = mllm.encode(s.question)
        ids = hf_inputs(world, [s])["input_ids"][0].tolist()
        assert ids == p.prefix + [mllm.model.config.image_token_id] * mllm.n_tokens + p.suffix
        assert ids[:2] == [mllm.tokenizer.bos_token_id, mllm.tokenizer.convert_tokens_to_ids(
            "<start_of_turn>")]  # fmt: skip


def test_keep_ratio_one_is_the_unmodified_model(world):
    """A left-padded batch: the same tokens as the plain ``generate()``, the same logits."""
    sel = assert_keep_one_is_plain_padded(world)
    assert sel.k == sel.n_tokens == 36


@pytest.mark.parametrize("i", [0, 1])
def test_kept_tokens_are_one_bidirectional_block(world, i):
    mllm, s = world.mllm, world.test[i]
    rec = LMInputs(mllm)
    try:
        answers, logits, sel = compressed_generate(world, [s], 1 / 3)
    finally:
        rec.close()
    N, k = mllm.n_tokens, keep_count(1 / 3, mllm.n_tokens)
    L = hf_inputs(world, [s])["input_ids"].shape[1]
    # the LLM gets N - k fewer tokens: the harness's kept ones, at their original positions
    assert sel.k == k and sel.prompt_tokens == L and L - sel.prefill_tokens == N - k
    assert sel.prefill_tokens > mllm.lm.config.sliding_window  # the local layer's window slides
    assert torch.equal(sel.kept[0], harness_kept(world, [s], 1 / 3)[0])
    assert sel.questions == [s.question]
    want = reference_inputs(world, s, sel.kept[0])
    (length, pos), *steps = rec.seen
    assert length == sel.prefill_tokens and torch.equal(pos, want["position_ids"])
    assert [(n, p.tolist()) for n, p in steps] == [(1, [[L + t]]) for t in range(len(steps))]
    # the model's own forwards on those tokens, the kept image one block: the same answer
    tokens, ref_logits = reference_generate(world, s, sel.kept[0])
    assert mllm.tokenizer.decode(tokens, skip_special_tokens=True).strip() == answers[0]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # a causal image (token_type_ids lost at the prefill) would fail that comparison
    _, causal = reference_generate(world, s, sel.kept[0], block=False)
    assert (causal[:, 0] - logits[:, 0]).abs().max() > 1e-3
    # and the project's decoding over the kept tokens (evaluation's) gives the same
    ref_answers, project_logits = project_generate(world, [s], sel.kept)
    assert ref_answers == answers
    torch.testing.assert_close(logits, project_logits[:, : logits.shape[1]], rtol=1e-4, atol=1e-4)


def test_refuses_a_prompt_without_token_type_ids(world):
    mllm, s = world.mllm, world.test[0]
    inputs = {k: v for k, v in hf_inputs(world, [s]).items() if k != "token_type_ids"}
    with (
        compress_model(mllm.model, world.processor, world.compressor, 1 / 3),
        pytest.raises(ValueError, match="needs the prompt's token_type_ids"),
    ):
        mllm.model.generate(**inputs, max_new_tokens=1)


# ---- the command ----------------------------------------------------------------------------------


def cli(world, *args: str):
    s = world.test[0]
    return runner.invoke(app, [
        "generate", "--model", str(world.mllm.path), "--image", str(s.image),
        "--question", s.question, *args,
    ])  # fmt: skip


def test_cli_answers_with_the_api(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = world.test[0]
    res = cli(world, "--compressor", str(world.compressor), "--keep-ratio", "0.333",
              "--max-new-tokens", str(NEW), "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    answers, _, sel = compressed_generate(world, [s], 0.333)
    assert out["answer"] == answers[0] and out["question"] == s.question
    assert out["kept"] == sel.kept[0].tolist() and out["k"] == 12 and out["n_tokens"] == 36
    p = world.mllm.encode(s.question)
    assert out["prompt_tokens"] == len(p.prefix) + 36 + len(p.suffix)
    assert out["prefill_tokens"] == out["prompt_tokens"] - 24
    assert out["model_id"] == world.mllm.model_id
    plain = cli(world, "--compressor", str(world.compressor), "--max-new-tokens", str(NEW))
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip() == answers[0]


def test_cli_refuses_a_compressor_of_another_model(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_cli_refuses_other_model(world, tmp_path, cli)
