"""Questions on a scenes-vqa scene (``scenes.py``), each with the patches its answer needs.

Six types, one-word answers. An object is *described* by its shape and/or colour, with its
size word when that is needed, and a description is used only when exactly one object in
the image fits it ("the large triangle": one large triangle, maybe other triangles).

- ``colour``: "what colour is the [size] <shape> ?" (another object shares the target's
  colour or shape, so the answer is not the only one of its kind)
- ``shape``: "what shape is the [size] <colour> object ?" (likewise)
- ``exists``: "is there a(n) <colour> <shape> ?" (half yes; every no is a near miss: the colour
  is in the image on another shape and the shape in another colour)
- ``count``: "how many <colour> objects are there ?" / "how many <shape>s are there ?" (zero-six)
- ``spatial``: "is the <A> left of the <B> ?" / "is the <A> above the <B> ?" (yes/no; A and B
  described uniquely; asked only when their footprints share no column (row), so one is
  strictly left of (above) the other)
- ``position``: "what shape is in the <region> ?" / "what colour is the object in the
  <region> ?", the regions being the image's 3 x 3 thirds (top left ... centre ... bottom
  right); asked only of a region that holds one object whole and touches no other.

``relevant`` holds the patches of every object the answer depends on: the described
object(s); the counted ones; for an existence yes every match, for a no every near miss.
"""

from __future__ import annotations

import random

from evocomp.data.scenes import COLOURS, SHAPES, SIZES, Obj, Scene
from evocomp.data.shapes import QA

QTYPES = ("colour", "shape", "exists", "count", "spatial", "position")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "middle", "right")
REGIONS = tuple(
    "centre" if (r, c) == ("middle", "middle") else f"{r} {c}" for r in ROWS for c in COLS
)
# Every word a question or answer uses (for a word-level tokenizer).
WORDS = tuple(
    dict.fromkeys(
        [
            "USER:",
            "ASSISTANT:",
            "what",
            "colour",
            "shape",
            "is",
            "the",
            "object",
            "in",
            "a",
            "an",
            "there",
            "how",
            "many",
            "objects",
            "are",
            "left",
            "of",
            "above",
            "yes",
            "no",
            "background",
            "?",
            "top",
            "middle",
            "bottom",
            "right",
            "centre",
        ]
        + [*COLOURS, *SHAPES, *PLURALS.values(), *SIZES, *COUNT_WORDS]
    )
)

Desc = tuple[str | None, str | None, str | None]  # size, colour, shape


def _fits(o: Obj, d: Desc) -> bool:
    size, colour, shape = d
    return (
        (size or o.size) == o.size
        and (colour or o.colour) == o.colour
        and (shape or o.shape) == o.shape
    )


def phrase(d: Desc) -> str:
    size, colour, shape = d
    return " ".join(w for w in (size, colour, shape or "object") if w)


def descriptions(o: Obj, objs: tuple[Obj, ...], colour: bool, shape: bool) -> list[Desc]:
    """The descriptions of ``o`` (with or without its size) that fit no other object."""
    out = []
    for size in (None, o.size):
        d = (size, o.colour if colour else None, o.shape if shape else None)
        if sum(_fits(x, d) for x in objs) == 1:
            out.append(d)
    return out


def _patches(objs) -> tuple[int, ...]:
    return tuple(sorted(p for o in objs for p in o.patches))


def _attribute(scene: Scene, rng: random.Random, qtype: str) -> QA | None:
    objs = scene.objects
    by_shape = qtype == "colour"  # ask the colour of a shape, or the shape of a colour
    targets = [
        (o, d)
        for o in objs
        if any(x is not o and (x.colour == o.colour or x.shape == o.shape) for x in objs)
        for d in descriptions(o, objs, colour=not by_shape, shape=by_shape)
    ]
    if not targets:
        return None
    o, d = rng.choice(targets)
    if by_shape:
        return QA(qtype, f"what colour is the {phrase(d)} ?", o.colour, o.patches)
    return QA(qtype, f"what shape is the {phrase(d)} ?", o.shape, o.patches)


def _exists(scene: Scene, rng: random.Random) -> QA:
    objs = scene.objects
    present = {(o.colour, o.shape) for o in objs}
    near_misses = [
        (c, s)
        for c in COLOURS
        for s in SHAPES
        if (c, s) not in present
        and any(o.colour == c for o in objs)
        and any(o.shape == s for o in objs)
    ]
    if near_misses and rng.random() < 0.5:
        c, s = rng.choice(near_misses)
        rel = _patches(o for o in objs if o.colour == c or o.shape == s)
        return QA("exists", f"is there {_a(c)} {c} {s} ?", "no", rel)
    c, s = rng.choice(sorted(present))
    rel = _patches(o for o in objs if (o.colour, o.shape) == (c, s))
    return QA("exists", f"is there {_a(c)} {c} {s} ?", "yes", rel)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count(scene: Scene, rng: random.Random) -> QA:
    if rng.random() < 0.5:
        c = rng.choice(list(COLOURS))
        counted = [o for o in scene.objects if o.colour == c]
        question = f"how many {c} objects are there ?"
    else:
        s = rng.choice(SHAPES)
        counted = [o for o in scene.objects if o.shape == s]
        question = f"how many {PLURALS[s]} are there ?"
    return QA("count", question, COUNT_WORDS[len(counted)], _patches(counted))


