"""The reference MLLM: a tiny LLaVA trained on shapes-vqa, saved as an HF checkpoint.

Built from the real ``transformers`` classes (CLIP vision tower, LLaVA projector,
Llama LM) and a word-level tokenizer made offline, so it loads exactly like a
downloaded llava-hf checkpoint (model + processor + chat template).

Recipe (after the probe in ../shared/FACTS.md; end-to-end training from scratch
failed there):

1. *Alignment* (vision tower + projector): each projected patch token's logits
   over the vocabulary are its cosine to the (frozen, random) word embeddings
   / 0.1, trained towards ``background`` for an empty patch and 0.5 colour word
   + 0.5 shape word for an object's patch, plus a norm-matching term. Every
   visual token's nearest vocabulary word is then meaningful, which is what the
   labeling engine's semantic grouping needs.
2. *LM* (vision, projector and embeddings frozen; projected tokens cached): a
   fresh question per image per step; on half the rows each question-irrelevant
   visual token is dropped (attention mask 0) with probability U(0, drop_max), so
   the model answers from the tokens that matter and tolerates pruned inputs.
   Position ids are always the original ones (see ``sequence.py``).

    evocomp mllm train --out models/mllm
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from evocomp import shapes
from evocomp.config import MLLMParams
from evocomp.mllm.sequence import DEFAULT_TEMPLATE, encode_prompt

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIALS, *shapes.WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=shapes.CELL,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    n_tok = shapes.GRID * shapes.GRID
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=shapes.IMAGE_SIZE, patch_size=shapes.CELL, hidden_size=128, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=128,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=n_tok,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config).eval()


def pixels(images: list) -> torch.Tensor:
    """CLIPImageProcessor's result for 96-px RGB images (mean = std = 0.5), without its overhead."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def _schedule(step: int, total: int, warmup: int, floor: float = 0.05) -> float:  # alignment stage
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _visual(model, px: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values=px)
    return torch.stack(list(out.pooler_output))  # (B, N, D)


def align(model, tokenizer, scenes, params: MLLMParams, log: Callable[[str], None]) -> None:
    """Stage 1: train vision tower + projector so patch tokens sit on their words."""
    emb = model.get_input_embeddings().weight.detach()  # (V, D)
    word_dir = F.normalize(emb, dim=-1)
    norm = emb.norm(dim=-1).mean()
    ids = tokenizer.convert_tokens_to_ids
    bg = ids("background")
    n_tok = shapes.GRID * shapes.GRID
    targets = torch.zeros(len(scenes), n_tok, emb.shape[0])
    targets[:, :, bg] = 1.0
    for i, (_, objs) in enumerate(scenes):
        for o in objs:
            targets[i, o.cell] = 0
            targets[i, o.cell, ids(o.colour)] = 0.5
            targets[i, o.cell, ids(o.shape)] = 0.5
    trainable = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    opt = torch.optim.AdamW(trainable, lr=params.align_lr, weight_decay=0.0)
    rng = np.random.default_rng(params.seed)
    model.train()
    for step in range(params.align_steps):
        for g in opt.param_groups:
            g["lr"] = params.align_lr * _schedule(step, params.align_steps, 30)
        b = rng.choice(len(scenes), size=params.batch_size, replace=False)
        v = _visual(model, pixels([scenes[i][0] for i in b]))  # (B, N, D)
        logits = F.normalize(v, dim=-1) @ word_dir.T / 0.1
        ce = -(targets[b] * logits.log_softmax(-1)).sum(-1).mean()
        loss = ce + ((v.norm(dim=-1) - norm) ** 2).mean() / norm**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == params.align_steps - 1:
            log(f"align step {step}: loss {loss.item():.3f}")
    model.eval()


