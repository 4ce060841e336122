from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from evocomp.data import shapes
from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset, read_jsonl, read_llava
from evocomp.data.synth import write_dataset
from evocomp.errors import DatasetError


def test_synth_is_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", n=5, seed=7)
    b = write_dataset(tmp_path / "b", n=5, seed=7)
    assert a.read_text() == b.read_text()
    for img in (tmp_path / "a" / "images").iterdir():
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()


@pytest.mark.parametrize("seed", range(5))
def test_scene_rules(seed):
    rng = random.Random(seed)
    for _ in range(50):
        objs = shapes.make_scene(rng)
        assert 3 <= len(objs) <= 6
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        assert len({o.cell for o in objs}) == len(objs)
        assert max(sum(o.colour == c for o in objs) for c in shapes.COLOURS) <= 3
        for o in objs:  # each object inside its own cell: covers exactly one patch
            r, c = divmod(o.cell, shapes.GRID)
            x0, y0, x1, y1 = o.box
            assert c * shapes.CELL < x0 and x1 < (c + 1) * shapes.CELL
            assert r * shapes.CELL < y0 and y1 < (r + 1) * shapes.CELL
        qa = shapes.make_question(objs, rng)
        cells = {o.cell: o for o in objs}
        if qa.qtype == "count":
            assert shapes.COUNT_WORDS.index(qa.answer) == len(qa.relevant)
        if qa.qtype in ("colour", "shape"):
            (cell,) = qa.relevant
            assert qa.answer in (cells[cell].colour, cells[cell].shape)


def test_question_types_balanced():
    rng = random.Random(0)
    counts = {q: 0 for q in shapes.QTYPES}
    for _ in range(2000):
        counts[shapes.make_question(shapes.make_scene(rng), rng).qtype] += 1
    assert all(c > 350 for c in counts.values()), counts


def test_llava_reader_one_sample_per_turn(shapes_data):
    samples = read_dataset(shapes_data)
    assert len(samples) == 80  # 40 images x 2 turns (duplicates of the same Q/A would merge)
    assert {s.split for s in samples} <= {"train", "val", "test"}
    by_image: dict[Path, set[str]] = {}
    for s in samples:
        by_image.setdefault(s.image, set()).add(s.split)
        assert "<image>" not in s.question and s.answer and "relevant" in s.meta
    assert all(len(v) == 1 for v in by_image.values())  # an image never straddles splits
    assert len({s.id for s in samples}) == len(samples)


def test_ids_are_content_hashes(shapes_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shapes_data, copy)
    assert [s.id for s in read_dataset(shapes_data)] == [s.id for s in read_dataset(copy)]


def test_jsonl_reader(shapes_data, tmp_path):
    img = next((shapes_data / "images").iterdir())
    shutil.copy(img, tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": "x.png", "question": "q ?", "answer": "a"}) + "\n\n"
    )
    (s,) = read_jsonl(tmp_path / "d.jsonl")
    assert s.question == "q ?" and s.answer == "a" and s.image == (tmp_path / "x.png").resolve()


def _write(tmp_path, shapes_data, conv, image="img.png", corrupt=False):
    src = next((shapes_data / "images").iterdir())
    if corrupt:
        (tmp_path / image).write_bytes(b"not a png at all")
    elif image == "img.png":
        shutil.copy(src, tmp_path / image)
    (tmp_path / "d.json").write_text(
        json.dumps([{"id": "r1", "image": image, "conversations": conv}])
    )
    return tmp_path / "d.json"


GOOD = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]


@pytest.mark.parametrize(
    ("conv", "image", "corrupt", "match"),
    [
        (GOOD, "missing.png", False, "image not found"),
        (GOOD, "bad.png", True, "corrupt or unreadable image"),
        (
            [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}],
            "img.png",
            False,
            "no <image> token",
        ),
        ([{"from": "human", "value": "<image>\nwhat ?"}], "img.png", False, "has no 'gpt' answer"),
        (
            [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "  "}],
            "img.png",
            False,
            "empty or missing answer",
        ),
        (GOOD, "../escape.png", False, "escapes the dataset folder"),
    ],
)
def test_bad_input_names_the_culprit(tmp_path, shapes_data, conv, image, corrupt, match):
    path = _write(tmp_path, shapes_data, conv, image, corrupt)
    with pytest.raises(DatasetError, match=match) as err:
        read_llava(path)
    assert "d.json" in str(err.value) and "r1" in str(err.value)


def test_missing_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "nope.json")


def test_prepared_round_trip(shapes_data, tmp_path):
    samples = read_dataset(shapes_data)
    path = write_prepared(samples, tmp_path / "prep", "x")
    first = path.read_bytes()
    write_prepared(list(reversed(samples)), tmp_path / "prep", "x")
    assert path.read_bytes() == first  # deterministic
    back = load_prepared(tmp_path / "prep")
    assert sorted(s.id for s in back) == sorted(s.id for s in samples)
    test = load_prepared(tmp_path / "prep", "test")
    assert all(s.split == "test" for s in test)
    assert back[0].meta["objects"]