def _any_description(o: Obj, objs: tuple[Obj, ...], rng: random.Random) -> Desc | None:
    ds = [
        d
        for c, s in ((True, False), (False, True), (True, True))
        for d in descriptions(o, objs, c, s)
    ]
    return rng.choice(ds) if ds else None


def _spatial(scene: Scene, rng: random.Random) -> QA | None:
    objs = scene.objects
    relations = [("left of", 0), ("above", 1)]
    rng.shuffle(relations)
    for word, axis in relations:  # axis 0: columns, 1: rows of the footprints
        pairs = [
            (a, b)
            for a in objs
            for b in objs
            if a.footprint[axis] + a.footprint[axis + 2] <= b.footprint[axis]
        ]  # a strictly left of / above b
        rng.shuffle(pairs)
        for a, b in pairs:
            da, db = _any_description(a, objs, rng), _any_description(b, objs, rng)
            if da and db:
                if rng.random() < 0.5:
                    q, answer = f"is the {phrase(da)} {word} the {phrase(db)} ?", "yes"
                else:
                    q, answer = f"is the {phrase(db)} {word} the {phrase(da)} ?", "no"
                return QA("spatial", q, answer, _patches((a, b)))
    return None


def region_of(patch: int, grid: int) -> str:
    r, c = divmod(patch, grid)
    return REGIONS[(r * 3 // grid) * 3 + c * 3 // grid]


def _position(scene: Scene, rng: random.Random) -> QA | None:
    grid = scene.grid
    regions = {}
    for o in scene.objects:
        c0, r0, w, h = o.footprint
        touched = {
            region_of(r * grid + c, grid) for r in range(r0, r0 + h) for c in range(c0, c0 + w)
        }
        for name in touched:
            regions.setdefault(name, []).append((o, len(touched) == 1))
    alone = [(name, os[0][0]) for name, os in regions.items() if len(os) == 1 and os[0][1]]
    if not alone:
        return None
    name, o = rng.choice(sorted(alone, key=lambda x: REGIONS.index(x[0])))
    if rng.random() < 0.5:
        return QA("position", f"what shape is in the {name} ?", o.shape, o.patches)
    return QA("position", f"what colour is the object in the {name} ?", o.colour, o.patches)


def make_question(scene: Scene, rng: random.Random, qtype: str | None = None) -> QA:
    """A question about the scene; qtype is drawn uniformly when not given (a type the scene
    cannot pose, e.g. no region holding one object alone, falls back to ``count``)."""
    qtype = qtype or rng.choice(QTYPES)
    if qtype in ("colour", "shape"):
        qa = _attribute(scene, rng, qtype)
    elif qtype == "exists":
        qa = _exists(scene, rng)
    elif qtype == "count":
        qa = _count(scene, rng)
    elif qtype == "spatial":
        qa = _spatial(scene, rng)
    elif qtype == "position":
        qa = _position(scene, rng)
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    return qa or _count(scene, rng)


# ---- where a question names its objects (for supervising the reference LM's lookups) ----------


def _described(scene: Scene, words: list[str]) -> tuple[int, ...]:
    """The patches of the one object of ``scene`` that the description ``words`` fit."""
    d = (
        next((w for w in words if w in SIZES), None),
        next((w for w in words if w in COLOURS), None),
        next((w for w in words if w in SHAPES), None),
    )
    fits = [o for o in scene.objects if _fits(o, d)]
    return tuple(fits[0].patches) if len(fits) == 1 else ()


def description_targets(scene: Scene, qa: QA) -> list[tuple[int, set[int]]]:
    """(index of a description's last word in ``qa.question``'s words, the patches it names):
    each phrase that picks out objects, at the word where a causal LM has read all of it.
    A spatial question names two objects; a count question its counted ones; the others
    one phrase, ending right before "?" (an existence question's matches or near misses,
    a position question's region and the object in it)."""
    words = qa.question.split()
    if qa.qtype == "spatial":
        k = words.index("left" if "left" in words else "above")
        out = [
            (k - 1, _described(scene, words[2:k])),
            (len(words) - 2, _described(scene, words[k + 2 :])),
        ]
    elif qa.qtype == "count":
        out = [(len(words) - 4, tuple(qa.relevant))]
    else:
        out = [(len(words) - 2, tuple(qa.relevant))]
    return [(i, set(ps)) for i, ps in out if ps]


def lookups(scene: Scene, qa: QA) -> list[tuple[int, Obj]]:
    """(index of a description's last word, the one object it names) for each phrase of
    ``qa`` that names exactly one object: a spatial question's two, an attribute or a
    position question's one, an existence question's match when it is the only one."""
    if qa.qtype == "count" or (qa.qtype == "exists" and qa.answer != "yes"):
        return []
    by_patches = {frozenset(o.patches): o for o in scene.objects}
    out = []
    for i, patches in description_targets(scene, qa):
        o = by_patches.get(frozenset(patches))
        if o is not None:
            out.append((i, o))
    return out
