"""What the deployment tests of every family share: a tiny model with a compressor trained on
GA labels of a few samples, ``model.generate()`` with and without it, the logits of every
decoding step, and the evaluation harness's kept tokens and decoding to compare with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from evocomp.compress.fit import Item, fit_compressor
from evocomp.compress.model import load_compressor, save_compressor
from evocomp.config import SearchParams, TrainParams
from evocomp.deploy import compress_model
from evocomp.deploy.prompt import processor_text
from evocomp.evaluation.harness import Selector

SMALL = SearchParams(population=8, parents=4, generations=2)
NEW = 6  # tokens generated per answer


def trained_world(mllm, shapes_data: Path, root: Path, n_test: int, processor=None):
    """``mllm``, a compressor trained on GA labels of 5 train and 2 val samples, and
    ``n_test`` test samples; ``processor`` is what ``generate()`` inputs are made with
    (default: the adapter's)."""
    from evocomp.data.readers import read_dataset
    from evocomp.features.compute import ensure_features
    from evocomp.labeling.sample import label_sample

    samples = read_dataset(shapes_data)
    split = {sp: [s for s in samples if s.split == sp] for sp in ("train", "val", "test")}
    train, val = split["train"][:5], split["val"][:2]
    test = (split["test"] + split["val"][2:])[:n_test]
    fstore = ensure_features(mllm, train + val + test, root / "features", batch_size=16)

    def item(s) -> Item:
        f = fstore.get(s.id)
        target = torch.zeros(f.tokens.shape[0])  # N of this image (LLaVA-NeXT: per size)
        target[label_sample(mllm, s, f, SMALL).result.kept] = 1.0
        return Item(f.tokens, f.cells, f.text, target)

    compressor, _ = fit_compressor(
        [item(s) for s in train], [item(s) for s in val], TrainParams(epochs=1), llm_heads=4
    )
    save_compressor(compressor, root / "compressor", {"model_id": mllm.model_id})
    return SimpleNamespace(
        root=root,
        mllm=mllm,
        processor=processor or mllm.processor,
        fstore=fstore,
        test=test,
        compressor=root / "compressor",
    )


class LogitTape:
    """Records the last-position logits of every ``lm_head`` call: one row per decoding step."""

    def __init__(self, model):
        self.rows: list[torch.Tensor] = []
        self._h = model.lm_head.register_forward_hook(self._record)

    def _record(self, module, args, out):
        self.rows.append((out[:, -1] if out.ndim == 3 else out).detach().float().clone())

    def take(self) -> torch.Tensor:
        rows, self.rows = self.rows, []
        return torch.stack(rows, 1)  # (B, steps, V)

    def close(self):
        self._h.remove()


def hf_inputs(world, samples):
    """What the processor gives for the samples' prompts (one image each), padded on the left."""
    mllm, proc = world.mllm, world.processor
    text = [processor_text(mllm.model, proc, mllm.template, s.question) for s in samples]
    images = [[s.load_image()] for s in samples]  # per prompt, as Gemma 3's processor needs
    return proc(images=images, text=text, return_tensors="pt", padding=True)


def hf_generate(world, samples, **kw):
    """``model.generate()`` as a user calls it: (answers, output with the cache)."""
    mllm = world.mllm
    inputs = hf_inputs(world, samples)
    out = mllm.model.generate(
        **inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, **kw
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [mllm.tokenizer.decode(r, skip_special_tokens=True).strip() for r in new]
    return answers, out


def compressed_generate(world, samples, ratio, **kw):
    """``model.generate()`` with the compressor attached: (answers, logits, selection)."""
    mllm = world.mllm
    tape = LogitTape(mllm.model)
    try:
        with compress_model(mllm.model, world.processor, world.compressor, ratio) as handle:
            answers, _ = hf_generate(world, samples, **kw)
        return answers, tape.take(), handle.last
    finally:
        tape.close()


def assert_detach_restores(world):
    """detach() gives the untouched model back (idempotent): its answers and logits, bitwise."""
    mllm, samples = world.mllm, world.test[:2]
    tape = LogitTape(mllm.model)
    try:
        before, _ = hf_generate(world, samples)
        untouched = tape.take()
        handle = compress_model(mllm.model, world.processor, world.compressor, 1 / 9)
        hf_generate(world, samples)
        compressed = tape.take()
        handle.detach()
        handle.detach()  # idempotent
        after, _ = hf_generate(world, samples)
        restored = tape.take()
    finally:
        tape.close()
    assert "prepare_inputs_for_generation" not in vars(mllm.model)
    assert after == before
    assert torch.equal(restored, untouched)
    assert not torch.allclose(
        compressed[:, : untouched.shape[1]], untouched[:, : compressed.shape[1]], atol=1e-3
    )


def assert_keep_one_is_plain_padded(world):
    """keep 1.0 on a left-padded batch: the plain ``generate()``'s sequences and logits; the
    selection (``sel.k == sel.n_tokens`` left to the caller, with its family's N)."""
    mllm, samples = world.mllm, world.test
    assert len(set(hf_inputs(world, samples)["attention_mask"].sum(1).tolist())) > 1  # padded
    tape = LogitTape(mllm.model)
    try:
        _, plain = hf_generate(world, samples)
        plain_logits = tape.take()
        with compress_model(mllm.model, world.processor, world.compressor, 1.0) as handle:
            _, out = hf_generate(world, samples)
        logits = tape.take()
    finally:
        tape.close()
    assert handle.last.prefill_tokens == handle.last.prompt_tokens
    assert torch.equal(out.sequences, plain.sequences)
    assert len(set(plain.sequences[0, -NEW:].tolist())) >= 2  # several distinct steps
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    return handle.last


def assert_cli_refuses_other_model(world, tmp_path, cli) -> None:
    """``evocomp generate`` with a compressor of another model: one error line, exit 2."""
    other = other_model_compressor(world, tmp_path / "other")
    res = cli(world, "--compressor", str(other))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "trained for model 'other-0123456789ab'" in lines[0]


def assert_keep_one_is_plain(world, samples):
    """keep 1.0 through the hook: the untouched ``generate()``'s answers and logits."""
    tape = LogitTape(world.mllm.model)
    try:
        plain, _ = hf_generate(world, samples)
        plain_logits = tape.take()
    finally:
        tape.close()
    answers, logits, sel = compressed_generate(world, samples, 1.0)
    assert sel.k == sel.n_tokens and sel.prefill_tokens == sel.prompt_tokens
    assert answers == plain
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    return sel


def harness_kept(world, samples, ratio) -> list[torch.Tensor]:
    """The compressor's kept tokens as ``evocomp evaluate`` picks them, from cached features."""
    mllm = world.mllm
    compressor, _ = load_compressor(world.compressor)
    sel = Selector(mllm, {"grid": mllm.grid}, compressor)
    feats = [world.fstore.get(s.id) for s in samples]
    scores = sel.scores("evocomp", samples, feats)
    return sel.kept("evocomp", ratio, samples, feats, scores)


def project_generate(world, samples, kept, extras=None):
    """The adapter's own ``generate`` over the cached features: (answers, logits per step).
    A family with per-token extras (Qwen3-VL's DeepStack) gets the cached ones, or ``extras``."""
    mllm = world.mllm
    tape = LogitTape(mllm.model)
    try:
        feats = [world.fstore.get(s.id) for s in samples]
        vis, lays = [f.tokens for f in feats], [f.layout for f in feats]
        if extras is None and getattr(mllm, "n_extra", 0):
            extras = [f.extra for f in feats]
        answers = mllm.generate(
            [s.question for s in samples], vis, kept, NEW, layouts=lays, extras=extras
        )
        return answers, tape.take()
    finally:
        tape.close()


def other_model_compressor(world, path: Path) -> Path:
    """The world's compressor saved as one trained for another model."""
    compressor, extra = load_compressor(world.compressor)
    save_compressor(compressor, path, {**extra, "model_id": "other-0123456789ab"})
    return path
