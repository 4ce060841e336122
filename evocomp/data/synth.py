"""Write the built-in shapes-vqa benchmark in the LLaVA instruction format.

evocomp synth --n 1000 --seed 1 --out data/raw/shapes-vqa
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from evocomp.data.shapes import GRID, make_question, make_scene, render


def write_dataset(out: str | Path, n: int, seed: int, questions_per_image: int = 1) -> Path:
    """Write ``n`` images and a LLaVA-format ``dataset.json`` to ``out``; deterministic by seed."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        objs = make_scene(rng)
        name = f"images/{seed:04d}_{i:07d}.png"
        render(objs).save(out / name, optimize=False)
        turns, conv = [], []
        asked: set[str] = set()
        for t in range(questions_per_image):
            qa = make_question(objs, rng)
            for _ in range(50):  # distinct questions per image (a repeat would be the same sample)
                if qa.question not in asked:
                    break
                qa = make_question(objs, rng)
            asked.add(qa.question)
            prefix = "<image>\n" if t == 0 else ""
            conv += [
                {"from": "human", "value": prefix + qa.question},
                {"from": "gpt", "value": qa.answer},
            ]
            turns.append({"qtype": qa.qtype, "relevant": list(qa.relevant)})
        records.append(
            {
                "id": f"shapes-{seed}-{i}",
                "image": name,
                "conversations": conv,
                "metadata": {
                    "grid": [GRID, GRID],
                    "objects": [
                        {
                            "colour": o.colour,
                            "shape": o.shape,
                            "cell": o.cell,
                            "patches": [o.cell],
                            "box": list(o.box),
                        }
                        for o in objs
                    ],
                    "turns": turns,
                },
            }
        )
    path = out / "dataset.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    return path
