"""What a checkpoint folder is, read from its files without loading weights.

The family (``config.json``'s ``model_type``) picks the adapter; the content id names the
model in the store and the feature cache; :func:`checkpoint_info` tells the stages that never
load the model (train, evaluate's bookkeeping) its token count, grid and LLM shape. Every
command calls :func:`check_checkpoint` (through these) before any work, so an unusable
folder is one line and exit 2, never a traceback half-way through a run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from evocomp.errors import ModelError
from evocomp.tokens import grid_shape

# model_type -> what it is (the adapter: evocomp.mllm.loader.ADAPTERS)
FAMILIES = {
    "llava": "LLaVA-1.5 / LLaVA-interleave (LlavaForConditionalGeneration; CLIP or SigLIP tower)",
    "qwen2_vl": "Qwen2-VL (Qwen2VLForConditionalGeneration)",
    "qwen2_5_vl": "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
    "qwen3_vl": "Qwen3-VL (Qwen3VLForConditionalGeneration; DeepStack features kept per token)",
    "gemma3": "Gemma 3 (Gemma3ForConditionalGeneration; SigLIP tower)",
    "llava_next": "LLaVA-NeXT (LlavaNextForConditionalGeneration; CLIP or SigLIP tower)",
    "llava_onevision": "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration; SigLIP or CLIP)",
}
SUPPORTED = tuple(FAMILIES)
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ANYRES = ("llava_next", "llava_onevision")  # base crop + tile grid, packed with newlines
LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")
GEMMA3_TOWER = "siglip_vision_model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("*.safetensors", "*.bin")
# Where a checkpoint keeps its chat template (the prompt comes from it, so the id covers it).
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TEMPLATE_KEYS = ("tokenizer_config.json", "processor_config.json")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable JSON file ({err})") from None


def check_checkpoint(path: str | Path) -> dict:
    """The checkpoint's config.json, after checking the folder is one we can run.

    Raises:
        ModelError: no config.json, an unreadable one, an unsupported family or vision
            tower, or no weight files.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model checkpoint directory (no config.json)")
    cfg = read_json(path / "config.json")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ModelError(
            f"{path}: model_type {family!r} is not supported (supported families: "
            f"{', '.join(SUPPORTED)})"
        )
    tower = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if family in ("llava", *ANYRES) and tower not in LLAVA_TOWERS:
        # Pixtral is packaged as model_type llava, its rows separated by [IMG_BREAK] tokens.
        raise ModelError(
            f"{path}: a {family} checkpoint with vision tower {tower!r} is not supported "
            f"(supported: {', '.join(LLAVA_TOWERS)}; families: {', '.join(SUPPORTED)})"
        )
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelError(
            f"{path}: config.json but no weights (*.safetensors or *.bin): an incomplete copy?"
        )
    if family in QWEN:
        qwen_grid(path, cfg)  # the processor config fixes N: refuse a folder without one now
    if family == "gemma3":
        gemma3_grid(path, cfg)
    if family in ANYRES and not (path / "preprocessor_config.json").is_file():
        raise ModelError(f"{path}: a {family} checkpoint needs preprocessor_config.json")
    return cfg


