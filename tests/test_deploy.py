"""The compressor inside ``LlavaForConditionalGeneration.generate()`` (evocomp.deploy).

Deployment must give what the evaluation harness measured: the harness's kept tokens, and
the project's own greedy decoding over them (``HFLlava.generate``, original positions) —
compared on the logits of every generated token, not only on the decoded words of a random
model. And it must really shorten the prefill, and leave no trace once detached.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.compress.model import load_compressor
from evocomp.deploy import compress_model
from evocomp.deploy.attach import HOOK_ATTR
from evocomp.deploy.prompt import question_from_text
from evocomp.errors import ModelError
from evocomp.evaluation.harness import Selector
from evocomp.mllm.sequence import DEFAULT_TEMPLATE
from evocomp.tokens import keep_count
from tests.deploy_helpers import (
    NEW,
    assert_detach_restores,
    assert_keep_one_is_plain,
    compressed_generate,
    harness_kept,
    hf_generate,
    hf_inputs,
    other_model_compressor,
    project_generate,
    trained_world,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tiny_llava, shapes_data, tmp_path_factory):
    """The tiny LLaVA, a compressor trained on GA labels of a few samples, and test samples."""
    from evocomp.mllm.hf_llava import HFLlava

    return trained_world(HFLlava(tiny_llava), shapes_data, tmp_path_factory.mktemp("deploy"), 4)


# ---- (a) the harness's tokens, the project's decoding --------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 1 / 3])
def test_generate_matches_the_evaluation_path(world, ratio):
    for s in world.test:
        answers, logits, sel = compressed_generate(world, [s], ratio)
        kept = harness_kept(world, [s], ratio)
        assert sel.k == keep_count(ratio, world.mllm.n_tokens) == kept[0].numel()
        assert torch.equal(sel.kept[0], kept[0]), s.id
        assert sel.questions == [s.question]  # read back out of the prompt ids
        ref_answers, ref_logits = project_generate(world, [s], kept)
        assert answers == ref_answers
        steps = logits.shape[1]
        torch.testing.assert_close(logits, ref_logits[:, :steps], rtol=1e-4, atol=1e-4)
        _, full_logits = project_generate(world, [s], [None])
        assert not torch.allclose(logits, full_logits[:, :steps], atol=1e-3)  # it did compress


def test_batched_left_padded_generate_matches(world):
    samples = world.test
    lengths = hf_inputs(world, samples)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    masks: list[int] = []  # attention-mask length of each LLM forward
    hook = world.mllm.lm.register_forward_pre_hook(
        lambda mod, args, kw: masks.append(kw["attention_mask"].shape[1]), with_kwargs=True
    )
    try:
        answers, logits, sel = compressed_generate(world, samples, 1 / 3)
    finally:
        hook.remove()
    # the mask follows the shortened sequence (the KV cache), not the full-length prompt
    assert masks == [sel.prefill_tokens + t for t in range(len(masks))]
    kept = harness_kept(world, samples, 1 / 3)
    assert all(torch.equal(a, b) for a, b in zip(sel.kept, kept, strict=True))
    ref_answers, ref_logits = project_generate(world, samples, kept)
    assert answers == ref_answers
    torch.testing.assert_close(logits, ref_logits[:, : logits.shape[1]], rtol=1e-4, atol=1e-4)


def test_explicit_question_overrides_the_prompt(world):
    s = world.test[0]
    other = next(t for t in world.test if t.question != s.question)
    *_, read = compressed_generate(world, [s], 1 / 3)
    *_, given = compressed_generate(world, [s], 1 / 3, question=other.question)
    assert given.questions == [other.question] and read.questions == [s.question]
    mllm = world.mllm
    compressor, _ = load_compressor(world.compressor)
    cached = world.fstore.get(s.id)
    feats = SimpleNamespace(
        tokens=cached.tokens, cells=cached.cells, text=mllm.question_embeddings(other.question)
    )
    sel = Selector(mllm, {"grid": mllm.grid}, compressor)
    ratio = read.k / cached.tokens.shape[0]
    want = sel.kept("evocomp", ratio, [s], [feats], sel.scores("evocomp", [s], [feats]))
    assert torch.equal(given.kept[0], want[0])


# ---- (b) a shorter prefill and KV cache -----------------------------------------------------------


def test_prefill_and_cache_shrink_by_the_dropped_tokens(world):
    mllm, s = world.mllm, world.test[0]
    seen: list[int] = []  # sequence length of each LLM forward
    hook = mllm.lm.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        _, full = hf_generate(world, [s])
        prefill_full, seen[:] = seen[0], []
        with compress_model(mllm.model, mllm.processor, world.compressor, 1 / 3) as handle:
            _, short = hf_generate(world, [s])
        prefill_short = seen[0]
    finally:
        hook.remove()
    n, k = mllm.n_tokens, keep_count(1 / 3, mllm.n_tokens)
    assert prefill_full - prefill_short == n - k
    assert seen[1:] == [1] * (len(seen) - 1)  # decoding steps feed one token each
    assert handle.last.prompt_tokens - handle.last.prefill_tokens == n - k
    assert full.cache.get_seq_length() - short.cache.get_seq_length() == n - k


# ---- (c) detach, (d) keep everything -------------------------------------------------------------


def test_detach_restores_the_model(world):
    assert_detach_restores(world)


def test_keep_ratio_one_is_the_unmodified_model(world):
    assert_keep_one_is_plain(world, world.test)


# ---- what is refused ------------------------------------------------------------------------------


def test_refusals(world, tmp_path):
    mllm = world.mllm
    model, proc, comp = mllm.model, mllm.processor, world.compressor
    with pytest.raises(ValueError, match="prune_layer=2"):
        compress_model(model, proc, comp, 1 / 3, prune_layer=2)
    with pytest.raises(ValueError, match="outside"):
        compress_model(model, proc, comp, 1.5)
    with pytest.raises(ModelError, match="idefics3"):
        compress_model(
            SimpleNamespace(config=SimpleNamespace(model_type="idefics3")), proc, comp, 0.5
        )
    with pytest.raises(FileNotFoundError, match="no compressor"):
        compress_model(model, proc, tmp_path / "none", 1 / 3)
    other = other_model_compressor(world, tmp_path / "other")
    with pytest.raises(ModelError, match="trained for model 'other-0123456789ab'"):
        compress_model(model, proc, other, 1 / 3)
    with compress_model(model, proc, comp, 1 / 3):
        with pytest.raises(ValueError, match="already has a compressor"):
            compress_model(model, proc, comp, 1 / 3)
        inputs = hf_inputs(world, world.test[:1])
        with pytest.raises(ValueError, match="outside"):
            model.generate(**inputs, max_new_tokens=1, keep_ratio=0.0)


@pytest.mark.parametrize(
    ("text", "question"),
    [
        ("what colour is the cross ? ASSISTANT:", "what colour is the cross ?"),
        (
            "\nhow many red objects are there ? ASSISTANT: 2 </s> USER: and blue ? ASSISTANT:",
            "how many red objects are there ?",
        ),
        ("no template here", "no template here"),
        ("ASSISTANT:", ""),
    ],
)
def test_question_read_from_the_prompt(text, question):
    assert question_from_text(text, DEFAULT_TEMPLATE) == question


# ---- (e) the command ------------------------------------------------------------------------------


def cli(*args: str):
    return runner.invoke(app, ["generate", *args])


def test_cli_answers_with_the_api(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s, mllm = world.test[0], world.mllm
    res = cli(
        "--model", str(mllm.path), "--compressor", str(world.compressor),
        "--image", str(s.image), "--question", s.question, "--keep-ratio", "0.333",
        "--max-new-tokens", str(NEW), "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    answers, _, sel = compressed_generate(world, [s], 0.333)
    assert out["answer"] == answers[0]
    assert out["kept"] == sel.kept[0].tolist() and out["k"] == 12 and out["n_tokens"] == 36
    assert out["prefill_tokens"] == out["prompt_tokens"] - 24 and out["seconds"] > 0
    plain = cli("--model", str(mllm.path), "--compressor", str(world.compressor),
                "--image", str(s.image), "--question", s.question, "--max-new-tokens", str(NEW))  # fmt: skip
    assert plain.exit_code == 0 and plain.stdout.strip() == answers[0]


@pytest.fixture
def bad_inputs(world, tmp_path):
    (tmp_path / "not-image.png").write_text("hello")
    unsupported = tmp_path / "idefics3"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    (unsupported / "model.safetensors").write_bytes(b"")
    other_model_compressor(world, tmp_path / "other")
    return tmp_path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"--image": "missing.png"}, "image not found"),
        ({"--image": "{tmp}/not-image.png"}, "unreadable image"),
        ({"--model": "{tmp}"}, "no config.json"),
        ({"--model": "{tmp}/idefics3"}, "has no compressed generate() yet"),
        ({"--compressor": "{tmp}/other"}, "trained for model 'other-0123456789ab'"),
        ({"--compressor": "{tmp}/none"}, "no compressor"),
        ({"--keep-ratio": "0"}, "--keep-ratio"),
    ],
)
def test_cli_bad_input_is_one_line(world, bad_inputs, monkeypatch, change, match):
    monkeypatch.chdir(bad_inputs)
    s = world.test[0]
    args = {
        "--model": str(world.mllm.path),
        "--compressor": str(world.compressor),
        "--image": str(s.image),
        "--question": s.question,
    }
    args.update({k: v.format(tmp=bad_inputs) for k, v in change.items()})
    res = cli(*[x for kv in args.items() for x in kv])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], res.output


# ---- the benchmark's smoke run --------------------------------------------------------------------


def test_deploy_speed_bench_smoke(bench_module, tmp_path):
    deploy_speed = bench_module("deploy_speed")

    out = tmp_path / "bench_deploy.json"
    report = deploy_speed.main(
        ["--tiny", "--quick", "--warmup", "0", "--new-tokens", "2", "--out", str(out)]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report)) and not list(tmp_path.glob("*.tmp"))
    tokens = data["tokens"]
    assert tokens["1.000"]["visual"] - tokens["0.333"]["visual"] == 36 - 12
    for key in ("1.000", "0.333"):  # the cache holds the prefill plus the fed new tokens
        assert tokens[key]["kv_cache_after"] == tokens[key]["prefill"] + 1
    assert tokens["1.000"]["prefill"] - tokens["0.333"]["prefill"] == 24
    assert set(data["prefill_speedup"]) == {"0.333"} and data["command"].split()[1].startswith(
        "bench/"
    )


def test_fill_keeps_what_the_evaluations_evocomp_fill_keeps(world, tmp_path):
    """compress_model(fill=True): the compressor's top tokens up to its labels' keep ratio,
    then DivPrune's picks: the kept sets of `evocomp evaluate`'s evocomp_fill; a compressor
    that does not record the ratio is refused."""
    import shutil

    mllm = world.mllm
    with pytest.raises(ModelError, match="does not record its labels' keep ratio"):
        compress_model(mllm.model, world.processor, world.compressor, 1 / 3, fill=True)
    comp = shutil.copytree(world.compressor, tmp_path / "comp")
    meta = json.loads((comp / "config.json").read_text())
    meta["extra"]["label_keep_ratio"] = 0.1111
    (comp / "config.json").write_text(json.dumps(meta))
    compressor, _ = load_compressor(comp)
    sel = Selector(mllm, {"grid": mllm.grid}, compressor, label_ratio=0.1111)
    samples = world.test[:2]
    feats = [world.fstore.get(s.id) for s in samples]
    scores = sel.scores("evocomp_fill", samples, feats)
    want = sel.kept("evocomp_fill", 1 / 3, samples, feats, scores)
    top = sel.kept("evocomp", 1 / 9, samples, feats, scores)
    for s, w, t in zip(samples, want, top, strict=True):
        with compress_model(mllm.model, world.processor, comp, 1 / 3, fill=True) as handle:
            hf_generate(world, [s])
        kept = handle.last.kept[0]
        assert torch.equal(kept, w) and set(t.tolist()) <= set(kept.tolist())
        assert kept.numel() == keep_count(1 / 3, mllm.n_tokens)


def test_cli_fill_refuses_a_compressor_without_its_label_ratio(world):
    s = world.test[0]
    res = cli(
        "--model", str(world.mllm.path), "--compressor", str(world.compressor),
        "--image", str(s.image), "--question", s.question, "--fill",
    )  # fmt: skip
    assert res.exit_code == 2 and "does not record its labels' keep ratio" in res.output


# ---- one compressor per label budget ------------------------------------------------------------


def budget_compressor(world, dest, budget: float, seed: int):
    """The world's compressor with perturbed weights, recorded as trained on labels of keep
    ratio ``budget``: a second compressor that ranks tokens differently."""
    from evocomp.compress.model import save_compressor

    model, extra = load_compressor(world.compressor)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    save_compressor(model, dest, {**extra, "label_keep_ratio": budget})
    return dest


@pytest.fixture(scope="module")
def budgets(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("budgets")
    return budget_compressor(world, root / "small", 0.1111, 1), budget_compressor(
        world, root / "large", 0.3333, 2
    )


def test_budget_compressors_serve_their_ratios_as_the_evaluation(world, budgets):
    """Several compressors: each keep ratio keeps what ``evocomp evaluate``'s Selector keeps
    with the same compressors (the nearest budget, or the route's pick)."""
    small, large = budgets
    mllm, s = world.mllm, world.test[0]
    models = {0.1111: load_compressor(small)[0], 0.3333: load_compressor(large)[0]}
    feats = [world.fstore.get(s.id)]

    def evaluated(ratio, route=None):
        sel = Selector(mllm, {"grid": mllm.grid}, models, route=route)
        return sel.kept("evocomp", ratio, [s], feats, sel.scores("evocomp", [s], feats, ratio))[0]

    # the two rank differently, so serving the wrong one would show
    assert not torch.equal(evaluated(1 / 3), evaluated(1 / 3, {"0.333": 0.1111}))
    with compress_model(mllm.model, world.processor, [small, large], 1 / 3) as handle:
        for ratio, want in [(1 / 9, small), (0.2, large), (1 / 3, large), (0.5, large)]:
            hf_generate(world, [s], keep_ratio=ratio)
            assert handle.last_compressor == want, ratio
            assert torch.equal(handle.last.kept[0], evaluated(ratio)), ratio
    route = {"0.333": small}
    with compress_model(mllm.model, world.processor, [large, small], 1 / 3, route=route) as h:
        hf_generate(world, [s])
        assert h.last_compressor == small
        assert torch.equal(h.last.kept[0], evaluated(1 / 3, {"0.333": 0.1111}))
        hf_generate(world, [s], keep_ratio=1 / 9)  # not in the route: the nearest budget
        assert h.last_compressor == small


def test_budget_compressors_refusals(world, budgets, tmp_path):
    small, large = budgets
    model, proc = world.mllm.model, world.processor
    with pytest.raises(ModelError, match="does not record its labels' keep ratio"):
        compress_model(model, proc, [world.compressor, large], 1 / 3)
    twin = budget_compressor(world, tmp_path / "twin", 0.1111, 3)
    with pytest.raises(ModelError, match="both trained on labels of keep ratio 0.1111"):
        compress_model(model, proc, [small, twin], 1 / 3)
    with pytest.raises(ModelError, match="not among the compressors given"):
        compress_model(model, proc, [small, large], 1 / 3, route={"0.333": tmp_path / "x"})
    assert not hasattr(model, HOOK_ATTR)  # nothing attached by a refusal


def test_cli_route_from_an_evaluation(world, budgets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small, large = budgets
    s, mllm = world.test[0], world.mllm
    base = ("--model", str(mllm.path), "--image", str(s.image), "--question", s.question,
            "--keep-ratio", "0.333", "--max-new-tokens", str(NEW), "--json")  # fmt: skip
    both = cli(*base, "--compressor", str(small), "--compressor", str(large))
    assert both.exit_code == 0, both.output
    assert json.loads(both.stdout.strip().splitlines()[-1])["compressor"] == str(large)
    (tmp_path / "eval.json").write_text(
        json.dumps({"compressor_for_ratio": {"0.333": str(small), "0.111": str(small)}})
    )
    routed = cli(*base, "--route", "eval.json")  # its compressors: the ones it names
    assert routed.exit_code == 0, routed.output
    out = json.loads(routed.stdout.strip().splitlines()[-1])
    with compress_model(mllm.model, world.processor, small, 1 / 3) as handle:
        answers, _ = hf_generate(world, [s])
    assert out["compressor"] == str(small) and out["kept"] == handle.last.kept[0].tolist()
    assert out["answer"] == answers[0]
    (tmp_path / "single.json").write_text(json.dumps({"full": 1.0}))
    for extra, match in [
        (("--route", "single.json"), "has no compressor_for_ratio"),
        (("--route", "missing.json"), "not a readable evaluation result"),
        (("--route", "eval.json", "--compressor", str(large)), "not among the compressors"),
    ]:
        res = cli(*base, *extra)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and match in lines[0], res.output
