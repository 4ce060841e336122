"""The built-in benchmark ``scenes-vqa``: many objects of varied size on a textured background.

A paper-scale companion to shapes-vqa (``shapes.py``). An image is ``grid x grid`` patches of
16 px: 12 x 12 = 144 visual tokens (192 px) by default, 24 x 24 = 576 tokens (384 px) at
``--grid 24``. It holds 6-16 objects of 6 colours x 6 shapes; colours and shapes repeat, at
most 6 objects share a colour or a shape (so every count is a word up to "six"). The
background is seeded grey blotches plus pixel noise, so no two background tokens are alike.

Placement: each object owns a patch-aligned footprint of ``w x h`` patches (1 <= w, h <= 3)
anywhere on the image; footprints never overlap. The shape is drawn stretched to fill its
footprint less a 1-3 px margin, and its ``patches`` are the footprint patches its pixels
actually touch (a 3 x 3 triangle leaves its two top corners empty: 7 patches), so an object
covers 1-9 patches and no patch holds two objects. Its size word is its footprint's longer
side: small (1 patch), medium (2), large (3).

Questions: ``scenes_qa.py``. Writer: ``synth.py`` (``evocomp synth --benchmark scenes``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from evocomp.data import variants

COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 135, 20),
    "yellow": (230, 210, 30),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "purple": (140, 55, 195),
}
SHAPES = ("ellipse", "rectangle", "triangle", "cross", "diamond", "ring")
SIZES = ("small", "medium", "large")  # by the footprint's longer side: 1, 2, 3 patches
CELL = 16  # px per patch, as the vision tower sees them
GRID = 12  # default patches per side
GRID_RANGE = (6, 64)  # 6: a patch for each of MAX_OBJECTS; 64: a 1024 px image
N_OBJECTS = (6, 16)  # default range; held-out variants: synth --objects
PLAIN_GREY = 180  # the texture's mean: the plain and noise backgrounds' grey
MAX_SIDE = 3  # footprint side in patches, so an object covers at most 9
MAX_SAME = 6  # objects of one colour (or one shape)
MAX_OBJECTS = MAX_SAME * 6  # 6 colours
COLOUR_JITTER = 12  # per channel; the 6 colours stay far apart


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    footprint: tuple[int, int, int, int]  # col0, row0, cols, rows, in patches
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive
    rgb: tuple[int, int, int]
    patches: tuple[int, ...] = ()  # row-major patch indices its pixels touch

    @property
    def size(self) -> str:
        return SIZES[max(self.footprint[2:]) - 1]


@dataclass(frozen=True)
class Scene:
    grid: int  # patches per side
    objects: tuple[Obj, ...]
    background_seed: int  # render() draws the background noise from it

    @property
    def image_size(self) -> int:
        return self.grid * CELL


def check_grid(grid: int) -> None:
    lo, hi = GRID_RANGE
    if not lo <= grid <= hi:
        raise ValueError(f"scenes-vqa --grid must be {lo}-{hi} patches per side, got {grid}")


def _footprint(
    rng: random.Random, grid: int, taken: set[int], room: int
) -> tuple[int, int, int, int]:
    """A free patch-aligned rectangle of at most ``room`` patches: a random size and place,
    else any free single patch."""
    for _ in range(50):
        w, h = rng.randint(1, MAX_SIDE), rng.randint(1, MAX_SIDE)
        c0, r0 = rng.randint(0, grid - w), rng.randint(0, grid - h)
        if w * h <= room and not taken & _cells((c0, r0, w, h), grid):
            return c0, r0, w, h
    r0, c0 = divmod(rng.choice(sorted(set(range(grid * grid)) - taken)), grid)
    return c0, r0, 1, 1


def _cells(footprint: tuple[int, int, int, int], grid: int) -> set[int]:
    c0, r0, w, h = footprint
    return {r * grid + c for r in range(r0, r0 + h) for c in range(c0, c0 + w)}


def _capped(rng: random.Random, names: list[str], used: list[str]) -> str:
    return rng.choice([x for x in names if used.count(x) < MAX_SAME])


def check_objects(objects: tuple[int, int]) -> tuple[int, int]:
    """An object-count range that fits: at most ``MAX_OBJECTS`` (every count is a word up to
    "six"); the smallest grid, 6 x 6, has a patch for each."""
    return variants.check_objects(objects, MAX_OBJECTS, "scenes")


def make_scene(rng: random.Random, grid: int = GRID, objects: tuple[int, int] = N_OBJECTS) -> Scene:
    """``objects`` (min, max; default 6-16) objects on non-overlapping footprints, at most
    ``MAX_SAME`` per colour or shape."""
    check_grid(grid)
    check_objects(objects)
    taken: set[int] = set()
    objs: list[Obj] = []
    n = rng.randint(*objects)
    for k in range(n):
        room = grid * grid - len(taken) - (n - k - 1)  # leave a patch for each object to come
        fp = _footprint(rng, grid, taken, room)
        taken |= _cells(fp, grid)
        colour = _capped(rng, list(COLOURS), [o.colour for o in objs])
        shape = _capped(rng, list(SHAPES), [o.shape for o in objs])
        m = rng.randint(1, 3)
        c0, r0, w, h = fp
        box = (c0 * CELL + m, r0 * CELL + m, (c0 + w) * CELL - 1 - m, (r0 + h) * CELL - 1 - m)
        rgb = tuple(
            min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))
            for v in COLOURS[colour]
        )
        objs.append(Obj(colour, shape, fp, box, rgb))
    return Scene(grid, tuple(_with_patches(objs, grid)), rng.getrandbits(32))


def _with_patches(objs: list[Obj], grid: int) -> list[Obj]:
    """Each object with the patches its pixels touch (footprints are disjoint: one per patch)."""
    mask = Image.new("L", (grid * CELL, grid * CELL), 0)
    draw = ImageDraw.Draw(mask)
    for o in objs:
        draw_shape(draw, o.shape, o.box, 255)
    out = []
    for o in objs:
        touched = []
        for p in sorted(_cells(o.footprint, grid)):
            r, c = divmod(p, grid)
            if mask.crop((c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL)).getbbox():
                touched.append(p)
        out.append(replace(o, patches=tuple(touched)))
    return out


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """``shape`` stretched to fill ``box``; integer vertices, so a mask and the image agree."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    thin = min(x1 - x0, y1 - y0)
    if shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, thin // 5))
    elif shape == "cross":
        t = max(3, thin // 3)
        draw.rectangle((cx - t // 2, y0, cx - t // 2 + t - 1, y1), fill=fill)
        draw.rectangle((x0, cy - t // 2, x1, cy - t // 2 + t - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, background: str = "texture") -> Image.Image:
    """The scene's image on its ``background`` style (``variants.py``)."""
    img = variants.draw(background, scene.image_size, scene.background_seed, PLAIN_GREY)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_shape(draw, o.shape, o.box, o.rgb)
    return img


def object_meta(o: Obj) -> dict:
    """An object as the dataset's ``metadata.objects`` records it."""
    return {
        "colour": o.colour,
        "shape": o.shape,
        "size": o.size,
        "patches": list(o.patches),
        "footprint": list(o.footprint),
        "box": list(o.box),
    }


def oracle_order(relevant: tuple[int, ...] | list[int], objects: list[dict], n: int) -> list[int]:
    """All patches, most useful first: the anchor (first patch) of each object the answer
    needs, its other patches, then background, then other objects' patches.

    Anchors first because one patch per object already says what the object is (the
    reference model reads colour, shape, size and position off any of its patches, and
    counts objects by their anchors), so at a small k the oracle keeps every object the
    answer needs. The scenes-vqa twin of ``shapes.oracle_order``.
    """
    rel = list(relevant)
    rel_set = set(rel)
    first = sorted(min(o["patches"]) for o in objects if rel_set & set(o["patches"]))
    object_patches = {p for o in objects for p in o["patches"]}
    empty = [i for i in range(n) if i not in object_patches and i not in rel_set]
    others = [i for i in range(n) if i in object_patches and i not in rel_set]
    return first + [p for p in rel if p not in first] + empty + others
