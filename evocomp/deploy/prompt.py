"""The prompt around the image, and the question the compressor reads back out of it.

The compressor scores visual tokens given the question alone (its training input is
``mllm.question_embeddings(question)``: the question's token embeddings, no template text,
no answer). Inside ``generate()`` only the prompt's token ids are at hand, so the question is
recovered from them: the text after the image placeholder up to the end of the user turn,
where both ends are read off the prompt template (``"USER: <image>\\n{question} ASSISTANT:"``
for LLaVA-1.5): take the ids after the last image token from the first ordinary token up to
the next special one (a chat template's end of turn, ``<|im_end|>``; ``<unk>`` counts as
ordinary), decode them, drop the template's text between ``<image>`` and ``{question}`` when
the decoded text starts with it, and cut at the first occurrence of the template's text after
``{question}`` (the assistant tag). A prompt that does not follow the template keeps
everything after the image. Pass ``question=`` to ``generate()`` to skip the guesswork.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evocomp.mllm.hf_adapter import image_token_id
from evocomp.mllm.prompts import resolve_template
from evocomp.mllm.sequence import IMAGE, QUESTION


def template_of(model, processor, override: str | None = None) -> str:
    """The prompt template EvoComp drives this model with (:mod:`evocomp.mllm.prompts`).

    The same precedence as the adapters, so deployment reads the question as labeling,
    training and evaluation wrote it: ``override``, config.json's ``evocomp.prompt_template``,
    the checkpoint's chat template rendered for one user turn, the family's default.
    """
    config, tokenizer = model.config, processor.tokenizer
    return resolve_template(
        Path(getattr(config, "_name_or_path", "") or "."),
        config.model_type,
        getattr(config, "evocomp", None) or {},
        tokenizer,
        tokenizer.convert_ids_to_tokens(image_token_id(config)),
        override,
        processor,
    )


def prompt_text(template: str, question: str, image_token: str = IMAGE) -> str:
    """The processor's ``text=``: the template with the question filled in and ``<image>``
    written as the processor's image token (``processor.image_token``: ``<|image_pad|>`` for
    Qwen), which the processor expands to the image's N tokens."""
    return template.replace(QUESTION, question.strip()).replace(IMAGE, image_token)


def question_from_text(text: str, template: str) -> str:
    """The question inside ``text``, the decoded prompt after the image (see the module doc)."""
    after = template.split(IMAGE, 1)[-1]
    lead, _, tail = after.partition(QUESTION)
    text, lead, tail = text.strip(), lead.strip(), tail.strip()
    if lead and text.startswith(lead):
        text = text[len(lead) :]
    if tail and (end := text.find(tail)) >= 0:
        text = text[:end]
    return text.strip()


def question_embeddings(model, tokenizer, question: str) -> torch.Tensor:
    """The compressor's text input ``(T, D)`` float32: as ``HFLlava.question_embeddings``."""
    ids = tokenizer(question.strip(), add_special_tokens=False)["input_ids"]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device)).float()
