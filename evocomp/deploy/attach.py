"""Attach a trained compressor to a Hugging Face MLLM so its own ``generate()`` prunes tokens.

    handle = compress_model(model, processor, "models/compressor", keep_ratio=1 / 3)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"),
                         max_new_tokens=16)
    handle.last.kept        # what the compressor kept, per prompt
    handle.prompt(question) # the processor's text= for a question (the template filled in)
    handle.detach()         # the untouched model again (or: `with compress_model(...):`)

The hook point is ``prepare_inputs_for_generation``, replaced on this one model instance (the
class is never patched): each ``generate()`` call's first iteration is handed to the family's
hook (:data:`FAMILIES`, keyed by ``config.model_type``), which rewrites the prefill to the kept
visual tokens; later iterations get their attention mask shortened to match. A plain
``model(...)`` forward is never compressed. ``generate()`` also accepts ``question=`` (a string,
or one per prompt) to score with instead of the question read from the prompt, and
``keep_ratio=`` to override the handle's ratio for one call. Several compressors (one per
label budget) may be attached at once: each call's ratio is served by the one a route (an
evaluation's ``compressor_for_ratio``) names, else by the one trained nearest it
(:class:`evocomp.deploy.scorer.BudgetScorers`, ``evocomp evaluate``'s rule).

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5-style checkpoints: one image per
prompt, a fixed number of visual tokens), ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` (one image per prompt, 3-D M-RoPE positions kept:
:mod:`evocomp.deploy.qwen`), ``Qwen3VLForConditionalGeneration`` (as Qwen2-VL, each kept
token with its own DeepStack vectors: :mod:`evocomp.deploy.qwen3`),
``Gemma3ForConditionalGeneration`` (one image per prompt
without pan-and-scan crops, the kept image tokens one bidirectional block:
:mod:`evocomp.deploy.gemma3`) and ``LlavaNextForConditionalGeneration`` /
``LlavaOnevisionForConditionalGeneration`` (one image per prompt, base and tile tokens
selectable, the ``image_newline`` rows always fed: :mod:`evocomp.deploy.llava_next`), batches
of left-padded prompts whose images give the same N, the
default dynamic cache, tokens dropped before the LLM (``prune_layer=0``). Another family adds
its own hook to :data:`FAMILIES`. One ``generate()`` at a time per model: the hook keeps the
running call's kept positions between its iterations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from evocomp.deploy.gemma3 import Gemma3Prefill
from evocomp.deploy.llava import LlavaPrefill, Selection
from evocomp.deploy.llava_next import AnyresProcessor, LlavaNextPrefill
from evocomp.deploy.prompt import processor_text, template_of
from evocomp.deploy.qwen import QwenPrefill, QwenProcessor
from evocomp.deploy.qwen3 import Qwen3Prefill
from evocomp.deploy.scorer import BudgetScorers, TokenScorer
from evocomp.errors import ModelError
from evocomp.mllm.checkpoint import DTYPES, check_checkpoint, checkpoint_id
from evocomp.tokens import keep_count


def auto_processor(path: Path):
    """The checkpoint's own processor (LLaVA's loads without torchvision)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@dataclass(frozen=True)
class Family:
    """How one model family is loaded and where its prefill is rewritten."""

    model_class: str  # the transformers class its checkpoints load with
    check: Callable[[Path], dict]  # checks a checkpoint folder (config, weights); raises ModelError
    hook: type  # (model, tokenizer, template) -> object with .prefill(...) and .follow(...)
    processor: Callable[[Path], object] = auto_processor  # the processor of a checkpoint folder


