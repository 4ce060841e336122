"""LLaVA-NeXT / OneVision's packed image layout, from the model's own packing code.

A layout is ``(side, rows, cols, single)`` (:mod:`evocomp.mllm.hf_llava_next` explains the
packing); these functions need only the model's config, so ``checkpoint_info`` and the
stages that never load weights can count a default image's tokens without the adapter.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import SimpleNamespace

import torch

from evocomp.errors import ModelError

MODULES = {
    "llava_next": "transformers.models.llava_next.modeling_llava_next",
    "llava_onevision": "transformers.models.llava_onevision.modeling_llava_onevision",
}


def modeling(config):
    return importlib.import_module(MODULES[config.model_type])


def num_crops(config, size: tuple[int, int]) -> int:
    """Crops (base + tiles) the model cuts an image of ``size`` (h, w) px into."""
    return modeling(config).image_size_to_num_patches(
        image_size=list(size),
        grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )


def pack(config, feats: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor):
    """The model's own ``pack_image_features`` (it reads only ``config``): ``(L_i, d)`` per image.

    Args:
        feats: per image ``(crops, side**2, d)``; sizes: ``(B, 2)`` (h, w) px; newline ``(d,)``.
    """
    owner = SimpleNamespace(config=config)
    if config.model_type == "llava_next":
        fn = modeling(config).LlavaNextModel.pack_image_features
        out = fn(owner, feats, sizes, config.vision_feature_select_strategy, image_newline=newline)
    else:
        fn = modeling(config).LlavaOnevisionModel.pack_image_features
        out = fn(owner, feats, sizes, newline, vision_aspect_ratio=config.vision_aspect_ratio)
    return out[0]


def image_layout(config, size: tuple[int, int], crops: int | None = None) -> torch.Tensor:
    """``(side, rows, cols, single)`` of an image of ``size`` (h, w) px: where the newlines land."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    crops = num_crops(config, size) if crops is None else crops
    dummy = torch.zeros(crops, side * side, 1)
    packed = pack(config, [dummy], torch.tensor([list(size)]), torch.ones(1))[0][:, 0]
    try:
        return packed_layout(side, (packed == 1).nonzero()[:, 0], packed.shape[0], crops == 1)
    except ModelError as err:
        raise ModelError(f"an image of {size[1]}x{size[0]} px: {err}") from None


def packed_layout(side: int, lines: torch.Tensor, length: int, single: bool) -> torch.Tensor:
    """The layout of a packed image of ``length`` tokens whose newlines sit at ``lines``
    (ascending slots): a ``side x side`` base, then newline-ended tile rows (``single``: the
    base and one newline)."""
    base = side * side
    if single:
        rows = cols = 0
    else:
        rows = lines.shape[0]
        cols = (length - base) // max(rows, 1) - 1
    layout = torch.tensor([side, rows, cols, int(single)])
    expected = base + rows * (cols + 1) + int(single)
    if not torch.equal(lines.cpu(), layout_block(layout)[2]) or expected != length:
        raise ModelError(
            f"{length} packed tokens with newlines at {lines.tolist()}: not a base crop of "
            f"{side}x{side} then newline-ended rows"
        )
    return layout


@lru_cache(maxsize=256)
def _layout_block(side: int, rows: int, cols: int, single: int):
    base = side * side
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    tiles = (base + r * (cols + 1) + c).flatten()
    slots = torch.cat([torch.arange(base), tiles])  # (N,)
    fixed = base + torch.arange(rows) * (cols + 1) + cols if not single else torch.tensor([base])
    return slots.shape[0], slots, fixed


def layout_block(layout: torch.Tensor):
    """``(N, slots (N,), newline slots (M,))`` of a layout ``(side, rows, cols, single)``."""
    return _layout_block(*(int(x) for x in layout))


def layout_cells(layout: torch.Tensor) -> torch.Tensor:
    """Each selectable token's (row, col) ``(N, 2)``: tile tokens on the unpadded tile grid,
    base tokens' centres scaled onto it (untiled: the base grid)."""
    side, rows, cols, single = (int(x) for x in layout)
    if single:
        rows = cols = side
    i = torch.arange(side)
    br, bc = ((2 * i + 1) * rows) // (2 * side), ((2 * i + 1) * cols) // (2 * side)
    base = torch.stack([br.repeat_interleave(side), bc.repeat(side)], dim=1)
    if single:
        return base
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([base, torch.stack([r.flatten(), c.flatten()], dim=1)])


def default_layout_of(config) -> torch.Tensor:
    """The layout of the default image: a square one of the tower's size."""
    s = config.vision_config.image_size
    return image_layout(config, (s, s))
