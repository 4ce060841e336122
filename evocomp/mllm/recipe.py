"""How the reference MLLM is trained: patch-word alignment, then the LM on cached visual tokens.

1. *Alignment* (vision tower + projector): each projected patch token's logits
   over the vocabulary are its cosine to the (frozen, random) word embeddings
   / 0.1, trained towards ``background`` for an empty patch and 0.5 colour word
   + 0.5 shape word for an object's patch, plus a norm-matching term. Object and
   background patches weigh the same in the loss. Every visual token's nearest
   vocabulary word is then meaningful, which is what the labeling engine's
   semantic grouping needs, and the LM can find an object by its shape word.
2. *LM* (vision, projector and embeddings frozen; projected tokens cached): a
   fresh question per image per row; on half the rows each question-irrelevant
   visual token is dropped (attention mask 0) with probability U(0, drop_max), so
   the model answers from the tokens that matter and tolerates pruned inputs; the
   first ``curriculum_steps`` drop most distractors. Warmup, then linear decay to
   5%. Position ids are always the original ones (see ``sequence.py``).
   Packing several questions of one image into a row (block-diagonal attention)
   made steps 2.3x cheaper but learning per step much slower (the row's dropout
   has to spare every question's tokens, which defeats the curriculum), so a row
   holds one question.

The entry point is :func:`evocomp.mllm.reference.train_reference`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from evocomp.config import MLLMParams
from evocomp.data import shapes
from evocomp.mllm.sequence import DEFAULT_TEMPLATE, encode_prompt


def recipe_record(params: MLLMParams, exclude: set[str]) -> dict:
    """The recipe a reference checkpoint's config.json records: ``params`` less ``exclude``,
    and less the fields added after models were committed, where they leave the recipe as it
    was (a default background mix; the lookup, readout and count terms off; no sparse rows; no
    torch.compile), so those models keep their ids."""
    unchanged = {"backgrounds"} if params.backgrounds is None else set()
    if not (params.lookup_supervision or params.readout_supervision or params.count_supervision):
        unchanged |= {"lookup_supervision", "lookup_layer"}
    for term in ("readout_supervision", "count_supervision", "sparse_share"):
        if not getattr(params, term):
            unchanged.add(term)
    if not params.compile:
        unchanged.add("compile")
    return params.model_dump(exclude=exclude | unchanged)


def pixels(images: list) -> torch.Tensor:
    """CLIPImageProcessor's result for 96-px RGB images (mean = std = 0.5), without its overhead."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def visual(model, px: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens ``(B, N, D)`` of pixel values ``(B, 3, H, W)``."""
    out = model.model.get_image_features(pixel_values=px)
    return torch.stack(list(out.pooler_output))


