"""The built-in benchmark ``shapes-vqa``: coloured shapes, questions on small regions.

Each image is a 6 x 6 grid of 16-px cells (96 x 96 px, one visual token per cell
on the reference model); 3-6 objects, each 10-14 px and inside its own cell, so
an object covers exactly one patch and the tokens a question needs are known.
Four question types, one-word answers:

- ``colour``: "what colour is the <shape> ?" (the shape is unique in the image)
- ``shape``:  "what shape is the <colour> object ?" (the colour is unique)
- ``exists``: "is there a <colour> <shape> ?" (half yes; a "no" shares colour or shape
  with a present object, so it cannot be answered from the colour or shape alone)
- ``count``:  "how many <colour> objects are there ?" (0-3)

``relevant`` (the patches that hold the answer) drives the oracle selection and
the question-aware token dropout used to train the reference model.
The dataset writer is ``evocomp/synth.py`` (``evocomp synth``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from evocomp.data import variants

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
COUNT_WORDS = ("zero", "one", "two", "three")
QTYPES = ("colour", "shape", "exists", "count")
IMAGE_SIZE = 96
CELL = 16
GRID = IMAGE_SIZE // CELL  # 6 x 6 patches
BACKGROUND = (235, 235, 235)
N_OBJECTS = (3, 6)  # default range; held-out variants: synth --objects
MAX_OBJECTS = 3 * 4  # at most 3 per colour, 4 colours
# The word-level vocabulary the reference model speaks (tokenizer built from it).
WORDS = (
    "USER:",
    "ASSISTANT:",
    "what",
    "colour",
    "is",
    "the",
    "shape",
    "object",
    "?",
    "there",
    "a",
    "how",
    "many",
    "objects",
    "are",
    "yes",
    "no",
    "background",
    *COLOURS,
    *SHAPES,
    *COUNT_WORDS,
)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int  # patch index, row-major over the GRID x GRID grid
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str
    relevant: tuple[int, ...]  # patch indices that hold the answer


def check_objects(objects: tuple[int, int]) -> tuple[int, int]:
    """An object-count range that fits: at most 3 per colour (counts go up to "three")."""
    return variants.check_objects(objects, MAX_OBJECTS, "shapes")


def make_scene(rng: random.Random, objects: tuple[int, int] = N_OBJECTS) -> list[Obj]:
    """``objects`` (min, max; default 3-6) objects, distinct (colour, shape) pairs, at most 3
    per colour, one per cell."""
    n = rng.randint(*check_objects(objects))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(pairs)
    chosen: list[tuple[str, str]] = []
    for c, s in pairs:
        if sum(1 for cc, _ in chosen if cc == c) < 3:
            chosen.append((c, s))
        if len(chosen) == n:
            break
    cells = rng.sample(range(GRID * GRID), n)
    objs = []
    for (c, s), cell in zip(chosen, cells, strict=True):
        size = rng.randint(10, 14)
        r, q = divmod(cell, GRID)
        x0 = q * CELL + rng.randint(1, CELL - size - 1)
        y0 = r * CELL + rng.randint(1, CELL - size - 1)
        objs.append(Obj(c, s, cell, (x0, y0, x0 + size, y0 + size)))
    return objs


def render(objs: list[Obj], background: str = "plain", seed: int = 0) -> Image.Image:
    """The objects on a ``background`` style (``variants.py``; ``seed`` draws its noise)."""
    img = variants.draw(background, IMAGE_SIZE, seed, BACKGROUND[0])
    draw = ImageDraw.Draw(img)
    for o in objs:
        fill = COLOURS[o.colour]
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(o.box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross
            w = max(2, (x1 - x0) // 3)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.rectangle((cx - w // 2, y0, cx - w // 2 + w, y1), fill=fill)
            draw.rectangle((x0, cy - w // 2, x1, cy - w // 2 + w), fill=fill)
    return img


def make_question(objs: list[Obj], rng: random.Random, qtype: str | None = None) -> QA:
    """A question about the scene; qtype is drawn uniformly when not given."""
    qtype = qtype or rng.choice(QTYPES)
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}
    if qtype == "colour":
        unique = [s for s in SHAPES if len(by_shape[s]) == 1]
        if not unique:
            return make_question(objs, rng, "count")
        s = rng.choice(unique)
        o = by_shape[s][0]
        return QA(qtype, f"what colour is the {s} ?", o.colour, (o.cell,))
    if qtype == "shape":
        unique = [c for c in COLOURS if len(by_colour[c]) == 1]
        if not unique:
            return make_question(objs, rng, "count")
        c = rng.choice(unique)
        o = by_colour[c][0]
        return QA(qtype, f"what shape is the {c} object ?", o.shape, (o.cell,))
    if qtype == "exists":
        present = {(o.colour, o.shape) for o in objs}
        hard_no = [
            (c, s)
            for c in COLOURS
            for s in SHAPES
            if (c, s) not in present and (by_colour[c] or by_shape[s])
        ]
        if rng.random() < 0.5 or not hard_no:
            o = rng.choice(objs)
            return QA(qtype, f"is there a {o.colour} {o.shape} ?", "yes", (o.cell,))
        c, s = rng.choice(hard_no)
        rel = tuple(sorted(o.cell for o in objs if o.colour == c or o.shape == s))
        return QA(qtype, f"is there a {c} {s} ?", "no", rel)
    if qtype == "count":
        c = rng.choice(list(COLOURS))
        rel = tuple(sorted(o.cell for o in by_colour[c]))
        return QA(qtype, f"how many {c} objects are there ?", COUNT_WORDS[len(rel)], rel)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def oracle_order(relevant: tuple[int, ...] | list[int], objects: list[dict], n: int) -> list[int]:
    """All patches, most useful first: relevant ones, then background, then other objects.

    The oracle selection at budget k is ``sorted(oracle_order(...)[:k])``.
    """
    object_cells = {o["cell"] for o in objects}
    rel = list(relevant)
    background = [i for i in range(n) if i not in object_cells and i not in rel]
    others = [i for i in range(n) if i in object_cells and i not in rel]
    return rel + background + others
