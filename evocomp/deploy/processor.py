"""A processor for images and text built from a checkpoint's image processor and tokenizer.

Some families' ``AutoProcessor`` needs torchvision for its video half (Qwen2-VL, LLaVA-
OneVision; not installed here). What a compressed ``generate()`` needs from a processor is
small: the image processor's outputs, and the text with each image placeholder repeated as
many times as the model writes features for that image. Each family says how many
(:meth:`ImageTextProcessor.counts`); :class:`evocomp.deploy.qwen.QwenProcessor` and
:class:`evocomp.deploy.llava_next.AnyresProcessor` are the two.
"""

from __future__ import annotations


class ImageTextProcessor:
    """``processor(images=[img], text=[prompt])``: each image token in the text (one per image,
    in order) becomes the image's count of them; prompts are padded on the left (what
    ``generate()`` needs). Subclasses give :meth:`counts` and, if any, :meth:`extra`."""

    default_image_token = "<image>"

    def __init__(self, image_processor, tokenizer) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token = getattr(tokenizer, "image_token", None) or self.default_image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def counts(self, data: dict, per_prompt: list[int]) -> list[int]:
        """Placeholders for each image, in order, from the image processor's outputs
        (``per_prompt``: images in each prompt)."""
        raise NotImplementedError

    def extra(self, data: dict, tokens: dict) -> None:
        """Add the family's other model inputs to ``data`` (default: none)."""

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        if images is None:
            images = []
        elif not isinstance(images, list | tuple):
            images = [images]
        images = [im for x in images for im in (x if isinstance(x, list | tuple) else [x])]
        per_prompt = [t.count(self.image_token) for t in texts]
        if sum(per_prompt) != len(images):
            raise ValueError(
                f"{len(images)} images for {sum(per_prompt)} {self.image_token} placeholders in "
                "the text: write one per image (the prompt template's <image>)"
            )
        data: dict = {}
        if images:
            data = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = iter(self.counts(data, per_prompt))
            mark = "\0"  # a stand-in, so the expanded tokens are not expanded again
            texts = [t.replace(self.image_token, mark) for t in texts]
            for i, t in enumerate(texts):
                while mark in t:
                    t = t.replace(mark, self.image_token * next(counts), 1)
                texts[i] = t
        tokens = self.tokenizer(texts, padding=padding, padding_side="left", return_tensors="pt")
        data.update(tokens)
        self.extra(data, tokens)
        return BatchFeature(data, tensor_type=return_tensors)
