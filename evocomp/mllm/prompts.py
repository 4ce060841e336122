"""Which prompt a checkpoint is driven with: the template text around the image and question.

A template is one string with ``<image>`` where the visual tokens go and ``{question}``
where the question goes (``USER: <image>\\n{question} ASSISTANT:``); the answer follows
it (:func:`evocomp.mllm.sequence.encode_prompt`). In order of precedence:

1. ``mllm.prompt_template`` in params.yaml: an explicit override;
2. ``evocomp.prompt_template`` in config.json: a model trained on its own format (the
   reference model);
3. the checkpoint's chat template (processor, tokenizer or ``chat_template.json``): one user
   turn holding the image and the question, rendered with ``add_generation_prompt=True``;
4. the family's documented format, for a checkpoint without a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from evocomp.errors import ModelError
from evocomp.mllm.sequence import DEFAULT_TEMPLATE, IMAGE, QUESTION

QWEN_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    f"<|vision_start|>{IMAGE}<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)
# Qwen3-VL's chat template writes no default system turn.
QWEN3_TEMPLATE = (
    f"<|im_start|>user\n<|vision_start|>{IMAGE}<|vision_end|>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Gemma 3's processor writes each image as this block where its chat template puts <start_of_image>.
GEMMA3_IMAGE_BLOCK = f"\n\n<start_of_image>{IMAGE}<end_of_image>\n\n"
GEMMA3_TEMPLATE = (
    f"<start_of_turn>user\n{GEMMA3_IMAGE_BLOCK}{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
)
# LLaVA-OneVision's chat template (Qwen2 markers, the image first in the user turn).
ONEVISION_TEMPLATE = f"<|im_start|>user {IMAGE}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
FAMILY_TEMPLATES = {
    "llava": DEFAULT_TEMPLATE,
    "qwen2_vl": QWEN_TEMPLATE,
    "qwen2_5_vl": QWEN_TEMPLATE,
    "qwen3_vl": QWEN3_TEMPLATE,
    "gemma3": GEMMA3_TEMPLATE,
    "llava_next": DEFAULT_TEMPLATE,  # llava-v1.6-vicuna's; mistral's comes with its chat template
    "llava_onevision": ONEVISION_TEMPLATE,
}


def image_token_id(config) -> int:
    """The id of the image placeholder token (``image_token_index`` in older LLaVA configs)."""
    tid = getattr(config, "image_token_id", None)
    return tid if tid is not None else config.image_token_index


def image_placeholder(config, tokenizer) -> tuple[str, str]:
    """What a chat template renders for the image, and the template text it stands for: the
    image token and ``<image>``; for Gemma 3 ``<start_of_image>`` and the block its processor
    writes in its place, ``\n\n<start_of_image>`` + the N image tokens + ``<end_of_image>\n\n``
    (labeling's adapters and the deployment hook read prompts the same way)."""
    if config.model_type == "gemma3":
        boi, eoi = tokenizer.convert_ids_to_tokens([config.boi_token_id, config.eoi_token_id])
        return boi, f"\n\n{boi}{IMAGE}{eoi}\n\n"
    return tokenizer.convert_ids_to_tokens(image_token_id(config)), IMAGE


def check_template(template: str, where: str) -> str:
    """``template`` if it has exactly one ``<image>`` and one ``{question}``."""
    if template.count(IMAGE) != 1 or template.count(QUESTION) != 1:
        raise ModelError(
            f"{where}: a prompt template needs exactly one {IMAGE} and one {QUESTION}, "
            f"got {template!r}"
        )
    return template


def chat_template_of(path: Path, tokenizer, processor=None) -> str | None:
    """The checkpoint's chat template: the processor's, the tokenizer's, or chat_template.json."""
    for owner in (processor, tokenizer):
        tpl = getattr(owner, "chat_template", None) if owner is not None else None
        if isinstance(tpl, str) and tpl:
            return tpl
    if (path / "chat_template.json").is_file():
        tpl = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return tpl or None
    return None


def render_chat_template(
    tokenizer, chat_template: str, image_token: str, image_block: str = IMAGE
) -> str:
    """One user turn (the image, then the question) rendered and written as a template.

    The image placeholder the template renders (``image_token``, e.g. ``<|image_pad|>``) is
    written as ``image_block``: ``<image>``, with the text a processor puts around the image
    tokens when the template leaves that to it (Gemma 3: :data:`GEMMA3_IMAGE_BLOCK`); markers
    the template writes itself (``<|vision_start|>``) stay in the text.
    """
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    if image_token != IMAGE:
        if IMAGE in text:
            raise ModelError(f"chat template renders a literal {IMAGE} besides {image_token}")
        text = text.replace(image_token, image_block)
    return text


def resolve_template(
    path: Path,
    family: str,
    config_extra: dict,
    tokenizer,
    image_token: str,
    override: str | None = None,
    processor=None,
    image_block: str = IMAGE,
) -> str:
    """The prompt template for the checkpoint at ``path`` (the precedence in the module doc).

    ``image_token`` is what the chat template renders for the image, ``image_block`` the
    template text it stands for (:func:`render_chat_template`).
    """
    if override is not None:
        return check_template(override, "mllm.prompt_template")
    if own := config_extra.get("prompt_template"):
        return check_template(own, f"{path / 'config.json'} evocomp.prompt_template")
    if chat := chat_template_of(path, tokenizer, processor):
        rendered = render_chat_template(tokenizer, chat, image_token, image_block)
        return check_template(
            rendered,
            f"{path}: the chat template (one user turn, image + question) rendered; "
            "set mllm.prompt_template instead",
        )
    return FAMILY_TEMPLATES[family]