def lr_factor(
    step: int, total: int, warmup: int, floor: float = 0.05, cosine: bool = False
) -> float:
    """Linear warmup, then cosine or linear decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * (0.5 * (1 + math.cos(math.pi * t)) if cosine else 1 - t)


# ---- stage 1: alignment ---------------------------------------------------------------------


def align(model, tokenizer, scenes, params: MLLMParams, log: Callable[[str], None]) -> None:
    """Train vision tower + projector so patch tokens sit on their words."""
    emb = model.get_input_embeddings().weight.detach()  # (V, D)
    word_dir = F.normalize(emb, dim=-1)
    norm = emb.norm(dim=-1).mean()
    ids = tokenizer.convert_tokens_to_ids
    n_tok = shapes.GRID * shapes.GRID
    targets = torch.zeros(len(scenes), n_tok, emb.shape[0])  # (S, N, V) soft word targets
    targets[:, :, ids("background")] = 1.0
    is_object = torch.zeros(len(scenes), n_tok)
    for i, (_, objs) in enumerate(scenes):
        for o in objs:
            targets[i, o.cell] = 0
            targets[i, o.cell, ids(o.colour)] = 0.5
            targets[i, o.cell, ids(o.shape)] = 0.5
            is_object[i, o.cell] = 1.0
    trainable = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    opt = torch.optim.AdamW(trainable, lr=params.align_lr, weight_decay=0.0)
    rng = np.random.default_rng(params.seed)
    model.train()
    for step in range(params.align_steps):
        for g in opt.param_groups:
            g["lr"] = params.align_lr * lr_factor(step, params.align_steps, 30, cosine=True)
        b = rng.choice(len(scenes), size=params.align_batch_size, replace=False)
        v = visual(model, pixels([scenes[i][0] for i in b]))  # (B, N, D)
        logits = F.normalize(v, dim=-1) @ word_dir.T / 0.1
        ce = -(targets[b] * logits.log_softmax(-1)).sum(-1)  # (B, N)
        # Objects are ~1 patch in 8: with a plain mean, 150 steps left ~12% of object
        # tokens nearest a wrong shape word (measured), which the LM then cannot find.
        obj = is_object[b]
        ce = (ce * obj).sum() / obj.sum().clamp(min=1) + (ce * (1 - obj)).sum() / (
            1 - obj
        ).sum().clamp(min=1)
        loss = ce + ((v.norm(dim=-1) - norm) ** 2).mean() / norm**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == params.align_steps - 1:
            log(f"align step {step}: loss {loss.item():.3f}")
    model.eval()


# ---- stage 2: the LM on cached tokens -------------------------------------------------------


def lm_trainable(model, qk_tied_init: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but the LM's layers and head (its input embeddings stay frozen too)
    and return those; with ``qk_tied_init`` every head starts with W_k = W_q, so
    q.k ~ e_q^T W^T W e_k ~ <e_q, e_k>: attention already favours visual tokens that share the
    question word's embedding."""
    lm, head = model.model.language_model, model.lm_head
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in lm.named_parameters() if "embed_tokens" not in n] + list(
        head.parameters()
    )
    for p in trainable:
        p.requires_grad_(True)
    if qk_tied_init:
        with torch.no_grad():
            for layer in lm.layers:
                att = layer.self_attn
                if att.k_proj.weight.shape == att.q_proj.weight.shape:
                    att.k_proj.weight.copy_(att.q_proj.weight)
    return trainable