def _batch(rows, feats: torch.Tensor, embed, keep_masks=None):
    """Right-padded LM inputs for rows of (image index, prefix, suffix, answer+EOS ids)."""
    n_vis, D = feats.shape[1], feats.shape[2]
    L = max(len(pre) + n_vis + len(suf) + len(ans) for _, pre, suf, ans in rows)
    B = len(rows)
    x = torch.zeros(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for r, (i, pre, suf, ans) in enumerate(rows):
        text = embed(torch.tensor(pre + suf + ans))
        n_pre = len(pre)
        n = n_pre + n_vis + len(suf) + len(ans)
        x[r, :n_pre] = text[:n_pre]
        x[r, n_pre:n_pre + n_vis] = feats[i]
        x[r, n_pre + n_vis:n] = text[n_pre:]
        mask[r, :n] = 1
        if keep_masks is not None:
            mask[r, n_pre:n_pre + n_vis] = keep_masks[r]
        labels[r, n - len(ans) - 1:n - 1] = torch.tensor(ans)  # predicted from the previous position
    return x, mask, labels, torch.arange(L).expand(B, L)


class _Questions:
    """Prompt ids per (question, answer), cached (the vocabulary of questions is small)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, qa) -> tuple[list[int], list[int], list[int]]:
        key = (qa.question, qa.answer)
        if key not in self.cache:
            p = encode_prompt(self.tokenizer, qa.question, qa.answer, DEFAULT_TEMPLATE)
            self.cache[key] = (p.prefix, p.suffix, [*p.answer, self.tokenizer.eos_token_id])
        return self.cache[key]


@torch.no_grad()
def _val_accuracy(lm, head, embed, val, feats) -> dict[str, float]:
    """Per question type: is the first answer token the argmax (== greedy answer for one-word answers)."""
    lm.eval()
    rows, types = [r for r, _ in val], [t for _, t in val]
    x, mask, labels, pos = _batch(rows, feats, embed)
    h = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    first = (labels != -100).int().argmax(1)
    pred = head(h[torch.arange(len(rows)), first]).argmax(-1)
    ok = (pred == labels[torch.arange(len(rows)), first]).tolist()
    lm.train()
    return {t: sum(o for o, tt in zip(ok, types, strict=True) if tt == t) / types.count(t) for t in set(types)}


def train_lm(model, tokenizer, scenes, feats: torch.Tensor, val_scenes, val_feats: torch.Tensor,
             params: MLLMParams, log: Callable[[str], None]) -> dict:
    """Stage 2: train the LM on cached visual tokens with question-aware token dropout.

    Warmup-stable-decay: a constant learning rate until every question type of a held-out
    set reaches ``target_acc`` (or the step budget nears its end), then ``decay_steps`` of
    linear decay. Seeds that learn slowly thus train longer, fast ones stop early; question
    types are drawn in proportion to their held-out error (plus a floor), so the weakest
    type gets the most practice.
    """
    lm, head = model.model.language_model, model.lm_head
    embed = model.get_input_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in lm.named_parameters() if "embed_tokens" not in n] + list(head.parameters())
    for p in trainable:
        p.requires_grad_(True)
    if params.qk_tied_init:
        # Start every head with W_k = W_q, so q.k ~ e_q^T W^T W e_k ~ <e_q, e_k>: attention
        # already favours visual tokens that share the question word's embedding.
        with torch.no_grad():
            for layer in lm.layers:
                att = layer.self_attn
                if att.k_proj.weight.shape == att.q_proj.weight.shape:
                    att.k_proj.weight.copy_(att.q_proj.weight)
    opt = torch.optim.AdamW(trainable, lr=params.lm_lr, weight_decay=0.01)
    rng = random.Random(params.seed)
    prompts = _Questions(tokenizer)
    vrng = random.Random(params.seed + 1)
    val = [((i, *prompts(qa)), qa.qtype) for i, (_, objs) in enumerate(val_scenes)
           for qa in [shapes.make_question(objs, vrng, shapes.QTYPES[i % len(shapes.QTYPES)])]]
    n_vis = feats.shape[1]
    weights = dict.fromkeys(shapes.QTYPES, 1.0)
    decay_from, acc, step = params.lm_steps - params.decay_steps, {}, 0
    lm.train()
    t0 = time.time()
    while step < decay_from + params.decay_steps:
        if step < 50:
            lr = params.lm_lr * (step + 1) / 50
        elif step < decay_from:
            lr = params.lm_lr
        else:
            lr = params.lm_lr * max(0.05, 1 - (step - decay_from) / params.decay_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        rows, keep_masks = [], []
        types = rng.choices(list(weights), weights=list(weights.values()), k=params.batch_size)
        for qtype in types:
            i = rng.randrange(len(scenes))
            qa = shapes.make_question(scenes[i][1], rng, qtype)
            keep = torch.ones(n_vis, dtype=torch.long)
            # Curriculum: early on, most distractors are dropped, so "find the token the
            # question names" is learned before the full 36-token search.
            early = step < params.curriculum_steps
            if early or rng.random() < 0.5:
                p_drop = rng.uniform(0.5, 0.95) if early else rng.uniform(0.0, params.drop_max)
                drop = torch.rand(n_vis, generator=torch.Generator().manual_seed(rng.randrange(2**31))) < p_drop
                drop[list(qa.relevant)] = False
                keep[drop] = 0
            rows.append((i, *prompts(qa)))
            keep_masks.append(keep)
        x, mask, labels, pos = _batch(rows, feats, embed, keep_masks)
        hidden = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        sel = labels != -100
        loss = F.cross_entropy(head(hidden[sel]), labels[sel])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        if step % params.eval_every == 0 and step < decay_from:
            acc = _val_accuracy(lm, head, embed, val, val_feats)
            weights = {t: 0.1 + 1.0 - acc.get(t, 0.0) for t in shapes.QTYPES}
            log(f"lm step {step}: loss {loss.item():.4f}, held-out " +
                " ".join(f"{t} {a:.3f}" for t, a in sorted(acc.items())) + f" ({time.time() - t0:.0f} s)")
            if min(acc.values()) >= params.target_acc and step >= params.curriculum_steps:
                decay_from = step  # good enough: anneal and stop
    acc = _val_accuracy(lm, head, embed, val, val_feats)
    log(f"lm done after {step} steps ({time.time() - t0:.0f} s): held-out " +
        " ".join(f"{t} {a:.3f}" for t, a in sorted(acc.items())))
    lm.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "held_out": acc}


def train_reference(out: str | Path, params: MLLMParams, log: Callable[[str], None] = print) -> Path:
    """Train the reference model with ``params`` and save it to ``out`` in HF format."""
    torch.set_num_threads(params.threads)
    t0 = time.time()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, params.seed)
    rng = random.Random(params.seed)
    objs = [shapes.make_scene(rng) for _ in range(params.n_images + params.val_images)]
    scenes = [(shapes.render(o), o) for o in objs]
    scenes, val_scenes = scenes[:params.n_images], scenes[params.n_images:]
    log(f"built model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {len(scenes)} images")
    align(model, tokenizer, scenes, params, log)
    with torch.no_grad():
        feats, val_feats = (torch.cat([_visual(model, pixels([s[0] for s in sc[i:i + 256]]))
                                       for i in range(0, len(sc), 256)]) for sc in (scenes, val_scenes))
    log(f"alignment done in {time.time() - t0:.0f} s; training the LM")
    report = train_lm(model, tokenizer, scenes, feats, val_scenes, val_feats, params, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.evocomp = {"recipe": params.model_dump(), "prompt_template": DEFAULT_TEMPLATE,
                            "lm_steps_run": report["steps"], "held_out_accuracy": report["held_out"],
                            "train_seconds": round(time.time() - t0, 1)}
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    log(f"saved reference model to {out} ({time.time() - t0:.0f} s in all)")
    return out
