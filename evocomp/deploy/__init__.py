"""The trained compressor at work inside a Hugging Face model's own ``generate()``.

    from evocomp.deploy import compress_model
    with compress_model(model, processor, "models/compressor", keep_ratio=1 / 3) as handle:
        out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))

``evocomp generate`` is the command-line face (:mod:`evocomp.cli.generate`).
"""

from evocomp.deploy.attach import FAMILIES, CompressedModel, compress_model, load_checkpoint
from evocomp.deploy.llava import Selection
from evocomp.deploy.llava_next import AnyresProcessor
from evocomp.deploy.qwen import QwenProcessor

__all__ = [
    "AnyresProcessor",
    "FAMILIES",
    "CompressedModel",
    "QwenProcessor",
    "Selection",
    "compress_model",
    "load_checkpoint",
]