FAMILIES: dict[str, Family] = {
    "llava": Family("LlavaForConditionalGeneration", check_checkpoint, LlavaPrefill),
    "qwen2_vl": Family(
        "Qwen2VLForConditionalGeneration",
        check_checkpoint,
        QwenPrefill,
        QwenProcessor.from_pretrained,
    ),
    "qwen2_5_vl": Family(
        "Qwen2_5_VLForConditionalGeneration",
        check_checkpoint,
        QwenPrefill,
        QwenProcessor.from_pretrained,
    ),
    "qwen3_vl": Family(
        "Qwen3VLForConditionalGeneration",
        check_checkpoint,
        Qwen3Prefill,
        QwenProcessor.from_pretrained,
    ),
    "gemma3": Family("Gemma3ForConditionalGeneration", check_checkpoint, Gemma3Prefill),
    "llava_next": Family(
        "LlavaNextForConditionalGeneration",
        check_checkpoint,
        LlavaNextPrefill,
        AnyresProcessor.from_pretrained,
    ),
    "llava_onevision": Family(
        "LlavaOnevisionForConditionalGeneration",
        check_checkpoint,
        LlavaNextPrefill,
        AnyresProcessor.from_pretrained,
    ),
}
HOOK_ATTR = "_evocomp_compressed"  # set on a model while a compressor is attached


