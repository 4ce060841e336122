"""The LLM side every HF adapter shares: prompts, subset losses, generation, FastV scores.

A family adapter (:mod:`.hf_llava`, :mod:`.hf_qwen_vl`, :mod:`.hf_gemma3`) loads its model
and says how its images become visual tokens, where each token sits
(:meth:`HFAdapter.layout`: the full sequence's position ids, 1-D for LLaVA, ``(3, L)`` M-RoPE
for Qwen) and how the LLM attends (:meth:`HFAdapter.llm_mask`: causal, or Gemma 3's
bidirectional image block over the kept tokens). Everything else —
``[prefix][kept tokens][suffix][answer]`` through ``inputs_embeds``, each kept token at its
original position, one batched forward per population, greedy decoding with a KV cache,
pruning after LLM layer l (:mod:`.hf_pruning`) — lives here once; where the image's
tokens sit, the always-fed ones and per-token extras are :mod:`.hf_block`. Attention runs as
SDPA except for the calls that need its weights, which switch to eager for that call only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from evocomp.errors import ModelError
from evocomp.mllm.base import ImageTokens
from evocomp.mllm.checkpoint import DTYPES, check_checkpoint, checkpoint_id
from evocomp.mllm.decoding import greedy
from evocomp.mllm.hf_block import ImageBlock
from evocomp.mllm.hf_pruning import PrunedDecoding
from evocomp.mllm.prompts import (  # noqa: F401 - image_token_id: re-exported
    image_placeholder,
    image_token_id,
    resolve_template,
)
from evocomp.mllm.sequence import (
    Prompt,
    encode_prompt,
    left_pad,
    left_pad_flags,
)
from evocomp.tokens import grid_positions


class HFAdapter(ImageBlock, PrunedDecoding):
    """The MLLM protocol over a local HF checkpoint; subclasses load one family."""

    family = ""  # config.json model_type this adapter runs
    model_class = ""  # its transformers class, loaded with AutoProcessor by the default load()
    n_tokens_key = ""  # the config key that fixes N (families with one N per model)

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        prompt_template: str | None = None,
    ):
        path = Path(path)
        cfg = check_checkpoint(path)
        if cfg["model_type"] != self.family:
            raise ModelError(
                f"{path}: a {cfg['model_type']} checkpoint, not {self.family}: load it with "
                "evocomp.mllm.loader.load_mllm"
            )
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        self.path, self.device, self.dtype = path, torch.device(device), DTYPES[dtype]
        self.model, self.tokenizer, self.processor = self.load(path)
        config = self.model.config
        self.prompt_override = prompt_template
        image_token, image_block = self.image_placeholder()
        self.template = resolve_template(
            path,
            self.family,
            getattr(config, "evocomp", None) or {},
            self.tokenizer,
            image_token,
            override=prompt_template,
            processor=self.processor,
            image_block=image_block,
        )
        self.model_id = checkpoint_id(path, prompt_template)
        self.lm = self.model.model.language_model
        self.embed = self.model.get_input_embeddings()
        self.hidden_size = config.text_config.hidden_size
        self.n_layers = config.text_config.num_hidden_layers
        self.n_tokens, self.grid = self.token_grid(path, cfg)
        self.n_extra = self.extra_layers()
        self._lock = threading.Lock()

    # ---- what a family provides ----------------------------------------------------------------
    def load(self, path: Path):
        """``(model, tokenizer, processor or None)``, the model on ``self.device`` in eval mode."""
        import transformers

        model = getattr(transformers, self.model_class).from_pretrained(path, dtype=self.dtype)
        processor = transformers.AutoProcessor.from_pretrained(path)
        return model.to(self.device).eval(), processor.tokenizer, processor

    def extra_layers(self) -> int:
        """E: per-token vectors a family adds to the visual tokens' hidden states after LLM
        layers 0..E-1 (Qwen3-VL's deepstack features); 0 for most families."""
        return 0

    def token_grid(self, path: Path, cfg: dict) -> tuple[int, tuple[int, int]]:
        """The model's visual tokens per image N and their grid (rows, cols)."""
        raise NotImplementedError

    def image_placeholder(self) -> tuple[str, str]:
        """What the chat template renders for the image, and the template text it stands for."""
        return image_placeholder(self.model.config, self.tokenizer)

    def llm_mask(self, x, mask, pos, image):
        """What the LLM takes as ``attention_mask`` for a prefill ``x (B, L, D)``.

        ``mask (B, L)`` marks real tokens (None: all), ``pos`` the 1-D position ids or None,
        ``image (B, L)`` the visual tokens fed. Causal attention needs only the padding mask;
        a family whose image block attends otherwise builds its masks here.
        """
        return mask

    def layer_inputs(self, h, mask, pos, image) -> list[tuple]:
        """``(attention mask, rotary embeddings)`` per decoder layer, for a forward by hand."""
        from transformers.masking_utils import create_causal_mask

        cm = create_causal_mask(
            config=self.lm.config,
            inputs_embeds=h,
            attention_mask=mask,
            cache=None,
            position_ids=self.text_positions(pos),
        )
        return [(cm, self.lm.rotary_emb(h, position_ids=pos))] * self.n_layers

    # ---- text side -------------------------------------------------------------------------------
    def encode(self, question: str, answer: str = "") -> Prompt:
        return encode_prompt(self.tokenizer, question, answer, self.template)

    @torch.no_grad()
    def question_embeddings(self, question: str) -> torch.Tensor:
        ids = self.tokenizer(question.strip(), add_special_tokens=False)["input_ids"]
        return self.embed(torch.tensor(ids, device=self.device)).float().cpu()

    def vocab_embeddings(self) -> torch.Tensor:
        return self.embed.weight.detach().float().cpu()

    # ---- visual side ---------------------------------------------------------------------------
    def image_tokens(self, images: list[Image.Image]) -> list[ImageTokens]:
        """A family with one grid per model: every image gives ``n_tokens`` on ``grid``."""
        layout = self.default_layout()
        cells = grid_positions(self.n_tokens, self.grid)
        return [ImageTokens(t, cells, layout) for t in self.visual_tokens(images)]

    @torch.no_grad()
    def visual_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, N, D)`` from the model's own ``get_image_features`` on :meth:`pixel_values`
        (a family with one N per model), checked against the config's N."""
        out = self.model.model.get_image_features(pixel_values=self.pixel_values(images))
        feats = torch.stack(list(out.pooler_output)).float().cpu()
        if feats.shape[1] != self.n_tokens:
            raise ModelError(
                f"{self.path}: the vision tower gave {feats.shape[1]} tokens per image, "
                f"config.{self.n_tokens_key} says {self.n_tokens}"
            )
        return feats

    def stacked_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, N, D)`` of :meth:`image_tokens` for images of one token count; a family whose
        N follows the image takes this as its ``visual_tokens``."""
        toks = [v.tokens for v in self.image_tokens(images)]
        if len({t.shape[0] for t in toks}) > 1:
            raise ModelError(
                f"these images give {sorted({t.shape[0] for t in toks})} visual tokens each on "
                f"{self.path}: use image_tokens() for images of different shapes"
            )
        return torch.stack(toks)

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
        self,
        prompt: Prompt,
        visual: torch.Tensor,
        kept: torch.Tensor,
        layout=None,
        extra=None,
        max_rows: int = 64,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean answer cross-entropy per row of ``kept (P, k)``; rows share one forward (chunked
        by max_rows). ``reference``: log-probabilities ``(n_ans, V)`` at the answer's positions
        (:meth:`answer_logprobs`): the mean KL divergence from them instead."""
        ans = torch.tensor(prompt.answer, device=self.device)
        losses = []
        for logits in self._answer_logits(prompt, visual, kept, layout, extra, max_rows):
            if reference is None:
                ce = F.cross_entropy(
                    logits.transpose(1, 2), ans.expand(len(logits), -1), reduction="none"
                )
                losses.append(ce.mean(1))
            else:
                ref = reference.to(self.device).expand_as(logits)
                kl = F.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none")
                losses.append(kl.sum(-1).mean(1).clamp_min(0.0))  # >= 0 up to float noise
        return torch.cat(losses).cpu()

    @torch.no_grad()
    def answer_logprobs(self, prompt: Prompt, visual: torch.Tensor, layout=None, extra=None):
        """Log-probabilities ``(n_ans, V)`` of the next token at each answer position, every
        visual token kept (teacher-forced on ``prompt.answer``)."""
        everything = torch.arange(visual.shape[0])[None]
        (logits,) = self._answer_logits(prompt, visual, everything, layout, extra, 1)
        return logits[0].log_softmax(-1).cpu()

    def _answer_logits(self, prompt, visual, kept, layout, extra, max_rows):
        """Logits ``(P', n_ans, V)`` at the answer's positions, one chunk of ``kept``'s rows at
        a time."""
        self.check_visual(visual, layout)
        if not prompt.answer:
            raise ValueError("subset_loss needs a non-empty answer")
        vis = self._visual(visual, extra)
        kept = kept.to(self.device)
        pre, tail = self._ids(prompt.prefix), self._ids(prompt.suffix + prompt.answer)
        n_ans = len(prompt.answer)
        for rows in kept.split(max_rows):
            emb, cols = self._block_rows(vis[rows], rows, layout)
            P, k = cols.shape
            x = torch.cat([pre.expand(P, -1, -1), emb, tail.expand(P, -1, -1)], dim=1)
            x, deep = self._split(x)  # (P, L, D), extras (P, L, E, D) or None
            pos = self._columns(len(prompt.prefix), cols, tail.shape[0], layout)  # (..., P, L)
            # An explicit mask: with none, transformers reads the gaps in our position ids as
            # packed-sequence boundaries and walls the answer off from the visual tokens.
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=self.device)
            image = torch.zeros(x.shape[:2], dtype=torch.bool, device=self.device)
            image[:, len(prompt.prefix) : len(prompt.prefix) + k] = True
            mask = self.llm_mask(x, mask, self.text_positions(pos), image)
            h = self.lm(
                inputs_embeds=x,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                **self._deep_kwargs(deep, image),
            ).last_hidden_state
            yield self.model.lm_head(h[:, -n_ans - 1 : -1]).float()  # (P, n_ans, V)

    def _prompt_rows(self, questions, visual, kept, vis_pos=None, layouts=None, extras=None):
        """``inputs_embeds (B, L, D)`` (+ extras as channels: :meth:`_split`), ``attention_mask
        (B, L)``, ``position_ids (..., B, L)`` and where the visual tokens are ``(B, L)``,
        left-padded. Ready-made rows (``vis_pos``) take the extras of the token they sit at."""
        rows, pos, image = [], [], []
        for i, q in enumerate(questions):
            p = self.encode(q)
            layout = layouts[i] if layouts is not None else None
            extra = extras[i] if extras is not None else None
            idx = kept[i] if kept[i] is not None else torch.arange(visual[i].shape[0])
            idx = idx.to(self.device)
            if vis_pos is None:  # visual rows are the full N tokens, select them
                self.check_visual(visual[i], layout)
                v = self._visual(visual[i], extra)
                emb, cols = self._block_rows(v[idx][None], idx[None], layout)
            else:  # ready-made rows (VisionZip's merged tokens) at these token positions
                at = vis_pos[i].to(self.device)
                v = self._visual(visual[i], None if extra is None else extra[:, at.cpu()])
                emb, cols = self._block_rows(v[None], at[None], layout)
            rows.append(torch.cat([self._ids(p.prefix), emb[0], self._ids(p.suffix)]))
            pos.append(self._columns(len(p.prefix), cols, len(p.suffix), layout)[..., 0, :])
            image.append(torch.zeros(rows[-1].shape[0], dtype=torch.bool, device=self.device))
            image[-1][len(p.prefix) : len(p.prefix) + cols.shape[1]] = True
        x, mask, pid = left_pad(rows, pos)
        return x, mask, pid, left_pad_flags(image, x.shape[1])

    @torch.no_grad()
    def generate(
        self,
        questions: list[str],
        visual: list[torch.Tensor],
        kept: list[torch.Tensor | None],
        max_new_tokens: int = 8,
        vis_pos: list[torch.Tensor] | None = None,
        prune_layer: int = 0,
        layouts: list | None = None,
        extras: list | None = None,
    ) -> list[str]:
        """Greedy decoding; with ``vis_pos`` the ``visual[i]`` rows are ready-made tokens at those positions.

        Decoding continues after the last prompt position (for M-RoPE: the rope delta of the
        full sequence, since kept tokens keep their places). ``prune_layer`` l > 0 feeds all
        N tokens to the first l LLM layers and drops the unkept visual hidden states after
        them (no KV cache on this path: one full forward per generated token).
        """
        if prune_layer > 0:
            return self._generate_pruned(
                questions, visual, kept, max_new_tokens, prune_layer, layouts, extras
            )
        x, mask, pos, image = self._prompt_rows(questions, visual, kept, vis_pos, layouts, extras)
        x, deep = self._split(x)
        B, state = x.shape[0], {"cache": None, "x": x, "mask": mask, "pos": pos}

        def step(prev: torch.Tensor | None) -> torch.Tensor:
            attn, more = state["mask"], {}
            if prev is None:  # the prefill: the mask of the prompt, image block included
                attn = self.llm_mask(x, attn, self.text_positions(pos), image)
                more = self._deep_kwargs(deep, image)
            else:  # feed the chosen tokens after the cached sequence
                state["x"] = self.embed(prev.to(self.device))[:, None]
                one = torch.ones(B, 1, dtype=state["mask"].dtype, device=self.device)
                attn = state["mask"] = torch.cat([state["mask"], one], dim=1)
                state["pos"] = state["pos"][..., -1:] + 1
            res = self.lm(
                inputs_embeds=state["x"],
                attention_mask=attn,
                position_ids=state["pos"],
                cache=state["cache"],
                use_cache=True,
                **more,
            )
            state["cache"] = res.cache if hasattr(res, "cache") else res.past_key_values
            return self.model.lm_head(res.last_hidden_state[:, -1])

        return self._decode(greedy(step, B, max_new_tokens, self.tokenizer.eos_token_id))

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids.tolist()]

    def text_attention(
        self, prompt: Prompt, visual: torch.Tensor, layer: int = 2, layout=None, extra=None
    ) -> torch.Tensor:
        """FastV score ``(N,)``: the last prompt token's attention to each visual token at ``layer``."""
        return self.prompt_attention(prompt, visual, layer, layout, extra)[-1]

    @torch.no_grad()
    def prompt_attention(
        self, prompt: Prompt, visual: torch.Tensor, layer: int = 2, layout=None, extra=None
    ) -> torch.Tensor:
        """Attention ``(S, N)`` of each of the S prompt tokens after the image (the question
        and the assistant tag) to each visual token at ``layer``, mean over heads (SparseVLM's
        raters are among them; the last row is FastV's score)."""
        self.check_visual(visual, layout)
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} outside 1..{self.n_layers}")
        everything = torch.arange(visual.shape[0], device=self.device)[None]
        emb, cols = self._block_rows(self._visual(visual, extra)[None], everything, layout)
        x = torch.cat([self._ids(prompt.prefix), emb[0], self._ids(prompt.suffix)])[None]
        x, deep = self._split(x)
        pos = self.layout(len(prompt.prefix), len(prompt.suffix), layout)
        # 1-D positions are the model's default (0..L-1); M-RoPE ones must be given.
        extra_pos = {} if pos.ndim == 1 else {"position_ids": pos[..., None, :]}
        start = len(prompt.prefix)
        image = torch.zeros(x.shape[:2], dtype=torch.bool, device=self.device)
        image[:, start : start + cols.shape[1]] = True
        with self._eager():  # the mask after the switch: it is built for the eager kernel
            mask = self.llm_mask(x, None, None, image)
            res = self.lm(
                inputs_embeds=x,
                attention_mask=mask,
                output_attentions=True,
                use_cache=False,
                **extra_pos,
                **self._deep_kwargs(deep, image),
            )
        a = res.attentions[layer - 1][0].float().mean(0)  # (L, L), mean over heads
        _, slots, _, _ = self.block(layout)
        # the last S rows: the prompt after the image (the last row only, when nothing follows)
        rows = a[-max(1, len(prompt.suffix)) :]  # (S, L)
        return rows[:, start + slots].cpu()
