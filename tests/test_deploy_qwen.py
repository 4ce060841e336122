"""The compressor inside Qwen2-VL / Qwen2.5-VL ``generate()`` (evocomp.deploy.qwen).

As for LLaVA (tests/test_deploy.py): the harness's kept tokens, the logits of the project's own
decoding over them (``HFQwenVL.generate``: each kept token at its original (t, h, w) ids,
decoding after the full sequence's last id) at every step, a prefill and KV cache N - k
shorter, and no trace once detached. Plus what is Qwen's own: the 3-D positions the LLM gets
at the prefill and at every decoding step, and that wrong ones would be caught.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.deploy import QwenProcessor, compress_model
from evocomp.deploy.llava import LlavaPrefill
from evocomp.deploy.prompt import prompt_text
from evocomp.deploy.qwen import QwenPrefill
from evocomp.tokens import keep_count
from tests.conftest import make_tiny_qwen_vl
from tests.deploy_helpers import (
    NEW,
    assert_detach_restores,
    assert_keep_one_is_plain,
    compressed_generate,
    harness_kept,
    hf_generate,
    hf_inputs,
    project_generate,
    trained_world,
)

runner = CliRunner()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def world(request, shapes_data, tmp_path_factory):
    """A tiny Qwen, a compressor trained on GA labels of a few samples, and test samples."""
    from evocomp.mllm.loader import load_mllm

    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    mllm = load_mllm(make_tiny_qwen_vl(root / "model", request.param))
    processor = QwenProcessor(mllm.image_processor, mllm.tokenizer)
    return trained_world(mllm, shapes_data, root, 3, processor)


class LMInputs:
    """Records what the language model gets at each forward: length, positions, mask."""

    def __init__(self, mllm):
        self.seen: list[dict] = []
        self._h = mllm.lm.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kw):
        mask = kw.get("attention_mask")
        self.seen.append(
            {
                "length": kw["inputs_embeds"].shape[1],
                "positions": kw.get("position_ids"),
                "mask": None if mask is None else mask.shape[1],
            }
        )

    def close(self):
        self._h.remove()


# ---- (a) the harness's tokens, the project's decoding --------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 1 / 3])
def test_generate_matches_the_evaluation_path(world, ratio):
    for s in world.test:
        answers, logits, sel = compressed_generate(world, [s], ratio)
        kept = harness_kept(world, [s], ratio)
        assert sel.k == keep_count(ratio, world.mllm.n_tokens) == kept[0].numel()
        assert torch.equal(sel.kept[0], kept[0]), s.id
        assert sel.questions == [s.question]  # read back out of the chat-template prompt
        ref_answers, ref_logits = project_generate(world, [s], kept)
        assert answers == ref_answers
        steps = logits.shape[1]
        torch.testing.assert_close(logits, ref_logits[:, :steps], rtol=1e-4, atol=1e-4)
        _, full_logits = project_generate(world, [s], [None])
        assert not torch.allclose(logits, full_logits[:, :steps], atol=1e-3)  # it did compress


def test_the_llm_gets_the_adapters_positions(world):
    """Prefill: the kept columns of the full prompt's ``get_rope_index`` ids; decoding step t:
    the last prompt id + 1 + t on all three rows, i.e. L + t + the model's own rope delta."""
    mllm, s = world.mllm, world.test[0]
    inputs = hf_inputs(world, [s])
    ids = inputs["input_ids"]
    full, delta = mllm.model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )  # (3, 1, L), (1, 1)
    rec = LMInputs(mllm)
    try:
        _, _, sel = compressed_generate(world, [s], 1 / 3)
    finally:
        rec.close()
    L, N, p = ids.shape[1], mllm.n_tokens, mllm.encode(s.question)
    n0 = len(p.prefix)
    assert n0 + N + len(p.suffix) == L
    cols = [*range(n0), *(n0 + sel.kept[0]).tolist(), *range(n0 + N, L)]  # the kept columns
    want = mllm.positions(n0, sel.kept[0][None], len(p.suffix))  # (3, 1, L_kept)
    assert torch.equal(want, full[..., cols])
    prefill, *steps = rec.seen
    assert prefill["length"] == sel.prefill_tokens and torch.equal(prefill["positions"], want)
    assert int(delta) == int(mllm.model.model.rope_deltas)  # generate() kept the full delta
    for t, step in enumerate(steps):
        assert step["length"] == 1
        assert torch.equal(step["positions"], torch.full((3, 1, 1), L + t + int(delta)))