def family_of(config) -> Family:
    """The family entry for a model config; ModelError for one without a hook."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ModelError(
            f"model_type {kind!r} has no compressed generate() yet (supported: {sorted(FAMILIES)})"
        )
    return FAMILIES[kind]


def model_id_of(model, prompt_template: str | None = None) -> str | None:
    """The checkpoint content id of a model loaded from a local folder, else None."""
    path = Path(getattr(model.config, "_name_or_path", "") or "")
    if str(path) and (path / "config.json").is_file():
        try:
            return checkpoint_id(path, prompt_template)
        except (OSError, ModelError):
            return None
    return None


class CompressedModel:
    """A compressor attached to a model; :func:`compress_model` makes one."""

    def __init__(self, model, processor, scorer: BudgetScorers, keep_ratio: float, template: str):
        self.model, self.processor, self.scorer = model, processor, scorer
        self.keep_ratio, self.template = keep_ratio, template
        self.hook = family_of(model.config).hook(model, processor.tokenizer, template)
        self.last: Selection | None = None  # what the latest generate() call kept
        self.last_compressor: Path | None = None  # the compressor folder that picked it
        self._original = model.prepare_inputs_for_generation  # bound: the class's or a wrapper
        self._had_own = "prepare_inputs_for_generation" in vars(model)

        def prepare_inputs_for_generation(
            input_ids, *args, question: str | list[str] | None = None, keep_ratio=None, **kwargs
        ):
            inputs = self._original(input_ids, *args, **kwargs)
            if kwargs.get("is_first_iteration"):
                ratio = self.keep_ratio if keep_ratio is None else keep_ratio
                keep_count(ratio, 1)  # a bad ratio fails here, before any scoring
                qs = [question] if isinstance(question, str) else question
                scorer = self.scorer.for_ratio(ratio)
                self.last = self.hook.prefill(
                    inputs, lambda v, t, g: scorer.kept(v, t, ratio, g), qs
                )
                self.last_compressor = scorer.directory
            else:
                self.hook.follow(inputs)
            return inputs

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        setattr(model, HOOK_ATTR, self)

    def prompt(self, question: str) -> str:
        """The processor's ``text=`` asking ``question`` in the template the compressor's labels
        were made with (:func:`evocomp.deploy.prompt.processor_text`)."""
        return processor_text(self.model, self.processor, self.template, question)

    def detach(self) -> None:
        """Give the model back its own ``prepare_inputs_for_generation``; idempotent."""
        if getattr(self.model, HOOK_ATTR, None) is not self:
            return
        if self._had_own:
            self.model.prepare_inputs_for_generation = self._original
        else:
            del self.model.prepare_inputs_for_generation
        delattr(self.model, HOOK_ATTR)

    def __enter__(self) -> CompressedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def compress_model(
    model,
    processor,
    compressor_dir: str | Path | Sequence[str | Path],
    keep_ratio: float,
    prune_layer: int = 0,
    prompt_template: str | None = None,
    model_id: str | None = None,
    fill: bool = False,
    route: Mapping[str, str | Path] | None = None,
) -> CompressedModel:
    """Make ``model.generate()`` keep only the compressor's top-k visual tokens per image.

    Args:
        model: a transformers model of a family in :data:`FAMILIES` (LLaVA-1.5 style, Qwen2-VL,
            Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA-NeXT, LLaVA-OneVision).
        processor: its processor (the tokenizer decodes the question out of the prompt); for
            Qwen a :class:`evocomp.deploy.qwen.QwenProcessor`, for LLaVA-NeXT / OneVision an
            :class:`evocomp.deploy.llava_next.AnyresProcessor` (``load_checkpoint`` gives them).
        compressor_dir: a folder written by ``evocomp train``, or several, one per label
            budget (``label.budgets``): each call's keep ratio is then served by the one
            ``route`` names for it, else by the one trained nearest it
            (:class:`evocomp.deploy.scorer.BudgetScorers`; ``handle.last_compressor`` says
            which served the latest call).
        keep_ratio: fraction of each image's N visual tokens kept, in (0, 1]; k =
            ``evocomp.tokens.keep_count(keep_ratio, N)`` (LLaVA-NeXT: N base and tile tokens,
            the newlines always fed).
        prune_layer: 0 drops tokens before the LLM. l > 0 (drop after LLM layer l) is not
            supported here: the first l layers would need a KV cache holding all N tokens and
            the others one holding k, which the single sequence length of ``generate()`` and
            its cache cannot express; ``evocomp evaluate`` measures l > 0 without a cache.
        prompt_template: the ``mllm.prompt_template`` override the compressor's labels were
            made with, if any; the question is read out of prompts with this template
            (default: the checkpoint's own, as :mod:`evocomp.mllm.prompts` resolves it).
        model_id: the checkpoint's content id, checked against the one the compressor was
            trained for (default: computed when the model was loaded from a local folder).
        fill: beyond the compressor's training labels' keep ratio, keep DivPrune's max-min
            picks from its top tokens instead of its next scores (``evocomp_fill`` of
            ``evocomp evaluate``; :class:`evocomp.deploy.scorer.TokenScorer`).

    Raises:
        ModelError: a family without a hook, or a compressor trained for another model
            (or, with ``fill`` or several compressors, one that does not record its labels'
            keep ratio; or two of one label ratio; or a route to a folder not given).
        ValueError: a bad keep ratio, ``prune_layer`` != 0, or a compressor already attached.
        FileNotFoundError: no compressor in ``compressor_dir``.
    """
    keep_count(keep_ratio, 1)
    if prune_layer != 0:
        raise ValueError(
            f"prune_layer={prune_layer}: a compressed generate() drops tokens before the LLM "
            "only (prune_layer=0); dropping after LLM layer l needs per-layer KV caches of "
            "two lengths, not supported yet"
        )
    family_of(model.config)
    if getattr(model, HOOK_ATTR, None) is not None:
        raise ValueError("this model already has a compressor attached: detach() it first")
    dirs = [compressor_dir] if isinstance(compressor_dir, str | Path) else list(compressor_dir)
    model_id = model_id or model_id_of(model, prompt_template)
    scorer = BudgetScorers(
        [
            TokenScorer(d, model.config.text_config.hidden_size, model_id, model.device, fill)
            for d in dirs
        ],
        route,
    )
    template = template_of(model, processor, prompt_template)
    return CompressedModel(model, processor, scorer, keep_ratio, template)


def checkpoint_config(path: str | Path):
    """The transformers config of a local checkpoint folder of a supported family (no weights read).

    Raises:
        ModelError: no config.json, an unreadable one, a family without a hook, or no weights.
    """
    from transformers import AutoConfig

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path}: not a model checkpoint directory (no config.json)")
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"{config}: not a readable model config ({err})") from None
    if kind not in FAMILIES:
        raise ModelError(
            f"{path}: model_type {kind!r} has no compressed generate() yet "
            f"(supported: {sorted(FAMILIES)})"
        )
    FAMILIES[kind].check(path)
    return AutoConfig.from_pretrained(path)


def load_checkpoint(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_template: str | None = None,
):
    """``(model, processor, model_id)`` of a local checkpoint folder of a supported family.

    Raises:
        ModelError: as :func:`checkpoint_config`, or an unknown dtype.
    """
    import transformers

    config = checkpoint_config(path)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    family = FAMILIES[config.model_type]
    model = getattr(transformers, family.model_class).from_pretrained(path, dtype=DTYPES[dtype])
    processor = family.processor(Path(path))
    return model.to(device).eval(), processor, checkpoint_id(path, prompt_template)
