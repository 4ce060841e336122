"""Trials of the scenes-vqa reference model's LM stage on the committed model's visual tokens.

    .venv/bin/python bench/scenes_lm_trials.py --curriculum 300 --ramp 1200 --steps 1800
    .venv/bin/python bench/scenes_lm_trials.py --layers 3 --heads 4 --batch 32 --steps 500 \\
        --qk-gain 4 --rope-factor 64

What the recipe (``evocomp/mllm/scenes_recipe.py``) would gain from an LM-stage change, without
retraining the vision tower: the model's aligned tokens of its own training and held-out images
(rebuilt from the recipe its config.json records: seed, images, grid) are cached once, and a fresh LM of
``--layers`` x ``--heads`` is trained on them with the recipe's rows (``scenes_recipe._kept``,
``lm_batch``) and scored on the held-out images with every token fed
(``scenes_recipe.val_accuracy``, one question per image, the types in turn). The trial knobs:

- ``--curriculum N``: the recipe's first N steps (every patch the answer needs, each other
  token kept with probability U(0, 0.2)); ``--ramp M``: then M steps raising that upper bound
  linearly to 1, before the recipe's alternating all-token / subset steps;
- ``--objects P``: in the curriculum (and ramp) rows, every other object is also kept whole
  with probability U(0, P) (hard negatives: objects that share the target's colour or shape are
  in view from step 0, so reading the one visible object is no shortcut);
- ``--marker S``: every visual token plus a fixed direction orthogonal to every word
  embedding, S x the tokens' mean norm (a modality marker that leaves each token's nearest
  word unchanged: can the LM then tell the question's words from the image's?);
- ``--types T ...``: train on these question types only (held-out scoring keeps all six);
- ``--qk-gain G``: the tied query/key projections start G times larger (sharper word-matching
  attention from step 0);
- ``--rope-factor F``: the LM's RoPE with ``transformers``' linear scaling by F (positions / F,
  so the 150-position spread of the visual tokens no longer scrambles content matching);
- ``--attention-supervision W``: adds W x the mean over the last layers' first half of the
  heads of -log(attention mass, at the answer's position, on the patches the answer needs);
- ``--description-supervision W`` (at ``--description-layer L``, 1-based, default 2): adds W x
  the mean over the first half of layer L's heads of -log(attention mass, at the last word of
  each description the question holds (``scenes_qa.description_targets``), on the patches of
  the object(s) it describes): the lookup hop itself, at the word where a causal LM has read
  the whole phrase (both objects of a spatial question; the counted ones; an existence
  question's matches or near misses; a position question's object at the region's word),
  leaving the answer's readout free;
  ``--readout-supervision W`` (with it): adds W x -log(attention mass) of the last layer's
  heads 0 and 1, at the answer's position, on the last word of the question's first and
  second description (both on the one description of the other types);
  ``--position-supervision W`` (with it): adds W x the squared error of a linear probe (trained
  with the LM) reading, from layer L's output at each description's last word, the described
  object's centre row and column (0-1): the looked-up object's position, at the word that
  looked it up, where the answer's heads read it;
- ``--pack K``: after the curriculum and ramp, each row is one image and K questions, packed
  as the recipe's ``lm_pack`` does (``scenes_recipe.packed_rows`` / ``packed_batch``): every
  question attends to the image and its own words only, at the positions it would have
  alone, so the image's tokens are computed once for K answers (``--batch`` rows of K
  questions a step; the unpacked phases take ``--batch`` x K rows);
- ``--where P``: each training question is, with probability P, an auxiliary one that no
  benchmark type asks, "what is the <description> in ?", answered by the region (of the
  3 x 3 thirds) of the described object's centre: retrieving an object by its description
  and reading its row and column, the two halves of a spatial question, in one (held-out
  scoring asks the benchmark's types only);
- ``--question-at before``: the question's words before the image, the assistant tag after it
  (``USER: {question} <image> ASSISTANT:``), so every visual token can already attend to the
  question in layer 1; ``both``: the question before the image and again after it
  (``USER: {question} <image> {question} ASSISTANT:``); ``after`` (default): the recipe's
  LLaVA layout. In training and in the held-out scoring alike.

Writes the held-out accuracy curve to ``metrics/scenes/lm_trials/<name>.json``. A trial is not
a reference model: nothing is saved but the curve (BENCHMARKS.md, scenes-vqa reference model).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import time
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import REPO, begin, command_line, finish  # noqa: E402

from evocomp.data import scenes, scenes_qa  # noqa: E402
from evocomp.data.shapes import QA  # noqa: E402
from evocomp.mllm import scenes_recipe, tiny_llava  # noqa: E402
from evocomp.mllm.checkpoint import checkpoint_info  # noqa: E402
from evocomp.mllm.recipe import Questions, lm_trainable, lr_factor, pixels, visual  # noqa: E402


def cached_tokens(ref, cache: Path) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """The model's visual tokens of the training and held-out scenes its recipe drew."""
    recipe = ref.config.evocomp["recipe"]
    rng = random.Random(recipe["seed"])
    n_train, n_val = recipe["n_images"], recipe["val_images"]
    made = [scenes.make_scene(rng, recipe["grid"]) for _ in range(n_train + n_val)]
    train, val = made[:n_train], made[n_train:]
    if cache.is_file():
        feats, val_feats = torch.load(cache)
    else:
        with torch.no_grad():

            def encode(part):
                return torch.cat(
                    [
                        visual(ref, pixels([scenes.render(s) for s in part[i : i + 128]]))
                        for i in range(0, len(part), 128)
                    ]
                )

            feats, val_feats = encode(train), encode(val)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((feats, val_feats), cache)
    return feats, val_feats, train, val