def checkpoint_id(path: str | Path, prompt_template: str | None = None) -> str:
    """Content id of a checkpoint: what decides its labels, hashed.

    config.json, a fingerprint of each weight file (size, head, tail), and what decides the
    prompt: the ``prompt_template`` override when one is given, else the chat template
    files unless config.json records its own template (the reference model, whose id
    predates chat-template prompts and must not change).
    """
    path = Path(path)
    config = (path / "config.json").read_bytes()
    h = hashlib.sha256(config)
    for f in [f for pattern in WEIGHT_FILES for f in sorted(path.glob(pattern))]:
        size = f.stat().st_size
        h.update(f.name.encode() + str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    if prompt_template is not None:
        h.update(b"prompt_template\0" + prompt_template.encode())
    elif not (json.loads(config).get("evocomp") or {}).get("prompt_template"):
        for name in TEMPLATE_FILES:
            if (path / name).is_file():
                h.update(name.encode() + (path / name).read_bytes())
        for name in TEMPLATE_KEYS:
            if (path / name).is_file():
                tpl = read_json(path / name).get("chat_template")
                h.update(name.encode() + json.dumps(tpl, sort_keys=True).encode())
    return f"{path.name}-{h.hexdigest()[:12]}"


def qwen_grid(path: Path, cfg: dict) -> tuple[int, int]:
    """The merged-token grid of a Qwen2-VL / 2.5-VL checkpoint for square images.

    Its processor resizes an image to multiples of ``patch x merge`` within
    ``[min_pixels, max_pixels]`` keeping the aspect ratio, so N depends on the image. One N
    per model (until variable N lands): a square image at the ``max_pixels`` cap, which
    every square image at least that large is brought to.
    """
    pre = path / "preprocessor_config.json"
    if not pre.is_file():
        raise ModelError(f"{path}: a {cfg['model_type']} checkpoint needs preprocessor_config.json")
    p = read_json(pre)
    vision = cfg.get("vision_config") or {}
    patch = int(p.get("patch_size") or vision.get("patch_size", 14))
    merge = int(p.get("merge_size") or vision.get("spatial_merge_size", 2))
    max_pixels = int((p.get("size") or {}).get("longest_edge") or p.get("max_pixels") or 0)
    if max_pixels <= 0:
        raise ModelError(f"{pre}: no size.longest_edge (max_pixels): cannot fix the token grid")
    side = max(1, math.floor(math.sqrt(max_pixels) / (patch * merge)))
    return side, side


def gemma3_grid(path: Path, cfg: dict) -> tuple[int, int]:
    """The token grid of a Gemma 3 checkpoint: ``mm_tokens_per_image`` as a square.

    Its projector average-pools the SigLIP tower's ``(image_size / patch)`` squared patches to
    ``mm_tokens_per_image`` tokens, so N is fixed per model (every image is resized to
    ``image_size``). Defaults are the config classes' (256 tokens; SigLIP 224 px, patch 16).
    """
    vision = cfg.get("vision_config") or {}
    tower = vision.get("model_type", GEMMA3_TOWER)
    if tower != GEMMA3_TOWER:
        raise ModelError(
            f"{path}: a Gemma 3 checkpoint with vision tower {tower!r} is not supported "
            f"(supported: {GEMMA3_TOWER})"
        )
    n = int(cfg.get("mm_tokens_per_image") or 256)
    side = math.isqrt(n)
    patches = int(vision.get("image_size", 224)) // int(vision.get("patch_size", 16))
    if side * side != n or patches % side:
        raise ModelError(
            f"{path / 'config.json'}: mm_tokens_per_image {n} is not a square grid that "
            f"pools the tower's {patches}x{patches} patches evenly"
        )
    return side, side


def anyres_tokens(path: Path) -> int:
    """Selectable tokens of a LLaVA-NeXT / OneVision checkpoint's default image (a square one
    of the tower's size): base crop + unpadded tile grid, newlines not counted. From the
    model's own packing code on its config, without weights."""
    from transformers import AutoConfig

    from evocomp.mllm.anyres import default_layout_of, layout_block

    return layout_block(default_layout_of(AutoConfig.from_pretrained(path)))[0]


def checkpoint_info(path: str | Path, prompt_template: str | None = None) -> dict:
    """What the pipeline needs to know of a checkpoint without loading its weights."""
    path = Path(path)
    cfg = check_checkpoint(path)
    if cfg["model_type"] in QWEN:
        grid = qwen_grid(path, cfg)
        n = grid[0] * grid[1]
    elif cfg["model_type"] == "gemma3":
        grid = gemma3_grid(path, cfg)
        n = grid[0] * grid[1]
    elif cfg["model_type"] in ANYRES:
        n = anyres_tokens(path)
        grid = grid_shape(n)
    else:
        n = int(cfg["image_seq_length"])
        grid = grid_shape(n)
    text = cfg.get("text_config") or cfg  # some Qwen configs keep the LM's keys at the top
    return {
        "model_id": checkpoint_id(path, prompt_template),
        "family": cfg["model_type"],
        "n_tokens": n,
        "grid": grid,
        "hidden_size": text.get("hidden_size"),
        "heads": text.get("num_attention_heads"),
        "ffn": text.get("intermediate_size"),
        "layers": text.get("num_hidden_layers"),
    }
