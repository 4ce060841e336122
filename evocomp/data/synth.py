"""Write a built-in benchmark (shapes-vqa, scenes-vqa) in the LLaVA instruction format.

evocomp synth --n 1000 --seed 1 --out data/raw/shapes-vqa
evocomp synth --benchmark scenes --grid 12 --n 1000 --seed 1 --out data/raw/scenes-vqa
evocomp synth --benchmark scenes --objects 2-5 --background plain --seed 7 --out held-out
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evocomp.data import scenes, scenes_qa, shapes, variants
from evocomp.data.shapes import GRID, QA, make_question, make_scene, render

BENCHMARKS = ("shapes", "scenes")
DEFAULT_BACKGROUND = {"shapes": "plain", "scenes": "texture"}
DEFAULT_OBJECTS = {"shapes": shapes.N_OBJECTS, "scenes": scenes.N_OBJECTS}


@dataclass(frozen=True)
class Variant:
    """How a generated set departs from its benchmark's defaults (None: the default)."""

    objects: tuple[int, int] | None = None  # (min, max) objects per image
    background: str | None = None  # a ``variants.STYLES`` name

    def resolved(self, benchmark: str) -> tuple[tuple[int, int], str]:
        return (
            tuple(self.objects or DEFAULT_OBJECTS[benchmark]),
            self.background or DEFAULT_BACKGROUND[benchmark],
        )

    def meta(self, benchmark: str) -> dict:
        """What differs from the defaults, for each record's metadata (empty: nothing)."""
        objects, background = self.resolved(benchmark)
        out: dict = {}
        if objects != DEFAULT_OBJECTS[benchmark]:
            out["objects"] = list(objects)
        if background != DEFAULT_BACKGROUND[benchmark]:
            out["background"] = background
        return out


def check_variant(benchmark: str, variant: Variant) -> None:
    """ValueError naming the option when the variant cannot be generated."""
    objects, background = variant.resolved(benchmark)
    variants.check_style(background)
    if benchmark == "shapes":
        shapes.check_objects(objects)
    else:
        scenes.check_objects(objects)


def check_benchmark(benchmark: str, grid: int | None) -> int:
    """The benchmark's grid (patches per side); ValueError naming the bad option."""
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}"
        )
    if benchmark == "shapes":
        if grid not in (None, GRID):
            raise ValueError(
                f"shapes-vqa is {GRID} x {GRID} patches; --grid is for --benchmark scenes"
            )
        return GRID
    grid = scenes.GRID if grid is None else grid
    scenes.check_grid(grid)
    return grid


def write_dataset(
    out: str | Path,
    n: int,
    seed: int,
    questions_per_image: int = 1,
    benchmark: str = "shapes",
    grid: int | None = None,
    variant: Variant = Variant(),
) -> Path:
    """Write ``n`` images and a LLaVA-format ``dataset.json`` to ``out``; deterministic by seed.

    ``grid`` (patches per side) is scenes-vqa's (default 12); shapes-vqa is always 6 x 6.
    ``variant`` changes the object-count range or the background (a held-out variant); each
    record's ``metadata.variant`` says how, when it does.
    """
    grid = check_benchmark(benchmark, grid)  # before anything is written
    check_variant(benchmark, variant)
    objects, background = variant.resolved(benchmark)
    departs = variant.meta(benchmark)
    sample = _shapes_sample if benchmark == "shapes" else _scenes_sample
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name = f"images/{seed:04d}_{i:07d}.png"
        spec = Spec(grid, objects, background, f"{benchmark}-{seed}-{i}")
        metas, conv, turns = sample(rng, out / name, questions_per_image, spec)
        meta = {"grid": [grid, grid], "objects": metas, "turns": turns}
        records.append(
            {
                "id": f"{benchmark}-{seed}-{i}",
                "image": name,
                "conversations": conv,
                "metadata": meta | ({"variant": departs} if departs else {}),
            }
        )
    path = out / "dataset.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    return path


Sample = tuple[list[dict], list[dict], list[dict]]  # metadata objects, conversation, turn meta


@dataclass(frozen=True)
class Spec:
    """One image's generation settings."""

    grid: int
    objects: tuple[int, int]
    background: str
    key: str  # the sample's id


def _shapes_sample(rng: random.Random, image: Path, questions: int, spec: Spec) -> Sample:
    objs = make_scene(rng, spec.objects)
    # shapes-vqa scenes draw no background seed (scenes-vqa's do): one keyed by the sample and
    # not drawn from ``rng``, so a background variant holds the same objects and questions
    noise_seed = random.Random(spec.key).getrandbits(32) if spec.background != "plain" else 0
    render(objs, spec.background, noise_seed).save(image, optimize=False)
    conv, turns = _conversation(lambda: make_question(objs, rng), questions)
    objects = [
        {
            "colour": o.colour,
            "shape": o.shape,
            "cell": o.cell,
            "patches": [o.cell],
            "box": list(o.box),
        }
        for o in objs
    ]
    return objects, conv, turns


def _scenes_sample(rng: random.Random, image: Path, questions: int, spec: Spec) -> Sample:
    scene = scenes.make_scene(rng, spec.grid, spec.objects)
    scenes.render(scene, spec.background).save(image, optimize=False)
    conv, turns = _conversation(lambda: scenes_qa.make_question(scene, rng), questions)
    return [scenes.object_meta(o) for o in scene.objects], conv, turns


def _conversation(ask: Callable[[], QA], questions: int) -> tuple[list[dict], list[dict]]:
    """``questions`` distinct turns (a repeat would be the same sample) and their meta."""
    turns, conv = [], []
    asked: set[str] = set()
    for t in range(questions):
        qa = ask()
        for _ in range(50):
            if qa.question not in asked:
                break
            qa = ask()
        asked.add(qa.question)
        prefix = "<image>\n" if t == 0 else ""
        conv += [
            {"from": "human", "value": prefix + qa.question},
            {"from": "gpt", "value": qa.answer},
        ]
        turns.append({"qtype": qa.qtype, "relevant": list(qa.relevant)})
    return conv, turns
