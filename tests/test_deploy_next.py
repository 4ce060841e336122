"""The compressor inside LLaVA-NeXT / LLaVA-OneVision ``generate()`` (evocomp.deploy.llava_next).

Keep 1.0 must be the plain model token for token. At keep 1/3 the LLM must get sum(N - k)
fewer tokens: of each image's N base and tile tokens the harness's kept ones, every
``image_newline`` row still there, all at their original 1-D positions; the answer and every
step's logits are checked against the project's own decoding over those tokens
(``HFLlavaNext.generate``) and against the model's own forwards fed them. An image of another
size (another N, another layout) is scored with its own cells; a batch mixing N is refused.
The command runs it and refuses a compressor of another model.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.compress.model import load_compressor
from evocomp.deploy import AnyresProcessor, compress_model
from evocomp.evaluation.harness import Selector
from evocomp.tokens import keep_count
from tests.deploy_helpers import (
    NEW,
    assert_cli_refuses_other_model,
    assert_keep_one_is_plain_padded,
    compressed_generate,
    harness_kept,
    hf_inputs,
    project_generate,
    trained_world,
)
from tests.test_mllm_next import FAMILIES, make_tiny_llava_next

runner = CliRunner()


@pytest.fixture(scope="module", params=FAMILIES)
def world(request, shapes_data, tmp_path_factory):
    """A tiny LLaVA-NeXT / OneVision, a compressor trained on GA labels of a few samples (96x96
    images: NeXT 9 base + 36 tile tokens and 6 newlines, OneVision 9 + 16 and 4), test samples."""
    from evocomp.mllm.loader import load_mllm

    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    mllm = load_mllm(make_tiny_llava_next(root / "model", request.param))
    processor = AnyresProcessor.from_pretrained(mllm.path)
    return trained_world(mllm, shapes_data, root, 3, processor)


class LMInputs:
    """Records what the language model gets at each forward: embeddings and position ids."""

    def __init__(self, mllm):
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._h = mllm.lm.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kw):
        self.seen.append((kw["inputs_embeds"].detach().clone(), kw["position_ids"].clone()))

    def close(self):
        self._h.remove()


def packed(world, inputs) -> torch.Tensor:
    """The model's packed image block ``(N + M, D)`` of a one-image prompt, newlines included."""
    model = world.mllm.model
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        )
    return out.pooler_output[0]


def reference_inputs(world, inputs, kept: torch.Tensor, layout) -> dict:
    """The prompt as the model's own forward takes it without the unkept base and tile tokens:
    the processor's ids embedded, the packed features in place, every newline and the kept
    tokens and the text at their original positions."""
    model = world.mllm.model
    ids = inputs["input_ids"]
    image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)
        x[0, image] = packed(world, inputs)
    _, slots, fixed, _ = world.mllm.block(layout)
    block = image.nonzero()[:, 0]
    keep = ~image
    keep[block[slots[kept].cpu()]] = True
    keep[block[fixed.cpu()]] = True
    return {"inputs_embeds": x[:, keep], "position_ids": torch.arange(ids.shape[1])[None, keep]}


