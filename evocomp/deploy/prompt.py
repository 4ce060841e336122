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

from evocomp.mllm.prompts import image_placeholder, resolve_template
from evocomp.mllm.sequence import IMAGE, QUESTION


def template_of(model, processor, override: str | None = None) -> str:
    """The prompt template EvoComp drives this model with (:mod:`evocomp.mllm.prompts`).

    The same precedence as the adapters, so deployment reads the question as labeling,
    training and evaluation wrote it: ``override``, config.json's ``evocomp.prompt_template``,
    the checkpoint's chat template rendered for one user turn, the family's default.
    """
    config, tokenizer = model.config, processor.tokenizer
    image_token, image_block = image_placeholder(config, tokenizer)
    return resolve_template(
        Path(getattr(config, "_name_or_path", "") or "."),
        config.model_type,
        getattr(config, "evocomp", None) or {},
        tokenizer,
        image_token,
        override=override,
        processor=processor,
        image_block=image_block,
    )


def prompt_text(
    template: str, question: str, image_token: str = IMAGE, image_block: str = IMAGE
) -> str:
    """The processor's ``text=``: the template with the question filled in and the image
    (``image_block``: ``<image>``, or Gemma 3's block around it, :func:`image_placeholder`)
    written as the processor's image token (``processor.image_token``: ``<|image_pad|>`` for
    Qwen, ``<start_of_image>`` for Gemma 3), which the processor expands to the image's N
    tokens (for Gemma 3 inside the block again)."""
    return template.replace(QUESTION, question.strip()).replace(image_block, image_token)


def processor_text(model, processor, template: str, question: str) -> str:
    """The processor's ``text=`` for ``question``, so that its ``input_ids`` are the prompt
    labeling fed (:func:`evocomp.mllm.sequence.encode_prompt`): :func:`prompt_text` with the
    family's image block, and a BOS the template writes (Gemma 3's chat template does) left
    to a tokenizer that adds its own, as ``encode_prompt`` keeps one."""
    tok = processor.tokenizer
    _, block = image_placeholder(model.config, tok)
    if block not in template:
        raise ValueError(
            f"prompt template {template!r} has no {block!r}: {model.config.model_type}'s "
            "processor writes each image as that block, so the prompt would not be the one "
            "labeling fed; put the block where the image goes"
        )
    text = prompt_text(template, question, getattr(processor, "image_token", IMAGE), block)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("")["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos) :]
    return text


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
