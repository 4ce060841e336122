"""The scenes-vqa generator: scene rules, every answer re-derived from the scene, the writer, the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from evocomp.audit.keep import CLASSES, token_classes
from evocomp.cli import app
from evocomp.data import scenes, scenes_qa
from evocomp.data.readers import read_dataset
from evocomp.data.scenes import COLOURS, SHAPES, SIZES
from evocomp.data.synth import write_dataset

runner = CliRunner()


def scenes_for(seeds, grid=12, per_seed=20):
    for seed in seeds:
        rng = random.Random(seed)
        for _ in range(per_seed):
            yield scenes.make_scene(rng, grid), rng


def footprint_cells(o, grid):
    c0, r0, w, h = o.footprint
    return {r * grid + c for r in range(r0, r0 + h) for c in range(c0, c0 + w)}


@pytest.mark.parametrize("grid", [6, 12, 24])
def test_scene_rules(grid):
    sizes = set()
    for scene, _ in scenes_for(range(10), grid):
        objs = scene.objects
        assert 6 <= len(objs) <= 16
        taken: set[int] = set()
        for o in objs:
            c0, r0, w, h = o.footprint
            assert 1 <= w <= 3 and 1 <= h <= 3 and c0 + w <= grid and r0 + h <= grid
            cells = footprint_cells(o, grid)
            assert not cells & taken, "footprints overlap"
            taken |= cells
            assert 1 <= len(o.patches) <= 9 and set(o.patches) <= cells
            assert o.size == SIZES[max(w, h) - 1]
            sizes.add(len(o.patches))
        for name in (*COLOURS, *SHAPES):  # counts stay words up to six
            assert sum(name in (o.colour, o.shape) for o in objs) <= 6
    assert {1, 2, 3, 4, 6, 9} <= sizes


def test_patches_are_the_pixels():
    """An object's patches are exactly the footprint patches that show its colour."""
    for scene, _ in scenes_for(range(2), per_seed=3):
        img = scenes.render(scene)
        assert img.size == (192, 192)
        px = img.load()
        for o in scene.objects:
            for p in footprint_cells(o, 12):
                r, c = divmod(p, 12)
                span = [
                    (x, y) for x in range(c * 16, c * 16 + 16) for y in range(r * 16, r * 16 + 16)
                ]
                assert any(px[xy] == o.rgb for xy in span) == (p in o.patches)
        empty = set(range(144)) - {p for o in scene.objects for p in footprint_cells(o, 12)}
        crops = [
            img.crop((p % 12 * 16, p // 12 * 16, p % 12 * 16 + 16, p // 12 * 16 + 16))
            for p in empty
        ]
        assert len({c.tobytes() for c in crops}) == len(empty)  # no two background tokens alike
        grey = [
            c.convert("L").resize((1, 1), resample=Image.Resampling.BOX).getpixel((0, 0))
            for c in crops
        ]
        assert max(grey) - min(grey) > 20, "the background is not textured"


# An independent reader of the questions: parses each one and answers it from the scene.


def fits(o, words):
    size = next((w for w in words if w in SIZES), None)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    assert set(words) <= {size, colour, shape, "object"}, words
    return (size in (None, o.size)) and (colour in (None, o.colour)) and (shape in (None, o.shape))


def the(objs, phrase):
    """The one object a description names (asserts it is unique)."""
    found = [o for o in objs if fits(o, phrase.split())]
    assert len(found) == 1, f"{phrase!r} names {len(found)} objects"
    return found[0]


def patches(objs):
    return sorted(p for o in objs for p in o.patches)


def solve(scene, qa):
    """(answer, objects the answer depends on), derived from the question text."""
    objs, q = scene.objects, qa.question
    if m := re.fullmatch(
        r"what (colour|shape) is in the (.+) \?|what (colour) is the object in the (.+) \?", q
    ):
        attr, region = (m[1], m[2]) if m[1] else (m[3], m[4])
        touching = [
            o
            for o in objs
            if any(
                scenes_qa.region_of(p, scene.grid) == region for p in footprint_cells(o, scene.grid)
            )
        ]
        assert len(touching) == 1, f"{q!r}: {len(touching)} objects touch the region"
        (o,) = touching
        assert {scenes_qa.region_of(p, scene.grid) for p in footprint_cells(o, scene.grid)} == {
            region
        }
        return getattr(o, attr), [o]
    if m := re.fullmatch(r"what (colour|shape) is the (.+) \?", q):
        o = the(objs, m[2])
        assert getattr(o, m[1]) not in m[2].split()  # the question does not name its answer
        assert any(x is not o and (x.colour == o.colour or x.shape == o.shape) for x in objs)
        return getattr(o, m[1]), [o]
    if m := re.fullmatch(r"is there an? (\w+) (\w+) \?", q):
        match = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        if match:
            return "yes", match
        assert any(o.colour == m[1] for o in objs) and any(o.shape == m[2] for o in objs), q
        return "no", [o for o in objs if o.colour == m[1] or o.shape == m[2]]
    if m := re.fullmatch(r"how many (\w+) objects are there \?", q):
        counted = [o for o in objs if o.colour == m[1]]
        return scenes_qa.COUNT_WORDS[len(counted)], counted
    if m := re.fullmatch(r"how many (\w+) are there \?", q):
        counted = [o for o in objs if scenes_qa.PLURALS[o.shape] == m[1]]
        return scenes_qa.COUNT_WORDS[len(counted)], counted
    if m := re.fullmatch(r"is the (.+) (left of|above) the (.+) \?", q):
        a, b = the(objs, m[1]), the(objs, m[3])
        axis = 0 if m[2] == "left of" else 1

        def before(x, y):
            return x.footprint[axis] + x.footprint[axis + 2] <= y.footprint[axis]

        assert before(a, b) or before(b, a), f"{q!r}: neither is strictly {m[2]} the other"
        return ("yes" if before(a, b) else "no"), [a, b]
    raise AssertionError(f"unparsed question {q!r}")


@pytest.mark.parametrize("grid", [12, 24])
@pytest.mark.parametrize("qtype", scenes_qa.QTYPES)
def test_every_answer_follows_from_the_scene(qtype, grid):
    asked = 0
    for scene, rng in scenes_for(range(4), grid, per_seed=15):
        qa = scenes_qa.make_question(scene, rng, qtype)
        answer, needed = solve(scene, qa)
        assert qa.answer == answer, qa
        assert list(qa.relevant) == patches(needed), qa  # the oracle holds the answer's objects
        asked += qa.qtype == qtype
    assert asked >= 40, f"{qtype}: {asked}/60 asked as such (the rest fell back to count)"


def test_question_mix():
    qas = [scenes_qa.make_question(s, rng) for s, rng in scenes_for(range(10))]
    by_type = {t: [qa for qa in qas if qa.qtype == t] for t in scenes_qa.QTYPES}
    assert all(len(v) >= 10 for v in by_type.values()), {t: len(v) for t, v in by_type.items()}
    for t in ("exists", "spatial"):
        yes = sum(qa.answer == "yes" for qa in by_type[t]) / len(by_type[t])
        assert 0.25 < yes < 0.75, (t, yes)
    counts = [scenes_qa.COUNT_WORDS.index(qa.answer) for qa in by_type["count"]]
    assert max(counts) <= 6 and len(set(counts)) >= 3
    words = set(scenes_qa.WORDS)
    assert all(set(qa.question.split() + [qa.answer]) <= words for qa in qas)


def test_oracle_order():
    scene = scenes.make_scene(random.Random(0))
    qa = scenes_qa.make_question(scene, random.Random(0), "spatial")
    objects = [scenes.object_meta(o) for o in scene.objects]
    order = scenes.oracle_order(qa.relevant, objects, 144)
    assert sorted(order) == list(range(144))
    assert set(order[: len(qa.relevant)]) == set(qa.relevant)
    # the two objects' anchors (first patches) lead
    rel = [o for o in objects if set(o["patches"]) & set(qa.relevant)]
    assert len(rel) == 2 and order[:2] == sorted(min(o["patches"]) for o in rel)


def digest(path):
    h = hashlib.sha256((path / "dataset.json").read_bytes())
    for f in sorted((path / "images").iterdir()):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_dataset(tmp_path / name, n=3, seed=seed, questions_per_image=2, benchmark="scenes")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_shapes_bytes_unchanged(tmp_path):
    """shapes-vqa is DVC-versioned: the benchmark choice must not move a byte of it."""
    write_dataset(tmp_path, n=3, seed=1, questions_per_image=2)
    assert digest(tmp_path) == "ea221618b17de2485ab71a0efaea05b6a68045ceeefbae984b433df8d048baf0"


@pytest.mark.parametrize(("grid", "px"), [(12, 192), (24, 384)])
def test_grid_sizes(tmp_path, grid, px):
    path = write_dataset(tmp_path, n=2, seed=0, benchmark="scenes", grid=grid)
    for rec in json.loads(path.read_text()):
        assert Image.open(tmp_path / rec["image"]).size == (px, px)
        meta = rec["metadata"]
        assert meta["grid"] == [grid, grid]
        assert all(0 <= p < grid * grid for o in meta["objects"] for p in o["patches"])
        assert set(meta["objects"][0]) >= {"colour", "shape", "patches"}


def invoke(*args):
    return runner.invoke(app, list(args))


def test_cli_synth_then_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("synth", "--benchmark", "scenes", "--n", "4", "--questions", "2", "--seed", "5")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "data/raw/scenes-vqa/dataset.json").is_file()  # the benchmark's folder
    res = invoke("prepare", "--source", "data/raw/scenes-vqa", "--out", "prep")
    assert res.exit_code == 0 and "8 samples" in res.output, res.output
    samples = read_dataset("data/raw/scenes-vqa")
    for s in samples:
        assert s.meta["qtype"] in scenes_qa.QTYPES and s.meta["grid"] == [12, 12]
        cls = token_classes(s.meta, 144)
        assert cls is not None
        assert sorted(i for i, c in enumerate(cls) if c == CLASSES.index("answer")) == sorted(
            s.meta["relevant"]
        )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--benchmark", "scenes", "--grid", "3"), "--grid must be 6-64"),
        (("--benchmark", "scenes", "--grid", "100"), "--grid must be 6-64"),
        (("--benchmark", "cubes"), "unknown benchmark 'cubes'"),
        (("--grid", "12"), "--grid is for --benchmark scenes"),
    ],
)
def test_cli_bad_options(tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    res = invoke("synth", "--n", "2", "--out", "raw", *args)
    assert res.exit_code == 2, res.output
    assert match in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "raw").exists()  # nothing half-written