@pytest.mark.parametrize("wrong", ["renumbered", "1-D", "cache-counted"])
def test_wrong_positions_would_be_caught(world, wrong, monkeypatch):
    """The comparison of (a) has teeth. Each of these moves the logits far past its 1e-4
    tolerance: the prefill's kept tokens renumbered 0..L_kept-1; the prefill given the kept
    tokens' original 1-D positions on all three rows (what 1-D ids silently become); decoding
    positions counted from the shortened cache (the model's own fallback without ids)."""
    s = world.test[0]
    if wrong == "cache-counted":
        monkeypatch.setattr(
            QwenPrefill, "follow", lambda self, inputs: (
                LlavaPrefill.follow(self, inputs), inputs.pop("position_ids", None)
            )
        )  # fmt: skip
    else:
        orig = QwenPrefill.prefill

        def prefill(self, inputs, pick, questions):
            sel = orig(self, inputs, pick, questions)
            pos, keep = inputs["position_ids"], self._keep  # (3, B, L_kept), (B, L)
            flat = torch.arange(keep.shape[1]).expand_as(keep)[keep].view(keep.shape[0], -1)
            if wrong == "renumbered":
                flat = torch.arange(pos.shape[-1]).expand(keep.shape[0], -1)
            inputs["position_ids"] = flat.expand_as(pos).clone()
            return sel

        monkeypatch.setattr(QwenPrefill, "prefill", prefill)
    _, logits, sel = compressed_generate(world, [s], 1 / 3)
    _, ref_logits = project_generate(world, [s], sel.kept)
    gap = (logits - ref_logits[:, : logits.shape[1]]).abs().max()
    assert gap > 1e-3, float(gap)


def test_batched_left_padded_generate_matches(world):
    samples = world.test
    lengths = hf_inputs(world, samples)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    rec = LMInputs(world.mllm)
    try:
        answers, logits, sel = compressed_generate(world, samples, 1 / 3)
    finally:
        rec.close()
    # the mask follows the shortened sequence (the KV cache), not the full-length prompt
    assert [r["mask"] for r in rec.seen] == [sel.prefill_tokens + t for t in range(len(rec.seen))]
    kept = harness_kept(world, samples, 1 / 3)
    assert all(torch.equal(a, b) for a, b in zip(sel.kept, kept, strict=True))
    assert sel.questions == [s.question for s in samples]
    ref_answers, ref_logits = project_generate(world, samples, kept)
    assert answers == ref_answers
    torch.testing.assert_close(logits, ref_logits[:, : logits.shape[1]], rtol=1e-4, atol=1e-4)


def test_another_image_size_is_scored_on_its_own_grid(world, monkeypatch):
    """Qwen sizes each image by its aspect ratio: a tall image gives another N and grid, which
    the hook reads off the image's (h, w) ids and hands to the compressor; a grid wider than
    any the compressor was trained on is refused in one line."""
    import copy

    from evocomp.deploy.scorer import TokenScorer

    s = world.test[0]
    image_processor = copy.deepcopy(world.mllm.image_processor)
    image_processor.size = {"shortest_edge": 16 * 16, "longest_edge": 96 * 96}  # pixel range
    proc = QwenProcessor(image_processor, world.mllm.tokenizer)
    text = prompt_text(world.mllm.template, s.question, proc.image_token)
    inputs = proc(images=[s.load_image().resize((64, 96))], text=[text])
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 8]]  # merged 2x2: a 6x4 grid
    grids: list = []
    orig = TokenScorer.kept
    monkeypatch.setattr(
        TokenScorer, "kept", lambda self, v, t, r, g=None: grids.append(g) or orig(self, v, t, r, g)
    )
    with compress_model(world.mllm.model, proc, world.compressor, 1 / 3) as handle:
        world.mllm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        sel = handle.last
        assert grids == [[(6, 4)]] and sel.n_tokens == 24 and sel.k == 8
        assert sel.prompt_tokens - sel.prefill_tokens == 24 - 8
        wide = world.processor(images=[s.load_image().resize((160, 96))], text=[text])
        assert wide["image_grid_thw"].tolist() == [[1, 8, 14]]  # 4x7: 7 columns
        with pytest.raises(ValueError, match="4x7 visual tokens: .* at most 6 rows and 6 col"):
            world.mllm.model.generate(**wide, max_new_tokens=1)


# ---- (b) a shorter prefill and KV cache -----------------------------------------------------------


def test_prefill_and_cache_shrink_by_the_dropped_tokens(world):
    mllm, s = world.mllm, world.test[0]
    rec = LMInputs(mllm)
    try:
        _, full = hf_generate(world, [s])
        prefill_full = rec.seen[0]["length"]
        rec.seen.clear()
        with compress_model(mllm.model, world.processor, world.compressor, 1 / 3) as handle:
            _, short = hf_generate(world, [s])
    finally:
        rec.close()
    n, k = mllm.n_tokens, keep_count(1 / 3, mllm.n_tokens)
    assert prefill_full - rec.seen[0]["length"] == n - k
    assert [r["length"] for r in rec.seen[1:]] == [1] * (len(rec.seen) - 1)
    assert handle.last.prompt_tokens - handle.last.prefill_tokens == n - k
    assert full.cache.get_seq_length() - short.cache.get_seq_length() == n - k


# ---- (c) detach, (d) keep everything -------------------------------------------------------------


def test_detach_restores_the_model(world):
    assert_detach_restores(world)