def needs_attentions(args) -> bool:
    """Whether a supervision term reads the LM's attention weights."""
    return bool(args.attention_supervision or args.description_supervision)


def build_lm(args, tokenizer, ref):
    """A fresh tiny LLaVA of the trial's LM shape, with the committed input embeddings."""
    llama = tiny_llava.LlamaConfig
    if args.rope_factor:
        rope = {"rope_type": "linear", "factor": args.rope_factor, "rope_theta": 10000.0}
        tiny_llava.LlamaConfig = functools.partial(llama, rope_parameters=rope)
    vision = ref.config.vision_config
    try:
        model = tiny_llava.build_model(
            tokenizer,
            args.seed,
            vision.image_size,
            scenes.CELL,
            args.heads,
            args.layers,
            vision.num_hidden_layers,
            vision.num_attention_heads,
        )
    finally:
        tiny_llava.LlamaConfig = llama
    lm = model.model.language_model
    lm.embed_tokens.load_state_dict(ref.model.language_model.embed_tokens.state_dict())
    if needs_attentions(args):
        model.set_attn_implementation("eager")  # attention weights are returned by eager only
    trainable = lm_trainable(model, qk_tied_init=True)
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.q_proj.weight.mul_(args.qk_gain)
            layer.self_attn.k_proj.weight.copy_(layer.self_attn.q_proj.weight)
    return model, trainable


def word_readout(ref, tokenizer, feats: torch.Tensor, images: list) -> dict[str, float]:
    """Per object patch: is its nearest shape word (colour word) by cosine its object's shape
    (colour)? What one visual token tells without any lookup: the ceiling the LM reads from."""
    words = F.normalize(ref.get_input_embeddings().weight.detach(), dim=-1)
    out = {}
    for attr, names in (("shape", scenes.SHAPES), ("colour", tuple(scenes.COLOURS))):
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(names)))
        hits = [
            names[k] == getattr(o, attr)
            for i, sc in enumerate(images)
            for o in sc.objects
            for k in (F.normalize(feats[i, list(o.patches)], dim=-1) @ words[ids].T).argmax(-1)
        ]  # one argmax per object, over its patches
        out[attr] = sum(hits) / len(hits)
    return out


def marked(ref, scale: float, *parts: torch.Tensor) -> list[torch.Tensor]:
    """Every visual token plus one fixed *modality* direction orthogonal to every word
    embedding, ``scale`` x the tokens' mean norm long. A token's dot product with each word
    is unchanged and its norm grows alike for all words, so its nearest word (the labeling's
    groups) is exactly the same; the LM can tell an image token from a question word by it."""
    words = ref.get_input_embeddings().weight.detach()  # (V, D)
    V, D = words.shape
    if V >= D:
        raise ValueError(f"--marker needs fewer words ({V}) than embedding dimensions ({D})")
    basis = torch.linalg.svd(words, full_matrices=True).Vh  # rows: word span, then its complement
    gen = torch.Generator().manual_seed(0)
    u = basis[V:].T @ torch.randn(D - V, generator=gen)
    u = u / u.norm() * scale * parts[0].norm(dim=-1).mean()
    return [x + u for x in parts]