class Questions:
    """(suffix ids, answer ids + EOS) per (question, answer), cached; the prefix is shared."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}
        self.prefix = encode_prompt(tokenizer, "q", "", DEFAULT_TEMPLATE).prefix

    def __call__(self, qa) -> tuple[list[int], list[int]]:
        key = (qa.question, qa.answer)
        if key not in self.cache:
            p = encode_prompt(self.tokenizer, qa.question, qa.answer, DEFAULT_TEMPLATE)
            self.cache[key] = (p.suffix, [*p.answer, self.tokenizer.eos_token_id])
        return self.cache[key]


def lm_batch(rows, prefix: list[int], feats: torch.Tensor, embed, keep: torch.Tensor | None = None):
    """Right-padded LM inputs ``[prefix][N visual tokens][suffix][answer]`` for rows of
    (image index, (suffix ids, answer ids)).

    Args:
        rows: B rows, each an image index into ``feats`` and its question.
        prefix: the prompt's ids before the image (shared by all rows).
        feats: (S, N, D) visual tokens of the images.
        embed: the LM's input embedding module.
        keep: (B, N) 1 = the row's visual token is visible, 0 = dropped; None keeps all.

    Returns:
        ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``, ``labels (B, L)`` (-100 where
        no answer token is predicted) and ``position_ids (B, L)`` (the original positions:
        a dropped token leaves a gap, as at inference).
    """
    n_vis, D = feats.shape[1], feats.shape[2]
    head = len(prefix) + n_vis
    B = len(rows)
    L = max(head + len(suf) + len(ans) for _, (suf, ans) in rows)
    x = torch.zeros(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    x[:, : len(prefix)] = embed(torch.tensor(prefix))
    mask[:, :head] = (
        1 if keep is None else torch.cat([torch.ones(B, len(prefix), dtype=torch.long), keep], 1)
    )
    for r, (i, (suf, ans)) in enumerate(rows):
        n = head + len(suf) + len(ans)
        x[r, len(prefix) : head] = feats[i]
        x[r, head:n] = embed(torch.tensor(suf + ans))
        mask[r, head:n] = 1
        labels[r, n - len(ans) - 1 : n - 1] = torch.tensor(ans)  # predicted one position early
    return x, mask, labels, torch.arange(L).expand(B, L)


@torch.no_grad()
def val_accuracy(lm, head, embed, prefix, val, feats) -> dict[str, float]:
    """Per question type: is the first answer token the argmax (== greedy answer for one-word answers)."""
    lm.eval()
    rows, types = [(i, qa) for i, qa, _ in val], [t for *_, t in val]
    x, mask, labels, pos = lm_batch(rows, prefix, feats, embed)
    h = lm(
        inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False
    ).last_hidden_state
    first = (labels != -100).int().argmax(1)
    pred = head(h[torch.arange(len(rows)), first]).argmax(-1)
    ok = (pred == labels[torch.arange(len(rows)), first]).tolist()
    lm.train()
    return {
        t: sum(o for o, tt in zip(ok, types, strict=True) if tt == t) / types.count(t)
        for t in set(types)
    }


def _row(
    scenes,
    rng: random.Random,
    weights: dict[str, float],
    questions,
    n_vis: int,
    p_drop: float | None,
):
    """One training row: an image, a question of a type drawn by ``weights``, its keep mask."""
    i = rng.randrange(len(scenes))
    qa = shapes.make_question(
        scenes[i][1], rng, rng.choices(list(weights), weights=list(weights.values()))[0]
    )
    keep = torch.ones(n_vis, dtype=torch.long)
    if p_drop is not None:
        drop = (
            torch.rand(n_vis, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            < p_drop
        )
        drop[list(qa.relevant)] = False  # never what the answer needs
        keep[drop] = 0
    return (i, questions(qa)), keep


def train_lm(
    model,
    tokenizer,
    scenes,
    feats: torch.Tensor,
    val_scenes,
    val_feats: torch.Tensor,
    params: MLLMParams,
    log: Callable[[str], None],
) -> dict:
    """Stage 2: train the LM on cached visual tokens with question-aware token dropout.

    ``batch_size`` rows of one image and one fresh question per step. Question types are
    drawn in proportion to their held-out error (plus a floor), so the weakest type gets the
    most practice.
    """
    lm, head = model.model.language_model, model.lm_head
    embed = model.get_input_embeddings()
    trainable = lm_trainable(model, params.qk_tied_init)
    opt = torch.optim.AdamW(trainable, lr=params.lm_lr, weight_decay=0.01)
    rng, vrng = random.Random(params.seed), random.Random(params.seed + 1)
    questions = Questions(tokenizer)
    val = [
        (i, questions(qa), qa.qtype)
        for i, (_, objs) in enumerate(val_scenes)
        for qa in [shapes.make_question(objs, vrng, shapes.QTYPES[i % len(shapes.QTYPES)])]
    ]
    n_vis = feats.shape[1]
    weights = dict.fromkeys(shapes.QTYPES, 1.0)
    acc: dict[str, float] = {}
    lm.train()
    t0 = time.time()
    for step in range(params.lm_steps):
        for g in opt.param_groups:
            g["lr"] = params.lm_lr * lr_factor(step, params.lm_steps, 50)
        early = step < params.curriculum_steps  # most distractors dropped: learn to find first
        rows, keeps = [], []
        for _ in range(params.batch_size):
            p_drop = (
                rng.uniform(0.5, 0.95)
                if early
                else rng.uniform(0.0, params.drop_max)
                if rng.random() < 0.5
                else None
            )
            row, keep = _row(scenes, rng, weights, questions, n_vis, p_drop)
            rows.append(row)
            keeps.append(keep)
        x, mask, labels, pos = lm_batch(rows, questions.prefix, feats, embed, torch.stack(keeps))
        hidden = lm(
            inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False
        ).last_hidden_state
        sel = labels != -100
        loss = F.cross_entropy(head(hidden[sel]), labels[sel])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % params.eval_every == 0 and step + 1 < params.lm_steps:
            acc = val_accuracy(lm, head, embed, questions.prefix, val, val_feats)
            weights = {t: 0.1 + 1.0 - acc.get(t, 0.0) for t in shapes.QTYPES}
            log(
                f"lm step {step + 1}: loss {loss.item():.4f}, held-out "
                + " ".join(f"{t} {a:.3f}" for t, a in sorted(acc.items()))
                + f" ({time.time() - t0:.0f} s)"
            )
    acc = val_accuracy(lm, head, embed, questions.prefix, val, val_feats)
    log(
        f"lm done after {params.lm_steps} steps ({time.time() - t0:.0f} s): held-out "
        + " ".join(f"{t} {a:.3f}" for t, a in sorted(acc.items()))
    )
    lm.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": params.lm_steps, "held_out": acc}
