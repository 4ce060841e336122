"""How the scenes-vqa reference MLLM is trained (the shapes recipe, grown to 144+ tokens).

scenes-vqa asks what one patch's word cannot answer: how many *objects* (an object covers
1-9 patches), which of two objects is further left, what lies in a named third of the image,
which one is *large*. So alignment puts more than words into each visual token:

1. *Alignment* (vision tower + projector), as for shapes-vqa: each patch token's cosine
   logits over the vocabulary are trained towards ``background`` for an empty patch and
   0.5 colour word + 0.5 shape word for an object's patch (so every token's nearest word is
   its colour or shape, which the labeling engine groups by), plus a norm-matching term.
   Four linear *probes* on the token, trained with it and then thrown away, make the token
   carry its row and column (regression), its object's size word (3-way) and whether it is
   its object's *anchor*, the first of its patches in raster order (binary). The LM reads
   the same directions, so it can count anchors, compare columns and find a region.
2. *LM* (vision, projector and embeddings frozen; tokens cached): a fresh question per
   image per row. The first ``curriculum_steps`` see every patch the answer needs and few
   others (each kept with probability U(0, 0.2)): the model learns to find before it learns
   to ignore. Then steps alternate between rows that see every token and rows that see a
   random subset always holding the anchors of the objects the answer needs (each other
   token kept with probability U(0, 1)). Dropped tokens are cut out of the sequence (their
   original position ids are kept), so a subset row costs only what it keeps, and a step's
   rows are all of one kind, so subset steps are short. Question types are drawn by
   held-out error. (A first run with a 300-step curriculum keeping half the distractors
   was at chance on every type after 600 steps.) With ``lm_pack`` K > 1, each step after
   the curriculum has ``batch_size`` rows of one image and K questions (:func:`packed_batch`:
   each question sees only the image and its own words, so the image's tokens are computed
   once for K answers; 4-6x the answers per second, which took the held-out accuracy from
   0.46 in 48 min to 0.73 in 26: BENCHMARKS.md).
3. *Lookup term* (``lookup_supervision`` > 0): at the last word of each phrase that names
   one object ("the large red ring", "the top left"), linear probes on LM layer
   ``lookup_layer``'s output read that object's centre and its colour and shape
   (:func:`lookup_loss`): the lookup every answer but a count needs, asked for at the word
   that completes it, where a later layer's answer reads it.
4. *Readout term* (``readout_supervision`` > 0): where a spatial question's answer is
   predicted, a linear probe on the output of the layer after the lookup's reads both named
   objects' centres (:func:`readout_loss`): the two lookups gathered where the comparison
   is made, so the layers after it only have to compare.
5. *Count term* (``count_supervision`` > 0): where a count question's answer is predicted,
   a linear probe on the lookup layer's output reads the count (:func:`count_loss`): the
   counted objects' anchors gathered by the lookup's layer, so the layers after it only
   have to name the number.
6. *Sparse rows* (``sparse_share`` > 0): that share of the subset steps after the
   curriculum see the curriculum's rows (every patch the answer needs, each other token
   kept with probability U(0, 0.2)): the rows a compressor at 1/9 hands the model, which a
   subset row (each other token kept with probability U(0, 1)) seldom is.

The entry point is :func:`evocomp.mllm.scenes_reference.train_scenes_reference`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from evocomp.config import MLLMParams
from evocomp.data import scenes, scenes_qa
from evocomp.mllm.recipe import Questions, lm_trainable, lr_factor, pixels, visual

PROBES = {"row": 1, "col": 1, "size": len(scenes.SIZES), "anchor": 1}


def anchors(objects) -> list[int]:
    """Each object's anchor patch: its first in raster order."""
    return [min(o.patches) for o in objects if o.patches]


