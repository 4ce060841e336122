"""The trained compressor at work inside a Hugging Face model's own ``generate()``.

    from evocomp.deploy import compress_model
    with compress_model(model, processor, "models/compressor", keep_ratio=1 / 3) as handle:
        out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))

With one compressor per label budget, pass them all (and optionally an evaluation's
``compressor_for_ratio`` as the route); each call's keep ratio picks its own:

    route = route_of_evaluation("metrics/scenes/eval.json")
    handle = compress_model(model, processor, sorted(set(route.values())), 1 / 9, route=route)

``evocomp generate`` is the command-line face (:mod:`evocomp.cli.generate`).
"""

from evocomp.deploy.attach import FAMILIES, CompressedModel, compress_model, load_checkpoint
from evocomp.deploy.llava import Selection
from evocomp.deploy.llava_next import AnyresProcessor
from evocomp.deploy.qwen import QwenProcessor
from evocomp.deploy.scorer import BudgetScorers, route_of_evaluation

__all__ = [
    "AnyresProcessor",
    "BudgetScorers",
    "FAMILIES",
    "CompressedModel",
    "QwenProcessor",
    "Selection",
    "compress_model",
    "load_checkpoint",
    "route_of_evaluation",
]