def kept_tokens(args, step: int, scene, qa, rng: random.Random, n: int) -> torch.Tensor:
    """The row's visible tokens: the recipe's, or the ramp's widening curriculum.

    The ramp is ``scenes_recipe._kept``'s curriculum with a rising upper bound (the same
    draws: at the bound 0.2 it is that curriculum exactly). It lives here, not as a
    parameter of ``_kept``, because editing the recipe module makes both reference-model
    DVC stages stale; it moves there with the next recipe change that retrains them.
    """
    if step < args.curriculum + args.ramp:
        top = 0.2 + 0.8 * max(0, step - args.curriculum) / max(1, args.ramp)
        rel, p = set(qa.relevant), rng.uniform(0.0, top)
        if args.objects:  # other objects whole, each with probability U(0, --objects)
            q = rng.uniform(0.0, args.objects)
            rel |= {j for o in scene.objects if rng.random() < q for j in o.patches}
        keep = [j for j in range(n) if j in rel or rng.random() < p]
        return torch.tensor(keep, dtype=torch.long)
    return scenes_recipe._kept(scene, [qa], rng, n, "full" if step % 2 == 0 else "subset")


_recipe_batch = scenes_recipe.lm_batch  # the recipe's own builder (run() swaps the module's)


def question_batch(rows, prefix: list[int], feats: torch.Tensor, embed, where: str = "before"):
    """``scenes_recipe.lm_batch`` with the question moved (``before``) or copied (``both``)
    before the image: ``[prefix][question][kept visual tokens][question if both][tag][answer]``,
    original positions.

    A row's suffix is the question's words and then the one-token assistant tag
    (``Questions`` encodes ``{question} ASSISTANT:``). Each row is the recipe's batch of one
    with the question in its prefix; the rows are then right-padded like the recipe's.
    """
    parts = []
    for i, kept, (suf, ans) in rows:
        q, tag = suf[:-1], suf[-1:]
        tail = (q if where == "both" else []) + tag
        parts.append(_recipe_batch([(i, kept, (tail, ans))], prefix + q, feats, embed))
    width = max(x.shape[1] for x, *_ in parts)
    fills = (0.0, 0, -100, 0)  # embeddings, mask, labels, positions beyond a row's end

    def padded(j: int) -> torch.Tensor:
        return torch.cat(
            [F.pad(part[j], (0, 0, 0, width - part[j].shape[1]) if j == 0 else
                   (0, width - part[j].shape[1]), value=fills[j]) for part in parts]
        )  # fmt: skip

    return tuple(padded(j) for j in range(4))