def patch_truth(scene: scenes.Scene, word_ids: dict[str, int], vocab: int):
    """Per patch: soft word targets ``(N, V)``, object flag, size index (-1: none), anchor flag."""
    n = scene.grid * scene.grid
    targets = torch.zeros(n, vocab)
    targets[:, word_ids["background"]] = 1.0
    is_object, size, anchor = torch.zeros(n), torch.full((n,), -1), torch.zeros(n)
    for o in scene.objects:
        p = list(o.patches)
        targets[p] = 0
        targets[p, word_ids[o.colour]] = 0.5
        targets[p, word_ids[o.shape]] = 0.5
        is_object[p] = 1.0
        size[p] = scenes.SIZES.index(o.size)
        if p:
            anchor[min(p)] = 1.0
    return targets, is_object, size, anchor


def init_positions(vision_tower, grid: int, scale: float = 0.5) -> None:
    """Start CLIP's learned position embeddings as a 2-D sine-cosine code (half the channels
    for the row, half for the column; the class position at zero), so where a patch is can be
    read linearly from the first step. Random ones left the column 1.9 patches off after 200
    alignment steps (measured)."""
    emb = vision_tower.embeddings.position_embedding.weight
    D = emb.shape[1]
    freqs = 1.0 / (grid ** (torch.arange(D // 4) / (D // 4)))  # D/4 frequencies per axis
    r, c = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    code = torch.cat(
        [
            f(x[:, None].float() * freqs * torch.pi / 2)
            for x in (r, c)
            for f in (torch.sin, torch.cos)
        ],
        dim=1,
    )
    with torch.no_grad():
        emb.zero_()
        emb[1 : 1 + grid * grid, : code.shape[1]] = scale * code


def align(model, tokenizer, data, params: MLLMParams, log: Callable[[str], None]) -> None:
    """Train vision tower + projector: words by cosine, position / size / anchor by probes."""
    emb = model.get_input_embeddings().weight.detach()
    word_dir, norm = F.normalize(emb, dim=-1), emb.norm(dim=-1).mean()
    ids = {
        w: tokenizer.convert_tokens_to_ids(w)
        for w in ["background", *scenes.COLOURS, *scenes.SHAPES]
    }
    truth = [patch_truth(sc, ids, emb.shape[0]) for _, sc in data]
    targets, is_object, size, anchor = (torch.stack(t) for t in zip(*truth, strict=True))
    grid = data[0][1].grid
    init_positions(model.model.vision_tower, grid)
    rows = torch.arange(grid).repeat_interleave(grid).float() / (grid - 1)
    cols = torch.arange(grid).repeat(grid).float() / (grid - 1)
    D = emb.shape[1]
    probes = torch.nn.ModuleDict({k: torch.nn.Linear(D, v) for k, v in PROBES.items()})
    trainable = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *probes.parameters(),
    ]
    opt = torch.optim.AdamW(trainable, lr=params.align_lr, weight_decay=0.0)
    rng = np.random.default_rng(params.seed)
    model.train()
    for step in range(params.align_steps):
        for g in opt.param_groups:
            g["lr"] = params.align_lr * lr_factor(step, params.align_steps, 30, cosine=True)
        b = rng.choice(len(data), size=params.align_batch_size, replace=False)
        v = visual(model, pixels([data[i][0] for i in b]))  # (B, N, D)
        logits = F.normalize(v, dim=-1) @ word_dir.T / 0.1
        ce = -(targets[b] * logits.log_softmax(-1)).sum(-1)
        obj = is_object[b]
        word = (ce * obj).sum() / obj.sum().clamp(min=1) + (ce * (1 - obj)).sum() / (
            1 - obj
        ).sum().clamp(min=1)
        pos = F.mse_loss(probes["row"](v).squeeze(-1), rows.expand(len(b), -1)) + F.mse_loss(
            probes["col"](v).squeeze(-1), cols.expand(len(b), -1)
        )
        sz = size[b]
        size_ce = F.cross_entropy(probes["size"](v)[sz >= 0], sz[sz >= 0])
        a = anchor[b]
        anchor_logit = probes["anchor"](v).squeeze(-1)
        # anchors are ~1 patch in 14: weigh them like the rest
        anchor_bce = F.binary_cross_entropy_with_logits(
            anchor_logit, a, pos_weight=(1 - a).sum() / a.sum().clamp(min=1)
        )
        loss = (
            word + ((v.norm(dim=-1) - norm) ** 2).mean() / norm**2 + 10 * pos + size_ce + anchor_bce
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == params.align_steps - 1:
            with torch.no_grad():
                anchor_acc = ((anchor_logit > 0).float() == a).float().mean().item()
                col_err = (probes["col"](v).squeeze(-1) - cols).abs().mean().item() * (grid - 1)
            log(
                f"align step {step}: loss {loss.item():.3f} (words {word.item():.3f}, "
                f"col error {col_err:.2f} patches, size {size_ce.item():.3f}, "
                f"anchor acc {anchor_acc:.3f})"
            )
    model.eval()


# ---- stage 2: the LM on cached tokens, dropped tokens cut out ----------------------------------


def lm_batch(rows, prefix: list[int], feats: torch.Tensor, embed):
    """Right-padded LM inputs for rows of (image index, kept token indices, (suffix, answer)).

    ``[prefix][kept visual tokens][suffix][answer]`` with the *original* position ids (the
    text after the image is positioned as if all N tokens were there, as at inference).
    Returns ``inputs_embeds, attention_mask, labels, position_ids``.
    """
    n_vis, D = feats.shape[1], feats.shape[2]
    P = len(prefix)
    lens = [P + len(k) + len(s) + len(a) for _, k, (s, a) in rows]
    B, L = len(rows), max(lens)
    x = torch.zeros(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    pre = embed(torch.tensor(prefix))
    for r, (i, kept, (suf, ans)) in enumerate(rows):
        m, n = P + len(kept), lens[r]
        x[r, :P] = pre
        x[r, P:m] = feats[i, kept]
        x[r, m:n] = embed(torch.tensor(suf + ans))
        mask[r, :n] = 1
        labels[r, n - len(ans) - 1 : n - 1] = torch.tensor(ans)
        pos[r, :P] = torch.arange(P)
        pos[r, P:m] = P + kept
        pos[r, m:n] = torch.arange(P + n_vis, P + n_vis + n - m)
    return x, mask, labels, pos


def packed_batch(rows, prefix: list[int], feats: torch.Tensor, embed):
    """LM inputs for rows of (image index, kept token indices, [(suffix, answer), ...]):
    ``[prefix][kept visual tokens][q1 a1][q2 a2]...``, right-padded.

    Each question's words attend (causally) to the prefix, the visual tokens and themselves,
    never to another question, and sit at the positions they would have alone (right after
    the N visual tokens), so every answer's logits equal those of its own :func:`lm_batch`
    row; the visual tokens, which attend only backwards, are computed once per image instead
    of once per question. ``transformers`` takes such a mask as a 4-D additive one, as is
    (written here: no library builds a shared-prefix mask for packed questions).
    Returns ``inputs_embeds, attention_mask (B, 1, L, L), labels, position_ids``.
    """
    n_vis, D = feats.shape[1], feats.shape[2]
    P = len(prefix)
    lens = [P + len(k) + sum(len(s) + len(a) for s, a in qs) for _, k, qs in rows]
    B, L = len(rows), max(lens)
    x = torch.zeros(B, L, D)
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    labels = torch.full((B, L), -100, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    pre = embed(torch.tensor(prefix))
    for r, (i, kept, qs) in enumerate(rows):
        m = P + len(kept)
        x[r, :P], x[r, P:m] = pre, feats[i, kept]
        pos[r, :P], pos[r, P:m] = torch.arange(P), P + kept
        allowed[r, :m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
        s = m
        for suf, ans in qs:
            e = s + len(suf) + len(ans)
            x[r, s:e] = embed(torch.tensor(suf + ans))
            pos[r, s:e] = torch.arange(P + n_vis, P + n_vis + e - s)
            allowed[r, s:e, :m] = True
            allowed[r, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
            labels[r, e - len(ans) - 1 : e - 1] = torch.tensor(ans)
            s = e
    allowed[:, torch.arange(L), torch.arange(L)] = True  # padding sees itself: no empty rows
    mask = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)
    return x, mask, labels, pos


def _forward(lm, head, x, mask, labels, pos, layers: tuple[int, ...] = ()):
    """Answer logits and targets, then the output (B, L, D) of each of ``layers``."""
    out = lm(
        inputs_embeds=x,
        attention_mask=mask,
        position_ids=pos,
        use_cache=False,
        output_hidden_states=bool(layers),
    )
    h = out.last_hidden_state
    logits, target = head(h[labels != -100]), labels[labels != -100]
    return (logits, target, *(out.hidden_states[k] for k in layers))


# ---- the lookup term: each described object's whereabouts and attributes at its phrase ---------

LOOKUP_OUT = 2 + len(scenes.COLOURS) + len(scenes.SHAPES)  # row, column, colour, shape
_COLOURS = list(scenes.COLOURS)  # the probe's colour classes, in the benchmark's order


def _questions(rows, qas, n_prefix: int):
    """``(row, where the question starts, its suffix's length, image index, QA)`` for each
    question of :func:`packed_batch` rows (an :func:`lm_batch` row is the packed row of its
    one question) and each row's questions ``qas``."""
    for r, ((i, kept, qs), row_qas) in enumerate(zip(rows, qas, strict=True)):
        s = n_prefix + len(kept)  # where the row's first question starts
        for (suf, ans), qa in zip(qs, row_qas, strict=True):
            yield r, s, len(suf), i, qa
            s += len(suf) + len(ans)


def lookup_targets(rows, qas, images, n_prefix: int):
    """Where each described object is named in a batch and which object: ``(row, sequence
    index)`` pairs and the objects, at each one-object phrase's last word
    (:func:`scenes_qa.lookups`); rows and ``qas`` as for :func:`_questions`."""
    at, objs = [], []
    for r, s, _, i, qa in _questions(rows, qas, n_prefix):
        for w, o in scenes_qa.lookups(images[i], qa):
            at.append((r, s + w))
            objs.append(o)
    return at, objs


def readout_targets(rows, qas, images, n_prefix: int):
    """Where each spatial question's answer is predicted (its suffix's last token: ``(row,
    sequence index)``) and the two objects it names, in the question's order; rows and
    ``qas`` as for :func:`_questions`."""
    at, pairs = [], []
    for r, s, n_suf, i, qa in _questions(rows, qas, n_prefix):
        named = scenes_qa.lookups(images[i], qa) if qa.qtype == "spatial" else []
        if len(named) == 2:
            at.append((r, s + n_suf - 1))
            pairs.append((named[0][1], named[1][1]))
    return at, pairs


def count_targets(rows, qas, n_prefix: int):
    """Where each count question's answer is predicted (``(row, sequence index)``, as
    :func:`readout_targets`) and its count; rows and ``qas`` as for :func:`_questions`."""
    at, counts = [], []
    for r, s, n_suf, _, qa in _questions(rows, qas, n_prefix):
        if qa.qtype == "count":
            at.append((r, s + n_suf - 1))
            counts.append(scenes_qa.COUNT_WORDS.index(qa.answer))
    return at, counts


def count_loss(hidden, at, counts, probe) -> torch.Tensor:
    """At each ``at`` of ``hidden``, a linear ``probe`` (1 output) reads the count as a
    share of the largest, six (squared error x 10, the lookup's scale): the counted anchors
    gathered before the last layer names the number. With the lookup and readout terms
    alone, counting was the one type below 0.96 (0.72 on one seed of two; BENCHMARKS.md)."""
    if not at:
        return hidden.sum() * 0.0
    top = len(scenes_qa.COUNT_WORDS) - 1
    target = torch.tensor(counts, dtype=hidden.dtype).unsqueeze(1) / top
    return 10 * F.mse_loss(_probed(hidden, at, probe), target)


def _centres(objs, grid: int) -> torch.Tensor:
    """Each object's footprint centre (row, column) in [0, 1]: (len(objs), 2)."""
    return torch.tensor(
        [[fr + (fh - 1) / 2, fc + (fw - 1) / 2] for fc, fr, fw, fh in (o.footprint for o in objs)]
    ).reshape(-1, 2) / (grid - 1)


def _probed(hidden, at, probe) -> torch.Tensor:
    """``probe`` applied to ``hidden`` (B, L, D) at each ``(row, sequence index)`` of ``at``."""
    r, c = zip(*at, strict=True)
    return probe(hidden[list(r), list(c)])


def lookup_loss(hidden, at, objs, probe, grid: int) -> torch.Tensor:
    """At each ``at`` of ``hidden`` (an LM layer's output), a linear ``probe`` reads the named
    object's footprint centre (row, column in [0, 1]; squared error x 10, the alignment's
    weight) and its colour and shape (cross-entropy): the lookup a question's answer needs,
    asked for where the phrase is read. Without it the 2-layer LM left spatial questions at
    chance; a 3-layer one told to *attend* to the described objects still answered a constant,
    one also told to carry their centre answered 0.66-0.75 (BENCHMARKS.md)."""
    if not at:
        return hidden.sum() * 0.0
    out = _probed(hidden, at, probe)
    centre = _centres(objs, grid)
    colour = torch.tensor([_COLOURS.index(o.colour) for o in objs])
    shape = torch.tensor([scenes.SHAPES.index(o.shape) for o in objs])
    C = len(_COLOURS)
    return (
        10 * F.mse_loss(out[:, :2], centre)
        + F.cross_entropy(out[:, 2 : 2 + C], colour)
        + F.cross_entropy(out[:, 2 + C :], shape)
    )


def readout_loss(hidden, at, pairs, probe, grid: int) -> torch.Tensor:
    """At each ``at`` of ``hidden``, a linear ``probe`` (4 outputs) reads both objects of the
    pair's centres (A's row and column, then B's; 10 x squared error, as the lookup's): a
    spatial answer's comparison with its operands gathered. With the lookup term alone the
    2-layer LM left left-of / above at chance on 2 seeds of 3 (BENCHMARKS.md)."""
    if not at:
        return hidden.sum() * 0.0
    both = torch.cat(
        [_centres([a for a, _ in pairs], grid), _centres([b for _, b in pairs], grid)], 1
    )
    return 10 * F.mse_loss(_probed(hidden, at, probe), both)


@torch.no_grad()
def val_accuracy(lm, head, embed, prefix, val, feats, batch: int = 128) -> dict[str, float]:
    """Per question type: is the (one-token) answer the argmax, with every token fed."""
    lm.eval()
    n = feats.shape[1]
    ok: list[bool] = []
    for s in range(0, len(val), batch):
        chunk = val[s : s + batch]
        rows = [(i, torch.arange(n), q) for i, q, _ in chunk]
        logits, target = _forward(lm, head, *lm_batch(rows, prefix, feats, embed))
        first = [0]
        for _, _, (_, a) in rows[:-1]:
            first.append(first[-1] + len(a))
        ok += (logits[first].argmax(-1) == target[first]).tolist()
    lm.train()
    types = [t for *_, t in val]
    return {
        t: sum(o for o, tt in zip(ok, types, strict=True) if tt == t) / types.count(t)
        for t in sorted(set(types))
    }


def _kept(scene: scenes.Scene, qas, rng: random.Random, n: int, mode: str) -> torch.Tensor:
    """The visible tokens of a row asking ``qas`` (one question, or a packed row's several).
    ``full``: all; ``subset``: the anchors of the objects any answer needs and each other
    token with probability U(0, 1); ``curriculum`` (learn to find first) and ``sparse`` (a
    compressor's rows): every patch an answer needs and each other token with probability
    U(0, 0.2)."""
    if mode == "full":
        return torch.arange(n)
    rel = {p for qa in qas for p in qa.relevant}
    if mode in ("curriculum", "sparse"):
        must, p_keep = rel, rng.uniform(0.0, 0.2)
    else:
        must = {min(o.patches) for o in scene.objects if o.patches and rel & set(o.patches)}
        p_keep = rng.random()
    keep = [i for i in range(n) if i in must or rng.random() < p_keep]
    return torch.tensor(keep, dtype=torch.long)


def row_mode(step: int, params: MLLMParams) -> str:
    """Which rows training step ``step`` sees: ``curriculum`` for the first
    ``curriculum_steps``, then odd steps ``full`` and even ones ``subset``, a
    ``sparse_share`` of those ``sparse`` (spread evenly, drawing nothing from the RNG, so a
    recipe without sparse rows trains as before)."""
    if step < params.curriculum_steps:
        return "curriculum"
    if step % 2:
        return "full"
    j = step // 2  # the even steps' count: sparse where j * share crosses an integer
    return (
        "sparse" if int((j + 1) * params.sparse_share) > int(j * params.sparse_share) else "subset"
    )


def ask(scene: scenes.Scene, rng: random.Random, weights: dict[str, float]):
    """A fresh question on ``scene``, its type drawn by ``weights`` (type -> weight)."""
    qtype = rng.choices(list(weights), weights=list(weights.values()))[0]
    return scenes_qa.make_question(scene, rng, qtype)


def packed_rows(images, rng: random.Random, weights, n: int, rows: int, pack: int, mode, questions):
    """``rows`` packed rows for :func:`packed_batch` (a random image of ``images`` (scenes),
    the tokens its questions keep (:func:`_kept` over all of them), ``pack`` questions on it)
    and each row's questions (QA)."""
    out, asked = [], []
    for _ in range(rows):
        i = rng.randrange(len(images))
        qas = [ask(images[i], rng, weights) for _ in range(pack)]
        out.append((i, _kept(images[i], qas, rng, n, mode), [questions(qa) for qa in qas]))
        asked.append(qas)
    return out, asked


def train_lm(model, tokenizer, data, feats, val_data, val_feats, params: MLLMParams, log) -> dict:
    """Stage 2: the LM (its embeddings frozen) on cached tokens; see the module docstring."""
    lm, head = model.model.language_model, model.lm_head
    embed = model.get_input_embeddings()
    trainable = lm_trainable(model, params.qk_tied_init)
    # the lookup term's probe, thrown away after training (none when off: no draw from
    # torch's RNG, so a recipe without it trains as before)
    probe = (
        torch.nn.Linear(embed.weight.shape[1], LOOKUP_OUT) if params.lookup_supervision else None
    )
    # the readout term's probe, on the layer after the lookup's (created after the lookup's,
    # so a recipe without it draws as before)
    reader = torch.nn.Linear(embed.weight.shape[1], 4) if params.readout_supervision else None
    # the count term's probe, on the lookup's layer (created last, for the same reason)
    counter = torch.nn.Linear(embed.weight.shape[1], 1) if params.count_supervision else None
    trainable += [p for m in (probe, reader, counter) if m is not None for p in m.parameters()]
    looked_at, read_at = params.lookup_layer, params.lookup_layer + 1
    wanted = {looked_at: probe if probe is not None else counter, read_at: reader}
    layers = tuple(k for k, m in wanted.items() if m is not None)
    opt = torch.optim.AdamW(trainable, lr=params.lm_lr, weight_decay=0.01)
    rng, vrng = random.Random(params.seed), random.Random(params.seed + 1)
    questions = Questions(tokenizer)
    qtypes = scenes_qa.QTYPES
    val = []
    for i, (_, sc) in enumerate(val_data):
        qa = scenes_qa.make_question(sc, vrng, qtypes[i % len(qtypes)])
        val.append((i, questions(qa), qa.qtype))
    n, pack = feats.shape[1], params.lm_pack
    images = [sc for _, sc in data]
    weights = dict.fromkeys(qtypes, 1.0)
    acc: dict[str, float] = {}
    lm.train()
    # the training steps' LM, compiled or not (the held-out checks run it as is). Packed rows
    # vary in length from step to step: dynamic shapes, one compilation for all of them
    step_lm = torch.compile(lm, dynamic=True) if params.compile else lm
    t0 = time.time()
    for step in range(params.lm_steps):
        for g in opt.param_groups:
            g["lr"] = params.lm_lr * lr_factor(step, params.lm_steps, 50)
        mode = row_mode(step, params)
        # batch_size images, pack questions each (curriculum and sparse rows: one question a
        # row, so each row holds only its own answer's patches)
        if pack > 1 and mode not in ("curriculum", "sparse"):
            rows, qas = packed_rows(
                images, rng, weights, n, params.batch_size, pack, mode, questions
            )
            batch = packed_batch(rows, questions.prefix, feats, embed)
        else:  # as many answers a step, one question per row
            rows, qas = [], []
            for _ in range(params.batch_size * pack):
                i = rng.randrange(len(images))
                qas.append([ask(images[i], rng, weights)])
                rows.append((i, _kept(images[i], qas[-1], rng, n, mode), [questions(qas[-1][0])]))
            batch = lm_batch([(i, k, q) for i, k, (q,) in rows], questions.prefix, feats, embed)
        logits, target, *out = _forward(step_lm, head, *batch, layers=layers)
        hidden = dict(zip(layers, out, strict=True))
        loss = F.cross_entropy(logits, target)
        if probe is not None:
            at, objs = lookup_targets(rows, qas, images, len(questions.prefix))
            looked = lookup_loss(hidden[looked_at], at, objs, probe, images[0].grid)
            loss = loss + params.lookup_supervision * looked
        if reader is not None:
            at, pairs = readout_targets(rows, qas, images, len(questions.prefix))
            read = readout_loss(hidden[read_at], at, pairs, reader, images[0].grid)
            loss = loss + params.readout_supervision * read
        if counter is not None:
            at, counts = count_targets(rows, qas, len(questions.prefix))
            counted = count_loss(hidden[looked_at], at, counts, counter)
            loss = loss + params.count_supervision * counted
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % params.eval_every == 0 and step + 1 < params.lm_steps:
            acc = val_accuracy(lm, head, embed, questions.prefix, val, val_feats)
            weights = {t: 0.1 + 1.0 - acc.get(t, 0.0) for t in qtypes}
            log(
                f"lm step {step + 1}: loss {loss.item():.4f}"
                + ("" if probe is None else f" (lookup term {looked.item():.4f})")
                + ("" if reader is None else f" (readout term {read.item():.4f})")
                + ("" if counter is None else f" (count term {counted.item():.4f})")
                + ", held-out "
                + " ".join(f"{t} {a:.3f}" for t, a in acc.items())
                + f" ({time.time() - t0:.0f} s)"
            )
    acc = val_accuracy(lm, head, embed, questions.prefix, val, val_feats)
    log(
        f"lm done after {params.lm_steps} steps ({time.time() - t0:.0f} s): held-out "
        + " ".join(f"{t} {a:.3f}" for t, a in acc.items())
    )
    lm.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": params.lm_steps, "held_out": acc}
