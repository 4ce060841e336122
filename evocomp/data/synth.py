"""Write a built-in benchmark (shapes-vqa, scenes-vqa) in the LLaVA instruction format.

evocomp synth --n 1000 --seed 1 --out data/raw/shapes-vqa
evocomp synth --benchmark scenes --grid 12 --n 1000 --seed 1 --out data/raw/scenes-vqa
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from evocomp.data import scenes, scenes_qa
from evocomp.data.shapes import GRID, QA, make_question, make_scene, render

BENCHMARKS = ("shapes", "scenes")


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
) -> Path:
    """Write ``n`` images and a LLaVA-format ``dataset.json`` to ``out``; deterministic by seed.

    ``grid`` (patches per side) is scenes-vqa's (default 12); shapes-vqa is always 6 x 6.
    """
    grid = check_benchmark(benchmark, grid)  # before anything is written
    sample = _shapes_sample if benchmark == "shapes" else _scenes_sample
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name = f"images/{seed:04d}_{i:07d}.png"
        objects, conv, turns = sample(rng, out / name, questions_per_image, grid)
        records.append(
            {
                "id": f"{benchmark}-{seed}-{i}",
                "image": name,
                "conversations": conv,
                "metadata": {"grid": [grid, grid], "objects": objects, "turns": turns},
            }
        )
    path = out / "dataset.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    return path


Sample = tuple[list[dict], list[dict], list[dict]]  # metadata objects, conversation, turn meta


def _shapes_sample(rng: random.Random, image: Path, questions: int, grid: int) -> Sample:
    objs = make_scene(rng)
    render(objs).save(image, optimize=False)
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


def _scenes_sample(rng: random.Random, image: Path, questions: int, grid: int) -> Sample:
    scene = scenes.make_scene(rng, grid)
    scenes.render(scene).save(image, optimize=False)
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