def test_keep_ratio_one_is_the_unmodified_model(world):
    assert_keep_one_is_plain(world, world.test)


# ---- what is refused ------------------------------------------------------------------------------


def test_refusals(world):
    mllm, s = world.mllm, world.test[0]
    inputs = hf_inputs(world, [s])
    with compress_model(mllm.model, world.processor, world.compressor, 1 / 3):
        no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        with pytest.raises(ValueError, match="mm_token_type_ids and image_grid_thw"):
            mllm.model.generate(**no_types, max_new_tokens=1)
        with pytest.raises(ValueError, match="use_cache=True"):
            mllm.model.generate(**inputs, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="1 images for 2 <|image_pad|> placeholders"):
        world.processor(images=[s.load_image()], text=["<|image_pad|> <|image_pad|>"])


@pytest.mark.parametrize(
    ("family", "question", "read"),
    [
        ("qwen2_vl", "what colour is the cross ?", "what colour is the cross ?"),
        ("qwen2_vl", "what colour is the cat ?", "what colour is the <unk> ?"),  # not in vocab
        ("qwen2_vl", "is there a red assistant ?", "is there a red assistant ?"),
        ("llava", "how many red objects are there ?", "how many red objects are there ?"),
    ],
)
def test_question_read_from_the_prompt_ids(family, question, read):
    """Up to the chat template's end-of-turn token (special, so a plain decode would drop it
    and keep the ``assistant`` after it), an unknown word kept as labeling tokenized it."""
    from evocomp.mllm.prompts import QWEN_TEMPLATE
    from evocomp.mllm.reference import build_tokenizer
    from evocomp.mllm.sequence import DEFAULT_TEMPLATE
    from tests.conftest import qwen_tokenizer

    tok, template, image = (
        (qwen_tokenizer(), QWEN_TEMPLATE, "<|image_pad|>")
        if family == "qwen2_vl"
        else (build_tokenizer(), DEFAULT_TEMPLATE, "<image>")
    )
    config = SimpleNamespace(image_token_id=tok.convert_tokens_to_ids(image))
    hook = LlavaPrefill(SimpleNamespace(config=config), tok, template)
    text = prompt_text(template, question, image * 4)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert hook._questions(torch.cat([ids, ids])) == [read, read]


# ---- (e) the command ------------------------------------------------------------------------------


def test_cli_answers_with_the_api(world, tmp_path, monkeypatch):
    if world.mllm.family != "qwen2_vl":
        pytest.skip("one family is enough for the command")
    monkeypatch.chdir(tmp_path)
    s, mllm = world.test[0], world.mllm
    res = runner.invoke(app, [
        "generate", "--model", str(mllm.path), "--compressor", str(world.compressor),
        "--image", str(s.image), "--question", s.question, "--keep-ratio", "0.333",
        "--max-new-tokens", str(NEW), "--json",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    answers, _, sel = compressed_generate(world, [s], 0.333)
    assert out["answer"] == answers[0] and out["question"] == s.question
    assert out["kept"] == sel.kept[0].tolist() and out["k"] == 12 and out["n_tokens"] == 36
    assert out["prefill_tokens"] == out["prompt_tokens"] - 24
    assert out["model_id"] == mllm.model_id


def test_cli_refuses_an_image_the_compressor_cannot_score(world, tmp_path, monkeypatch):
    if world.mllm.family != "qwen2_vl":
        pytest.skip("one family is enough for the command")
    monkeypatch.chdir(tmp_path)
    world.test[0].load_image().resize((160, 96)).save(tmp_path / "wide.png")
    res = runner.invoke(app, [
        "generate", "--model", str(world.mllm.path), "--compressor", str(world.compressor),
        "--image", "wide.png", "--question", world.test[0].question,
    ])  # fmt: skip
    assert res.exit_code == 2, res.output
    # found once the model is loaded (its grid comes from the image's positions): after
    # transformers' weight-loading progress lines, one error line and nothing written
    *before, last = res.output.strip().splitlines()
    assert last.startswith("error: an image of 4x7 visual tokens"), res.output
    assert all(line.startswith("Loading weights") for line in before), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.png"]


def test_cli_refuses_an_image_the_processor_rejects(world, tmp_path, monkeypatch):
    """A 1000x4 px image is past Qwen's aspect-ratio limit (200): the processor's own error,
    one line, exit 2, nothing written."""
    if world.mllm.family != "qwen2_vl":
        pytest.skip("one family is enough for the command")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (1000, 4), (200, 30, 30)).save(tmp_path / "dot.png")
    res = runner.invoke(app, [
        "generate", "--model", str(world.mllm.path), "--compressor", str(world.compressor),
        "--image", "dot.png", "--question", world.test[0].question,
    ])  # fmt: skip
    assert res.exit_code == 2, res.output
    *before, last = res.output.strip().splitlines()
    assert last.startswith("error: ") and "aspect ratio" in last, res.output
    assert all(line.startswith("Loading weights") for line in before), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dot.png"]
