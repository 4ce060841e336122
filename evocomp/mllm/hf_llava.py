"""HF LLaVA-family backend: any local ``LlavaForConditionalGeneration`` checkpoint.

Loads the reference model and real checkpoints (llava-1.5-7b-hf,
llava-interleave-qwen-0.5b-hf, ...) from a directory, never from a hub. The
LLM is driven through ``inputs_embeds`` so any subset of visual tokens can be
fed; attention runs as SDPA except for the two calls that need its weights
(FastV and VisionZip scores), which switch to eager for that call only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from evocomp.errors import ModelError
from evocomp.mllm.decoding import greedy
from evocomp.mllm.sequence import DEFAULT_TEMPLATE, Prompt, encode_prompt, left_pad, positions
from evocomp.tokens import grid_shape

SUPPORTED = ("llava",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


WEIGHT_FILES = ("*.safetensors", "*.bin")


def check_checkpoint(path: str | Path) -> dict:
    """The checkpoint's config.json, after checking it is a usable LLaVA checkpoint folder.

    Raises:
        ModelError: no config.json, an unreadable one, another family, or no weight files.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model checkpoint directory (no config.json)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path / 'config.json'}: not a readable model config ({err})") from None
    if cfg.get("model_type") not in SUPPORTED:
        raise ModelError(
            f"{path}: model_type {cfg.get('model_type')!r} is not a LLaVA model (supported: {SUPPORTED})"
        )
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelError(
            f"{path}: config.json but no weights (*.safetensors or *.bin): an incomplete copy?"
        )
    return cfg