def reference_generate(world, ref: dict) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits of full HF forwards (no cache) on ``ref``."""
    m = world.mllm
    x, pos, tokens, rows = ref["inputs_embeds"], ref["position_ids"], [], []
    for _ in range(NEW):
        with torch.no_grad():  # a mask: else gaps in the position ids read as packed sequences
            logits = m.model(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones_like(pos))
        rows.append(logits.logits[:, -1].float())
        tok = int(rows[-1][0].argmax())
        tokens.append(tok)
        if tok == m.tokenizer.eos_token_id:
            break
        x = torch.cat([x, m.model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return tokens, torch.stack(rows, 1)


def resized(world, size: tuple[int, int]):
    """The first test sample with its image resized to ``size`` (w, h): another tile grid,
    another N (48x48: one tile, 9 + 9 tokens; 96x160: NeXT 6 x 4 tiles, OneVision 5 x 3)."""
    s = world.test[0]
    path = world.root / f"{size[0]}x{size[1]}.png"
    s.load_image().resize(size).save(path)
    return SimpleNamespace(id=path.stem, question=s.question, image=path,
                           load_image=lambda: s.load_image().resize(size))  # fmt: skip


def test_the_prompt_is_the_one_labeling_fed(world):
    """``<image>`` written once per packed token (base, tiles and newlines), as the model packs."""
    mllm = world.mllm
    for s in [*world.test, resized(world, (48, 48)), resized(world, (96, 160))]:
        p = mllm.encode(s.question)
        inputs = hf_inputs(world, [s])
        n_packed = packed(world, inputs).shape[0]
        ids = inputs["input_ids"][0].tolist()
        assert ids == p.prefix + [mllm.model.config.image_token_id] * n_packed + p.suffix


def test_keep_ratio_one_is_the_unmodified_model(world):
    """A left-padded batch: the same tokens as the plain ``generate()``, the same logits."""
    sel = assert_keep_one_is_plain_padded(world)
    N = world.fstore.get(world.test[0].id).tokens.shape[0]
    assert sel.k == sel.n_tokens == N == (45 if world.mllm.family == "llava_next" else 25)


@pytest.mark.parametrize("i", [0, 1])
def test_keeps_the_harness_tokens_and_every_newline(world, i):
    mllm, s = world.mllm, world.test[i]
    f = world.fstore.get(s.id)
    rec = LMInputs(mllm)
    try:
        answers, logits, sel = compressed_generate(world, [s], 1 / 3)
    finally:
        rec.close()
    N, M = f.tokens.shape[0], mllm.block(f.layout)[2].shape[0]
    k = keep_count(1 / 3, N)
    inputs = hf_inputs(world, [s])
    L = inputs["input_ids"].shape[1]
    # the LLM gets N - k fewer tokens: the harness's kept ones, every newline
    assert sel.k == k and sel.n_tokens == N and L - sel.prefill_tokens == N - k
    assert torch.equal(sel.kept[0], harness_kept(world, [s], 1 / 3)[0])
    assert sel.questions == [s.question]
    want = reference_inputs(world, inputs, sel.kept[0], f.layout)
    (x, pos), *steps = rec.seen
    assert x.shape[1] == sel.prefill_tokens and torch.equal(pos, want["position_ids"])
    torch.testing.assert_close(x, want["inputs_embeds"], rtol=0, atol=0)
    newline = mllm.model.model.image_newline.detach()
    assert int((x[0] == newline).all(-1).sum()) == M > 0
    assert [(e.shape[1], p.tolist()) for e, p in steps] == [
        (1, [[L + t]]) for t in range(len(steps))
    ]
    # the model's own forwards on those tokens at those positions: the same answer and logits
    tokens, ref_logits = reference_generate(world, want)
    assert mllm.tokenizer.decode(tokens, skip_special_tokens=True).strip() == answers[0]
    torch.testing.assert_close(logits, ref_logits[:, : logits.shape[1]], rtol=1e-4, atol=1e-4)
    # and the project's decoding over the kept tokens (evaluation's) gives the same
    ref_answers, project_logits = project_generate(world, [s], sel.kept)
    assert ref_answers == answers
    torch.testing.assert_close(logits, project_logits[:, : logits.shape[1]], rtol=1e-4, atol=1e-4)
    _, full_logits = project_generate(world, [s], [None])
    assert not torch.allclose(logits[:, :1], full_logits[:, :1], atol=1e-3)  # it did compress
    # renumbered positions or dropped newlines would fail those comparisons (1e-4)
    renumbered = dict(want, position_ids=torch.arange(want["position_ids"].shape[1])[None])
    lines = (want["inputs_embeds"][0] == newline).all(-1)
    no_newlines = {key: v[:, ~lines] for key, v in want.items()}
    for wrong in (renumbered, no_newlines):
        _, off = reference_generate(world, wrong)
        assert (off[:, 0] - logits[:, 0]).abs().max() > 1e-3


def test_an_image_of_another_size_is_scored_on_its_own_layout(world):
    """A 48x48 image: another N and tile grid (within the grids the compressor was trained on);
    the kept set is the harness's on its tokens and cells, the answer the project's decoding
    with its layout."""
    mllm, s = world.mllm, resized(world, (48, 48))
    (vis,) = mllm.image_tokens([s.load_image()])
    assert vis.tokens.shape[0] != world.fstore.get(world.test[0].id).tokens.shape[0]
    answers, logits, sel = compressed_generate(world, [s], 1 / 3)
    feat = SimpleNamespace(tokens=vis.tokens, cells=vis.cells, text=mllm.question_embeddings(
        s.question))  # fmt: skip
    compressor, _ = load_compressor(world.compressor)
    harness = Selector(mllm, {"grid": mllm.grid}, compressor)
    want = harness.kept("evocomp", 1 / 3, [s], [feat], harness.scores("evocomp", [s], [feat]))
    assert sel.n_tokens == vis.tokens.shape[0] and torch.equal(sel.kept[0], want[0])
    ref = mllm.generate([s.question], [vis.tokens], sel.kept, NEW, layouts=[vis.layout])
    assert ref == answers


def test_a_batch_of_different_n_is_refused_in_one_line(world):
    mllm = world.mllm
    inputs = hf_inputs(world, [world.test[0], resized(world, (96, 160))])
    with (
        compress_model(mllm.model, world.processor, world.compressor, 1 / 3),
        pytest.raises(ValueError, match="images of one token count N only") as err,
    ):
        mllm.model.generate(**inputs, max_new_tokens=1)
    assert "\n" not in str(err.value)


# ---- the command ----------------------------------------------------------------------------------


def cli(world, *args: str):
    s = world.test[0]
    return runner.invoke(app, [
        "generate", "--model", str(world.mllm.path), "--image", str(s.image),
        "--question", s.question, *args,
    ])  # fmt: skip


def test_cli_answers_with_the_api(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s, mllm = world.test[0], world.mllm
    res = cli(world, "--compressor", str(world.compressor), "--keep-ratio", "0.333",
              "--max-new-tokens", str(NEW), "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    answers, _, sel = compressed_generate(world, [s], 0.333)
    N = world.fstore.get(s.id).tokens.shape[0]
    assert out["answer"] == answers[0] and out["question"] == s.question
    assert out["kept"] == sel.kept[0].tolist() and out["n_tokens"] == N
    assert out["k"] == keep_count(0.333, N)
    p = mllm.encode(s.question)
    M = mllm.block(world.fstore.get(s.id).layout)[2].shape[0]
    assert out["prompt_tokens"] == len(p.prefix) + N + M + len(p.suffix)
    assert out["prefill_tokens"] == out["prompt_tokens"] - (N - out["k"])
    assert out["model_id"] == mllm.model_id
    plain = cli(world, "--compressor", str(world.compressor), "--max-new-tokens", str(NEW))
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip() == answers[0]


def test_cli_refuses_a_compressor_of_another_model(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_cli_refuses_other_model(world, tmp_path, cli)
