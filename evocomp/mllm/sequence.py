"""Build LLM inputs from a prompt and a subset of visual tokens.

The LLM sees ``[prefix][kept visual tokens, in original order][suffix][answer]``
where ``prefix``/``suffix`` are the prompt template's text around ``<image>``.
Kept visual tokens keep their *original* position ids (the ones they would have
with all N tokens present) and the text after them is positioned as if all N
were there: dropping a token then changes what the model sees, not where. (The
FACTS probe measured renumbering to cost 1 point at 1/3 and 3.5 at 1/9.)

Position ids are ``(..., L)``: ``(L,)`` for a 1-D RoPE (LLaVA), ``(3, L)`` for Qwen's
M-RoPE (temporal, height, width); a subset takes the columns of the full sequence's layout
(:func:`subset_columns`), so either kind keeps each token's original position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE, QUESTION = "<image>", "{question}"  # the placeholders of a prompt template
DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5


@dataclass(frozen=True)
class Prompt:
    """Token ids of one (question, answer) around the image placeholder."""

    prefix: list[int]  # before the visual tokens (incl. BOS when the tokenizer adds one)
    suffix: list[int]  # question and assistant tag, after the visual tokens
    answer: list[int]  # teacher-forced answer tokens (no EOS)


def encode_prompt(
    tokenizer, question: str, answer: str = "", template: str = DEFAULT_TEMPLATE
) -> Prompt:
    """Tokenize ``template`` split at ``<image>``; the answer follows the assistant tag.

    The answer is joined with a space after a tag (``ASSISTANT: red``), directly after a
    template that ends in whitespace (``<|im_start|>assistant\\n`` + ``red``), as each
    family's chat template writes it.
    """
    if IMAGE not in template or QUESTION not in template:
        raise ValueError(f"prompt template must contain '{IMAGE}' and '{QUESTION}': {template!r}")
    before, after = template.split(IMAGE, 1)
    after = after.replace(QUESTION, question.strip())
    prefix = tokenizer(before, add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    # A tokenizer that appends EOS to every encode would end the prefix early.
    if eos is not None and prefix and prefix[-1] == eos and eos != bos:
        prefix = prefix[:-1]
    # A chat template that writes BOS itself, and a tokenizer that adds one: keep one.
    if bos is not None and prefix[:2] == [bos, bos]:
        prefix = prefix[1:]
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    ans: list[int] = []
    if answer:
        sep = "" if after[-1:].isspace() else " "
        # Encode suffix+answer together so sub-word tokenizers merge the space as in training.
        joint = tokenizer(after + sep + answer.strip(), add_special_tokens=False)["input_ids"]
        if joint[: len(suffix)] == suffix and len(joint) > len(suffix):
            ans = joint[len(suffix) :]
        else:
            ans = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    return Prompt(list(prefix), list(suffix), list(ans))


def positions(
    n_prefix: int, n_visual: int, kept: torch.Tensor, n_tail: int, renumber: bool = False
) -> torch.Tensor:
    """Position ids ``(P, n_prefix + k + n_tail)`` for rows of kept indices ``kept (P, k)``."""
    P, k = kept.shape
    dev = kept.device
    pre = torch.arange(n_prefix, device=dev).expand(P, n_prefix)
    if renumber:
        vis = (n_prefix + torch.arange(k, device=dev)).expand(P, k)
        tail = (n_prefix + k + torch.arange(n_tail, device=dev)).expand(P, n_tail)
    else:
        vis = n_prefix + kept
        tail = (n_prefix + n_visual + torch.arange(n_tail, device=dev)).expand(P, n_tail)
    return torch.cat([pre, vis, tail], dim=1)


def subset_columns(n_prefix: int, n_visual: int, kept: torch.Tensor, n_tail: int) -> torch.Tensor:
    """Columns of the full sequence ``(P, n_prefix + k + n_tail)`` a row of kept indices takes.

    ``layout[..., cols]`` then gives each token its original position (``layout``: the
    full sequence's position ids ``(..., n_prefix + n_visual + n_tail)``).
    """
    return positions(n_prefix, n_visual, kept, n_tail)


def left_pad(
    rows: list[torch.Tensor], pos: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad rows of embeddings ``(L_i, D)`` and positions ``(..., L_i)`` into a batch.

    Returns ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``, ``position_ids (..., B, L)``
    (``(B, L)`` for 1-D positions, ``(3, B, L)`` for M-RoPE).
    """
    L = max(r.shape[0] for r in rows)
    D = rows[0].shape[1]
    B = len(rows)
    emb = rows[0].new_zeros(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.long, device=rows[0].device)
    pid = torch.zeros(*pos[0].shape[:-1], B, L, dtype=torch.long, device=rows[0].device)
    for i, (r, p) in enumerate(zip(rows, pos, strict=True)):
        n = r.shape[0]
        emb[i, L - n :] = r
        mask[i, L - n :] = 1
        pid[..., i, L - n :] = p
    return emb, mask, pid


def left_pad_flags(flags: list[torch.Tensor], length: int) -> torch.Tensor:
    """Rows of per-token flags ``(L_i,)`` left-padded with False into ``(B, length)``,
    aligned with :func:`left_pad`'s rows."""
    out = torch.zeros(len(flags), length, dtype=torch.bool, device=flags[0].device)
    for i, f in enumerate(flags):
        out[i, length - f.shape[0] :] = f
    return out
