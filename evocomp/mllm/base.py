"""The one protocol every MLLM backend implements (errors: :class:`evocomp.errors.ModelError`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from evocomp.mllm.sequence import Prompt


@dataclass(frozen=True)
class ImageTokens:
    """One image's visual tokens as the pipeline keeps them (the feature cache stores all three).

    N may differ per image (Qwen's aspect-ratio grids, LLaVA-NeXT's tiles). ``layout`` is the
    adapter's own description of where the tokens sit in the LLM's sequence (a Qwen merged
    grid, a LLaVA-NeXT base + tile grid); the pipeline only stores it and hands it back with
    the tokens, so every family places its tokens its own way.
    """

    tokens: torch.Tensor  # (N, D) float32, the selectable visual tokens
    cells: torch.Tensor  # (N, 2) long, each token's (row, col) on the image's patch grid
    layout: torch.Tensor  # (m,) long, the adapter's placement of these tokens
    # (E, N, D): vectors the family adds to each token's hidden state after LLM layers
    # 0..E-1 (Qwen3-VL's deepstack features); None (E = 0) for most families
    extra: torch.Tensor | None = None

    def check(self) -> None:
        n = self.tokens.shape[0]
        if self.cells.shape != (n, 2) or self.layout.ndim != 1:
            raise ValueError(
                f"cells {tuple(self.cells.shape)} / layout {tuple(self.layout.shape)} do not "
                f"fit {n} visual tokens"
            )


class MLLM(Protocol):
    """What the pipeline asks of a model; :func:`evocomp.mllm.loader.load_mllm` returns one."""

    path: Path  # the checkpoint directory
    model_id: str  # content-derived: same checkpoint and prompt -> same id (store, cache keys)
    template: str  # the prompt around "<image>" and "{question}" (evocomp.mllm.prompts)
    prompt_override: str | None  # mllm.prompt_template when given (part of model_id)
    n_tokens: int  # visual tokens of the model's default image (N varies per image: layout)
    grid: tuple[int, int]  # that image's patch grid (rows, cols), rows * cols == n_tokens
    hidden_size: int  # LLM embedding width D
    n_layers: int  # LLM decoder layers (a prune layer l lies in 1..n_layers - 1)
    tokenizer: Any  # the checkpoint's tokenizer (decodes ids, names vocabulary words)

    def image_tokens(self, images: list[Image.Image]) -> list[ImageTokens]:
        """Each image's projected visual tokens, their cells and layout (float32, CPU)."""

    def visual_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected visual tokens ``(B, N, D)`` of images giving the same N (float32, CPU)."""

    def vocab_embeddings(self) -> torch.Tensor:
        """The LLM input-embedding matrix ``(V, D)``."""

    def encode(self, question: str, answer: str = "") -> Prompt:
        """Token ids of the prompt around the image and of the answer."""

    def question_embeddings(self, question: str) -> torch.Tensor:
        """Token embeddings of the question alone ``(T, D)`` (the compressor's text input)."""

    def subset_loss(
        self,
        prompt: Prompt,
        visual: torch.Tensor,
        kept: torch.Tensor,
        layout: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean answer cross-entropy ``(P,)`` for P kept-index rows ``(P, k)``, one forward.

        ``layout``: the image's :attr:`ImageTokens.layout` (None: the model's default image).
        Tokens a family must always feed (LLaVA-NeXT's ``image_newline``) are added by the
        adapter; ``kept`` indexes the selectable tokens only. ``extra``: the image's
        :attr:`ImageTokens.extra` (needed by a family that has them). ``reference``: the
        log-probabilities of :meth:`answer_logprobs`; given, each row's loss is the mean KL
        divergence from them over the answer's positions instead (``label.objective: distill``).
        """

    def answer_logprobs(
        self,
        prompt: Prompt,
        visual: torch.Tensor,
        layout: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-probabilities ``(n_ans, V)`` of the next token at each of the answer's positions
        with every visual token kept (teacher-forced on the prompt's answer)."""

    def generate(
        self,
        questions: list[str],
        visual: list[torch.Tensor],
        kept: list[torch.Tensor | None],
        max_new_tokens: int = 8,
        vis_pos: list[torch.Tensor] | None = None,
        prune_layer: int = 0,
        layouts: list[torch.Tensor | None] | None = None,
        extras: list[torch.Tensor | None] | None = None,
    ) -> list[str]:
        """Greedy answers, batched over samples; ``kept[i]`` None keeps all tokens.

        ``vis_pos``: the ``visual[i]`` rows are ready-made tokens (e.g. VisionZip's merged
        ones) at these original positions, not all N tokens to select from. ``prune_layer``
        l > 0: the first l LLM layers see every visual token, the unkept ones are dropped
        after them (the paper's l=2). ``layouts[i]``, ``extras[i]``: as in :meth:`subset_loss`.
        """

    def text_attention(
        self, prompt: Prompt, visual: torch.Tensor, layer: int = 2, layout=None, extra=None
    ) -> torch.Tensor:
        """FastV score ``(N,)``: attention of the last prompt token to each visual token at ``layer``."""

    def prompt_attention(
        self, prompt: Prompt, visual: torch.Tensor, layer: int = 2, layout=None, extra=None
    ) -> torch.Tensor:
        """Attention ``(S, N)`` of each prompt token after the image to each visual token at
        ``layer``, mean over heads (SparseVLM's raters; the last row is :meth:`text_attention`)."""

    def cls_attention(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """VisionZip score ``(N_i,)`` per image: the vision tower's CLS attention summed over heads
        (a tower without CLS: the attention each token receives, mean over queries)."""