def checkpoint_id(path: Path) -> str:
    """Content id of a checkpoint: config + a fingerprint of each weight file (size, head, tail)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in [f for pattern in WEIGHT_FILES for f in sorted(path.glob(pattern))]:
        size = f.stat().st_size
        h.update(f.name.encode() + str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return f"{path.name}-{h.hexdigest()[:12]}"


class HFLlava:
    """The MLLM protocol over a local HF LLaVA checkpoint directory."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        template: str | None = None,
    ):
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        path = Path(path)
        check_checkpoint(path)
        config = AutoConfig.from_pretrained(path)
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        self.path, self.device, self.dtype = path, torch.device(device), DTYPES[dtype]
        self.model = (
            LlavaForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
            .to(self.device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        extra = getattr(config, "evocomp", None) or {}
        self.template = template or extra.get("prompt_template") or DEFAULT_TEMPLATE
        self.model_id = checkpoint_id(path)
        self.lm = self.model.model.language_model
        self.embed = self.model.get_input_embeddings()
        self.hidden_size = config.text_config.hidden_size
        self.n_layers = config.text_config.num_hidden_layers
        self.n_tokens = int(config.image_seq_length)
        self.grid = grid_shape(self.n_tokens)
        self._lock = threading.Lock()

    # ---- visual side -------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        px = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    @torch.no_grad()
    def visual_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=self.pixel_values(images))
        feats = torch.stack(list(out.pooler_output)).float().cpu()  # (B, N, D)
        if feats.shape[1] != self.n_tokens:
            raise ModelError(
                f"{self.path}: the vision tower gave {feats.shape[1]} tokens per image, "
                f"config.image_seq_length says {self.n_tokens}"
            )
        return feats

    def vocab_embeddings(self) -> torch.Tensor:
        return self.embed.weight.detach().float().cpu()

    @torch.no_grad()
    def cls_attention(self, images: list[Image.Image]) -> torch.Tensor:
        cfg = self.model.config
        layer = (
            cfg.vision_feature_layer
            if isinstance(cfg.vision_feature_layer, int)
            else cfg.vision_feature_layer[-1]
        )
        with self._eager():
            out = self.model.model.vision_tower(self.pixel_values(images), output_attentions=True)
        attn = out.attentions[layer].float().sum(1)  # (B, S, S), summed over heads
        if cfg.vision_feature_select_strategy == "default":
            return attn[:, 0, 1:].cpu()  # CLS row, patch columns
        return attn.mean(1).cpu()  # no CLS (e.g. SigLIP): attention each token receives

    # ---- text side ---------------------------------------------------------------------------
    def encode(self, question: str, answer: str = "") -> Prompt:
        return encode_prompt(self.tokenizer, question, answer, self.template)

    @torch.no_grad()
    def question_embeddings(self, question: str) -> torch.Tensor:
        ids = self.tokenizer(question.strip(), add_special_tokens=False)["input_ids"]
        return self.embed(torch.tensor(ids, device=self.device)).float().cpu()

    def check_visual(self, visual: torch.Tensor) -> None:
        if visual.ndim != 2 or visual.shape != (self.n_tokens, self.hidden_size):
            raise ModelError(
                f"visual tokens of shape {tuple(visual.shape)} do not fit {self.path} "
                f"(expects ({self.n_tokens}, {self.hidden_size})); features from another model?"
            )

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))

    @contextmanager
    def _eager(self):
        with self._lock:
            self.model.set_attn_implementation("eager")
            try:
                yield
            finally:
                self.model.set_attn_implementation("sdpa")

    # ---- LLM ---------------------------------------------------------------------------------
    @torch.no_grad()
    def subset_loss(
        self, prompt: Prompt, visual: torch.Tensor, kept: torch.Tensor, max_rows: int = 64
    ) -> torch.Tensor:
        """Mean answer cross-entropy per row of ``kept (P, k)``; rows share one forward (chunked by max_rows)."""
        self.check_visual(visual)
        if not prompt.answer:
            raise ValueError("subset_loss needs a non-empty answer")
        vis = visual.to(self.device, self.dtype)
        kept = kept.to(self.device)
        pre, tail = self._ids(prompt.prefix), self._ids(prompt.suffix + prompt.answer)
        ans = torch.tensor(prompt.answer, device=self.device)
        n_ans = len(prompt.answer)
        losses = []
        for rows in kept.split(max_rows):
            P, k = rows.shape
            x = torch.cat(
                [pre.expand(P, -1, -1), vis[rows], tail.expand(P, -1, -1)], dim=1
            )  # (P, L, D)
            pos = positions(len(prompt.prefix), self.n_tokens, rows, tail.shape[0])
            # An explicit mask: with none, transformers reads the gaps in our position ids as
            # packed-sequence boundaries and walls the answer off from the visual tokens.
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=self.device)
            h = self.lm(
                inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False
            ).last_hidden_state
            logits = self.model.lm_head(h[:, -n_ans - 1 : -1]).float()  # (P, n_ans, V)
            ce = F.cross_entropy(logits.transpose(1, 2), ans.expand(P, -1), reduction="none")
            losses.append(ce.mean(1))
        return torch.cat(losses).cpu()

    def _prompt_rows(self, questions, visual, kept, vis_pos=None):
        rows, pos = [], []
        for i, q in enumerate(questions):
            p = self.encode(q)
            v = visual[i].to(self.device, self.dtype)
            idx = kept[i] if kept[i] is not None else torch.arange(v.shape[0])
            idx = idx.to(self.device)
            if vis_pos is None:  # visual rows are the full N tokens, select them
                self.check_visual(visual[i])
                v = v[idx]
            p_ids = positions(
                len(p.prefix),
                self.n_tokens,
                (idx if vis_pos is None else vis_pos[i].to(self.device))[None],
                len(p.suffix),
            )[0]
            rows.append(torch.cat([self._ids(p.prefix), v, self._ids(p.suffix)]))
            pos.append(p_ids)
        return left_pad(rows, pos)

    def _hidden_pruned(self, x, mask, pos, survive, layer: int) -> torch.Tensor:
        """Last-position hidden states ``(B, D)``: all tokens for ``layer`` layers, then only ``survive``.

        The paper's pruning at LLM layer l (l=2): the first l layers see every visual token,
        the dropped ones' hidden states are removed before layer l.
        """
        from transformers.masking_utils import create_causal_mask

        lm = self.lm

        def prep(h, m, p):
            cm = create_causal_mask(
                config=lm.config, inputs_embeds=h, attention_mask=m, cache=None, position_ids=p
            )
            return cm, lm.rotary_emb(h, position_ids=p)

        h = x
        cm, pe = prep(h, mask, pos)
        for i, block in enumerate(lm.layers[: lm.config.num_hidden_layers]):
            if i == layer:
                keep = [survive[b] & mask[b].bool() for b in range(h.shape[0])]
                h, mask, pos = left_pad(
                    [h[b][keep[b]] for b in range(h.shape[0])],
                    [pos[b][keep[b]] for b in range(h.shape[0])],
                )
                cm, pe = prep(h, mask, pos)
            h = block(h, attention_mask=cm, position_embeddings=pe, position_ids=pos)
        return lm.norm(h)[:, -1]

    @torch.no_grad()
    def generate(
        self,
        questions: list[str],
        visual: list[torch.Tensor],
        kept: list[torch.Tensor | None],
        max_new_tokens: int = 8,
        vis_pos: list[torch.Tensor] | None = None,
        prune_layer: int = 0,
    ) -> list[str]:
        """Greedy decoding; with ``vis_pos`` the ``visual[i]`` rows are ready-made tokens at those positions.

        ``prune_layer`` l > 0 feeds all N tokens to the first l LLM layers and drops the
        unkept visual hidden states after them (no KV cache on this path: one full
        forward per generated token).
        """
        if prune_layer > 0:
            return self._generate_pruned(questions, visual, kept, max_new_tokens, prune_layer)
        x, mask, pos = self._prompt_rows(questions, visual, kept, vis_pos)
        B, state = x.shape[0], {"cache": None, "x": x, "mask": mask, "pos": pos}

        def step(prev: torch.Tensor | None) -> torch.Tensor:
            if prev is not None:  # feed the chosen tokens after the cached sequence
                state["x"] = self.embed(prev.to(self.device))[:, None]
                one = torch.ones(B, 1, dtype=state["mask"].dtype, device=self.device)
                state["mask"] = torch.cat([state["mask"], one], dim=1)
                state["pos"] = state["pos"][:, -1:] + 1
            res = self.lm(
                inputs_embeds=state["x"],
                attention_mask=state["mask"],
                position_ids=state["pos"],
                cache=state["cache"],
                use_cache=True,
            )
            state["cache"] = res.cache if hasattr(res, "cache") else res.past_key_values
            return self.model.lm_head(res.last_hidden_state[:, -1])

        return self._decode(greedy(step, B, max_new_tokens, self.tokenizer.eos_token_id))

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids.tolist()]

    def _generate_pruned(
        self, questions, visual, kept, max_new_tokens: int, layer: int
    ) -> list[str]:
        if not 0 < layer < self.n_layers:
            raise ValueError(
                f"prune layer {layer} must be in 1..{self.n_layers - 1} for {self.path}"
            )
        x, mask, pos = self._prompt_rows(questions, visual, [None] * len(questions))
        survive = torch.ones_like(mask, dtype=torch.bool)
        for b, (q, k) in enumerate(zip(questions, kept, strict=True)):
            if k is not None:
                start = mask.shape[1] - int(mask[b].sum()) + len(self.encode(q).prefix)
                vis = torch.zeros(self.n_tokens, dtype=torch.bool)
                vis[k] = True
                survive[b, start : start + self.n_tokens] = vis.to(survive.device)
        B, state = x.shape[0], {"x": x, "mask": mask, "pos": pos, "survive": survive}

        def step(prev: torch.Tensor | None) -> torch.Tensor:
            # No KV cache on this path: the whole sequence goes through every layer again.
            if prev is not None:
                one = torch.ones(B, 1, dtype=mask.dtype, device=mask.device)
                state["x"] = torch.cat([state["x"], self.embed(prev.to(self.device))[:, None]], 1)
                state["mask"] = torch.cat([state["mask"], one], 1)
                state["pos"] = torch.cat([state["pos"], state["pos"][:, -1:] + 1], 1)
                state["survive"] = torch.cat([state["survive"], one.bool()], 1)
            h = self._hidden_pruned(
                state["x"], state["mask"], state["pos"], state["survive"], layer
            )
            return self.model.lm_head(h)

        return self._decode(greedy(step, B, max_new_tokens, self.tokenizer.eos_token_id))

    @torch.no_grad()
    def text_attention(self, prompt: Prompt, visual: torch.Tensor, layer: int = 2) -> torch.Tensor:
        self.check_visual(visual)
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} outside 1..{self.n_layers}")
        x = torch.cat(
            [self._ids(prompt.prefix), visual.to(self.device, self.dtype), self._ids(prompt.suffix)]
        )[None]
        with self._eager():
            res = self.lm(inputs_embeds=x, output_attentions=True, use_cache=False)
        a = res.attentions[layer - 1][0].float().mean(0)  # (L, L), mean over heads
        start = len(prompt.prefix)
        return a[-1, start : start + self.n_tokens].cpu()


def checkpoint_info(path: str | Path) -> dict:
    """What the pipeline needs to know of a checkpoint without loading its weights."""
    path = Path(path)
    cfg = check_checkpoint(path)
    n = int(cfg["image_seq_length"])
    text = cfg.get("text_config", {})
    return {
        "model_id": checkpoint_id(path),
        "n_tokens": n,
        "grid": grid_shape(n),
        "hidden_size": text.get("hidden_size"),
        "heads": text.get("num_attention_heads"),
        "ffn": text.get("intermediate_size"),
        "layers": text.get("num_hidden_layers"),
    }