def attention_loss(attentions, rows, labels, n_prefix: int, heads: int) -> torch.Tensor:
    """Mean -log(attention mass on the answer's patches) at the answer's position, for the
    first half of the heads of every layer but the first (rows without such patches skipped)."""
    B, L = labels.shape
    target = torch.zeros(B, L)
    for r, (_, kept, _, relevant, _) in enumerate(rows):
        target[r, n_prefix : n_prefix + len(kept)] = torch.tensor(
            [float(p in relevant) for p in kept.tolist()]
        )
    at = (labels != -100).float().argmax(1)  # the position that predicts the answer word
    has = target.sum(1) > 0
    losses = []
    for att in attentions[1:]:
        w = att[torch.arange(B), : max(1, heads // 2), at, :]  # (B, h, L)
        mass = (w * target[:, None, :]).sum(-1).clamp(min=1e-4)
        losses.append(-torch.log(mass).mean(-1)[has].mean())
    return torch.stack(losses).mean()


def description_targets(scene, qa) -> list[tuple[int, set[int]]]:
    """:func:`evocomp.data.scenes_qa.description_targets`, and ``--where``'s question ("what
    is the <description> in ?"), whose phrase ends two words before "?"."""
    if qa.qtype == "where":
        return [(len(qa.question.split()) - 3, set(qa.relevant))]
    return scenes_qa.description_targets(scene, qa)


def description_loss(attentions, rows, n_prefix: int, layer: int, heads: int) -> torch.Tensor:
    """Mean -log(attention mass on the described object's patches) at each description's last
    word, in the first half of the heads of ``layer`` (1-based; rows' (i, kept, (suffix,
    answer), relevant, targets)); targets without a kept patch are skipped."""
    att = attentions[layer - 1][:, : max(1, heads // 2)]  # (B, h, L, L)
    losses = []
    for r, (_, kept, _, _, targets) in enumerate(rows):
        m = n_prefix + len(kept)
        ks = kept.tolist()
        for word, patches in targets:
            cols = [n_prefix + j for j, p in enumerate(ks) if p in patches]
            if cols:
                mass = att[r, :, m + word, cols].sum(-1).clamp(min=1e-4)
                losses.append(-torch.log(mass).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def readout_loss(attentions, rows, labels, n_prefix: int) -> torch.Tensor:
    """Mean -log(attention mass) at the answer's position in the last layer: head j on the
    last word of the question's description j (heads 0 and 1; a one-description question
    puts both on its one description). Breaks the symmetry of a two-object comparison: with
    both objects read through one averaging head their positions enter the answer alike."""
    att = attentions[-1]
    at = (labels != -100).float().argmax(1)  # the position that predicts the answer word
    losses = []
    for r, (_, kept, _, _, targets) in enumerate(rows):
        m = n_prefix + len(kept)
        for j, word in enumerate((targets[0][0], targets[-1][0]) if targets else ()):
            losses.append(-torch.log(att[r, j, at[r], m + word].clamp(min=1e-4)))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def position_loss(hidden, rows, n_prefix: int, probe, grid: int) -> torch.Tensor:
    """MSE of a linear ``probe`` reading, from ``hidden`` (B, L, D) at each description's last
    word, the described object's centre row and column (in [0, 1]): does where the looked-up
    object is reach the word that looked it up?"""
    preds, truth = [], []
    for r, (_, kept, _, _, targets) in enumerate(rows):
        m = n_prefix + len(kept)
        for word, patches in targets:
            rc = torch.tensor([divmod(p, grid) for p in patches], dtype=torch.float)
            preds.append(probe(hidden[r, m + word]))
            truth.append(rc.mean(0) / (grid - 1))
    if not preds:
        return torch.zeros(())
    return F.mse_loss(torch.stack(preds), torch.stack(truth))


def where_question(scene, rng: random.Random):
    """The ``--where`` question: "what is the <description> in ?" -> its centre's region."""
    for o in rng.sample(scene.objects, len(scene.objects)):
        d = scenes_qa._any_description(o, scene.objects, rng)
        if d:
            c0, r0, w, h = o.footprint
            region = scenes_qa.region_of((r0 + h // 2) * scene.grid + c0 + w // 2, scene.grid)
            return QA("where", f"what is the {scenes_qa.phrase(d)} in ?", region, o.patches)
    return None


def with_where(ask, p: float):
    """``scenes_recipe.ask`` that asks a :func:`where_question` with probability ``p``."""

    def asking(scene, rng, weights):
        if rng.random() < p and (qa := where_question(scene, rng)) is not None:
            return qa
        return ask(scene, rng, weights)

    return asking


def run(args) -> dict[str, Any]:
    """:func:`_run` with the recipe's question draw (``--where``) and batch layout
    (``--question-at``: its training rows and its held-out scoring) patched for the trial."""
    with contextlib.ExitStack() as patched:
        if args.where:
            asking = with_where(scenes_recipe.ask, args.where)
            patched.enter_context(mock.patch.object(scenes_recipe, "ask", asking))
        if args.question_at != "after":
            batch = functools.partial(question_batch, where=args.question_at)
            patched.enter_context(mock.patch.object(scenes_recipe, "lm_batch", batch))
        return _run(args)


def _run(args) -> dict[str, Any]:
    from transformers import LlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(args.model)
    feats, val_feats, train, val = cached_tokens(ref, args.cache)
    if args.marker:
        feats, val_feats = marked(ref, args.marker, feats, val_feats)
    tokenizer = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    model, trainable = build_lm(args, tokenizer, ref)
    readout = word_readout(ref, tokenizer, val_feats, val)
    print(f"held-out object patches whose nearest word is right: {readout}", flush=True)
    lm, head, embed = model.model.language_model, model.lm_head, model.get_input_embeddings()
    # --position-supervision's row / column probe (none otherwise: no draw from torch's RNG)
    probe = torch.nn.Linear(embed.weight.shape[1], 2) if args.position_supervision else None
    extra = [*probe.parameters()] if probe else []
    opt = torch.optim.AdamW([*trainable, *extra], lr=args.lr, weight_decay=0.01)
    grid = round(feats.shape[1] ** 0.5)
    rng, vrng = random.Random(args.seed), random.Random(1)
    questions, qtypes = Questions(tokenizer), scenes_qa.QTYPES
    held_out, held_in = [], []
    # as many training images, scored the same way (memorising or not learning?)
    for images, into in ((val, held_out), (train[: len(val)], held_in)):
        for i, sc in enumerate(images):
            qa = scenes_qa.make_question(sc, vrng, qtypes[i % len(qtypes)])
            into.append((i, questions(qa), qa.qtype))
    n, weights, curve, t0 = feats.shape[1], dict.fromkeys(args.types, 1.0), [], time.time()
    described = located = None  # the last step's --description- / --position-supervision terms
    lm.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps, 50)
        if args.pack > 1 and step >= args.curriculum + args.ramp:
            mode = "full" if step % 2 == 0 else "subset"
            rows, _ = scenes_recipe.packed_rows(
                train, rng, weights, n, args.batch, args.pack, mode, questions
            )
            x, mask, labels, pos = scenes_recipe.packed_batch(rows, questions.prefix, feats, embed)
        else:
            rows = []
            for _ in range(args.batch * args.pack):
                i = rng.randrange(len(train))
                qa = scenes_recipe.ask(train[i], rng, weights)
                kept = kept_tokens(args, step, train[i], qa, rng, n)
                targets = description_targets(train[i], qa) if args.description_supervision else []
                rows.append((i, kept, questions(qa), set(qa.relevant), targets))
            x, mask, labels, pos = scenes_recipe.lm_batch(
                [r[:3] for r in rows], questions.prefix, feats, embed
            )
        out = lm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=pos,
            use_cache=False,
            output_attentions=needs_attentions(args),
            output_hidden_states=bool(args.position_supervision),
        )
        h = out.last_hidden_state
        loss = F.cross_entropy(head(h[labels != -100]), labels[labels != -100])
        if args.attention_supervision:
            aux = attention_loss(out.attentions, rows, labels, len(questions.prefix), args.heads)
            loss = loss + args.attention_supervision * aux
        if args.description_supervision:
            aux = description_loss(
                out.attentions, rows, len(questions.prefix), args.description_layer, args.heads
            )
            loss = loss + args.description_supervision * aux
            described = aux.item()
        if args.readout_supervision:
            aux = readout_loss(out.attentions, rows, labels, len(questions.prefix))
            loss = loss + args.readout_supervision * aux
        if args.position_supervision:
            hidden = out.hidden_states[args.description_layer]  # that layer's output
            aux = position_loss(hidden, rows, len(questions.prefix), probe, grid)
            loss = loss + args.position_supervision * aux
            located = aux.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = scenes_recipe.val_accuracy(lm, head, embed, questions.prefix, held_out, val_feats)
            weights = {t: 1.1 - acc.get(t, 0.0) for t in args.types}  # the recipe's weighting
            mean = sum(acc.values()) / len(acc)
            fit = scenes_recipe.val_accuracy(lm, head, embed, questions.prefix, held_in, feats)
            curve.append(
                {"step": step + 1, "loss": loss.item(), "mean": mean, "by_type": acc,
                 "training_images": fit, "description_loss": described,
                 "position_loss": located}
            )  # fmt: skip
            print(
                f"step {step + 1}: loss {loss.item():.3f}"
                + ("" if described is None else f" (description term {described:.3f})")
                + ("" if located is None else f" (position term {located:.4f})")
                + f", held-out mean {mean:.3f} ("
                + ", ".join(f"{t} {a:.2f}" for t, a in acc.items())
                + "; training images "
                + ", ".join(f"{t} {a:.2f}" for t, a in fit.items())
                + f") {time.time() - t0:.0f} s",
                flush=True,
            )
    return {"curve": curve, "final_mean": curve[-1]["mean"], "nearest_word": readout}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "scenes" / "mllm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--curriculum", type=int, default=300)
    p.add_argument("--ramp", type=int, default=0)
    p.add_argument("--objects", type=float, default=0.0)
    p.add_argument("--marker", type=float, default=0.0)
    p.add_argument("--types", nargs="+", choices=scenes_qa.QTYPES, default=list(scenes_qa.QTYPES))
    p.add_argument("--pack", type=int, default=1)
    p.add_argument("--qk-gain", type=float, default=1.0)
    p.add_argument("--rope-factor", type=float, default=0.0)
    p.add_argument("--attention-supervision", type=float, default=0.0)
    p.add_argument("--description-supervision", type=float, default=0.0)
    p.add_argument("--description-layer", type=int, default=2)
    p.add_argument("--readout-supervision", type=float, default=0.0)
    p.add_argument("--position-supervision", type=float, default=0.0)
    p.add_argument("--where", type=float, default=0.0)
    p.add_argument("--question-at", choices=["after", "before", "both"], default="after")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--cache", type=Path, help="token cache (default: .bench/, per model id)")
    p.add_argument("--out", type=Path, help="default: metrics/scenes/lm_trials/<from the flags>")
    args = p.parse_args(argv)
    if not 0.0 <= args.objects <= 1.0 or args.marker < 0:
        p.error("--objects must be in [0, 1] and --marker >= 0")
    for flag in ("layers", "heads", "steps", "batch", "eval_every", "pack"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.pack > 1 and (args.attention_supervision or args.question_at != "after"):
        p.error(
            "--pack packs the recipe's layout: not with --attention-supervision or --question-at"
        )
    if args.attention_supervision and args.question_at != "after":
        p.error("--attention-supervision reads the recipe's layout: only with --question-at after")
    if args.description_supervision and (
        args.pack > 1
        or args.question_at != "after"
        or not 1 <= args.description_layer <= args.layers
    ):
        p.error(
            "--description-supervision reads the recipe's unpacked layout (no --pack, "
            "--question-at after) at a --description-layer in 1..--layers"
        )
    if (args.readout_supervision or args.position_supervision) and not args.description_supervision:
        p.error(
            "--readout-supervision and --position-supervision read the descriptions: only with "
            "--description-supervision"
        )
    if args.attention_supervision and args.layers < 2:
        p.error("--attention-supervision needs --layers >= 2 (layer 1 cannot know the question)")
    check_model_and_cache(p, args)
    return args


def check_model_and_cache(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--model`` must be a scenes-vqa reference model (a parser error otherwise); ``--cache``
    defaults to its token cache under .bench/ (per model id, shared by the scenes benches)."""
    if not (args.model / "config.json").is_file():
        p.error(f"--model: no checkpoint at {args.model} (config.json missing)")
    config = json.loads((args.model / "config.json").read_text())
    if config.get("evocomp", {}).get("recipe", {}).get("benchmark") != "scenes":
        p.error(f"--model: {args.model} is not a scenes-vqa reference model (its recipe)")
    if args.cache is None:
        digest = checkpoint_info(args.model)["model_id"]
        args.cache = REPO / ".bench" / f"scenes-lm-trials-{digest}.pt"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start, machine = begin(args)
    name = (
        f"l{args.layers}h{args.heads}-c{args.curriculum}r{args.ramp}-g{args.qk_gain:g}"
        f"-rope{args.rope_factor:g}-att{args.attention_supervision:g}"
        + (f"-obj{args.objects:g}" if args.objects else "")
        + (f"-marker{args.marker:g}" if args.marker else "")
        + ("" if len(args.types) == len(scenes_qa.QTYPES) else "-" + "+".join(args.types))
        + ("" if args.question_at == "after" else f"-q{args.question_at}")
        + (f"-pack{args.pack}" if args.pack > 1 else "")
        + (f"-where{args.where:g}" if args.where else "")
        + (
            f"-desc{args.description_supervision:g}L{args.description_layer}"
            + (f"-read{args.readout_supervision:g}" if args.readout_supervision else "")
            + (f"-pos{args.position_supervision:g}" if args.position_supervision else "")
            if args.description_supervision
            else ""
        )
    )
    out = args.out or REPO / "metrics" / "scenes" / "lm_trials" / f"{name}.json"
    report = run(args) | {
        "flags": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "command": command_line(argv, __file__),
    }

    def show(rep):
        print(f"{name}: held-out all-token mean accuracy {rep['final_mean']:.3f}")

    return finish(report, out, start, show)


if __name__ == "__main__":
    main()
