"""Held-out variants of the built-in benchmarks: other object counts and backgrounds.

The defaults move no byte (both benchmarks are DVC-versioned); a variant keeps every scene
rule and answer; a background variant redraws the very same scenes; bad values are one
line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.data import scenes, scenes_qa, shapes, variants
from evocomp.data.synth import Variant, write_dataset
from tests.test_scenes import digest, patches, solve

runner = CliRunner()


def test_scenes_default_bytes_unchanged(tmp_path):
    """The digest of scenes-vqa before variants existed (shapes-vqa's: test_scenes.py)."""
    write_dataset(tmp_path, n=3, seed=1, questions_per_image=2, benchmark="scenes")
    assert digest(tmp_path) == "8b305a0027febb398e94a5431a1334c4fd6fc3a64791cfe43379d4381b0cf533"


def test_naming_the_defaults_changes_nothing(tmp_path):
    for bench, objects, style in (("shapes", (3, 6), "plain"), ("scenes", (6, 16), "texture")):
        write_dataset(tmp_path / f"{bench}-a", n=3, seed=2, benchmark=bench)
        v = Variant(objects, style)
        write_dataset(tmp_path / f"{bench}-b", n=3, seed=2, benchmark=bench, variant=v)
        assert digest(tmp_path / f"{bench}-a") == digest(tmp_path / f"{bench}-b")


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (1, 3), (20, 36)])
@pytest.mark.parametrize("qtype", scenes_qa.QTYPES)
def test_scenes_variant_answers_follow_from_the_scene(lo, hi, qtype):
    rng = random.Random(lo * 100 + hi)
    for _ in range(25):
        scene = scenes.make_scene(rng, 12, (lo, hi))
        objs = scene.objects
        assert lo <= len(objs) <= hi
        taken = [p for o in objs for p in o.patches]
        assert len(taken) == len(set(taken)) and all(1 <= len(o.patches) <= 9 for o in objs)
        for name in (*scenes.COLOURS, *scenes.SHAPES):  # counts stay words up to six
            assert sum(name in (o.colour, o.shape) for o in objs) <= scenes.MAX_SAME
        qa = scenes_qa.make_question(scene, rng, qtype)
        answer, needed = solve(scene, qa)
        assert qa.answer == answer, qa
        assert list(qa.relevant) == patches(needed), qa


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (1, 2), (10, 12)])
def test_shapes_variant_rules(lo, hi):
    rng = random.Random(hi)
    for _ in range(50):
        objs = shapes.make_scene(rng, (lo, hi))
        assert lo <= len(objs) <= hi
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        assert len({o.cell for o in objs}) == len(objs)
        assert max(sum(o.colour == c for o in objs) for c in shapes.COLOURS) <= 3
        qa = shapes.make_question(objs, rng)
        if qa.qtype == "count":
            assert shapes.COUNT_WORDS.index(qa.answer) == len(qa.relevant)


def _empty_patch_greys(path, grid):
    """Per dataset image: the mean grey of each patch no object touches, and the patch bytes."""
    out = []
    for rec in json.loads((path / "dataset.json").read_text()):
        img = Image.open(path / rec["image"]).convert("RGB")
        taken = {p for o in rec["metadata"]["objects"] for p in o.get("patches", [o.get("cell")])}
        crops = [
            img.crop((p % grid * 16, p // grid * 16, p % grid * 16 + 16, p // grid * 16 + 16))
            for p in range(grid * grid)
            if p not in taken
        ]
        greys = [
            c.convert("L").resize((1, 1), resample=Image.Resampling.BOX).getpixel((0, 0))
            for c in crops
        ]
        out.append((greys, {c.tobytes() for c in crops}, len(crops)))
    return out


@pytest.mark.parametrize(("bench", "grid", "grey"), [("shapes", 6, 235), ("scenes", 12, 180)])
def test_a_background_variant_redraws_the_same_scenes(tmp_path, bench, grid, grey):
    records = {}
    for style in variants.STYLES:
        path = write_dataset(
            tmp_path / style,
            n=4,
            seed=3,
            questions_per_image=2,
            benchmark=bench,
            variant=Variant(background=style),
        )
        records[style] = json.loads(path.read_text())
        per_image = _empty_patch_greys(tmp_path / style, grid)
        if style == "plain":  # one flat grey: every empty patch alike
            assert all(len(b) == 1 and set(g) == {grey} for g, b, _ in per_image)
        else:  # no two empty patches alike
            assert all(len(b) == n for _, b, n in per_image)
        if style == "noise":  # the same grey on average, no blotches
            assert all(
                abs(sum(g) / len(g) - grey) < 3 and max(g) - min(g) < 8 for g, *_ in per_image
            )
        if style == "texture":
            assert all(max(g) - min(g) > 20 for g, *_ in per_image)

    def strip(recs):
        return [{**r, "metadata": {**r["metadata"], "variant": None}} for r in recs]

    assert strip(records["plain"]) == strip(records["noise"]) == strip(records["texture"])
    default = "plain" if bench == "shapes" else "texture"
    for style, recs in records.items():  # the variant is recorded only when it departs
        assert ("variant" in recs[0]["metadata"]) == (style != default)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_synth_variant_and_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("synth", "--benchmark", "scenes", "--objects", "2-3", "--background", "noise",
                 "--n", "6", "--out", "v")  # fmt: skip
    assert res.exit_code == 0, res.output
    recs = json.loads((tmp_path / "v/dataset.json").read_text())
    assert all(2 <= len(r["metadata"]["objects"]) <= 3 for r in recs)
    assert recs[0]["metadata"]["variant"] == {"objects": [2, 3], "background": "noise"}
    # params.yaml's prepare.objects / background, as `dvc exp run -S` would set them
    (tmp_path / "params.yaml").write_text("prepare:\n  objects: [9, 9]\n  background: texture\n")
    assert invoke("synth", "--n", "4", "--out", "w").exit_code == 0
    recs = json.loads((tmp_path / "w/dataset.json").read_text())
    assert all(len(r["metadata"]["objects"]) == 9 for r in recs)
    assert recs[0]["metadata"]["variant"] == {"objects": [9, 9], "background": "texture"}
    # the option wins over the file
    assert invoke("synth", "--n", "2", "--objects", "1", "--out", "x").exit_code == 0
    recs = json.loads((tmp_path / "x/dataset.json").read_text())
    assert all(len(r["metadata"]["objects"]) == 1 for r in recs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--objects", "0-3"), "1 <= MIN <= MAX <= 12, got 0-3"),
        (("--objects", "5-2"), "got 5-2"),
        (
            ("--objects", "2-13"),
            "shapes-vqa objects per image (--objects, prepare.objects) must be",
        ),
        (("--benchmark", "scenes", "--objects", "2-37"), "<= 36, got 2-37"),
        (("--objects", "two"), "--objects must be MIN-MAX or N"),
        (("--objects", "1-2-3"), "--objects must be MIN-MAX or N"),
        (("--background", "dark"), "unknown background 'dark'"),
    ],
)
def test_cli_bad_variant(tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    res = invoke("synth", "--n", "2", "--out", "raw", *args)
    assert res.exit_code == 2, res.output
    assert match in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "raw").exists()  # nothing half-written


def test_a_bad_variant_in_params_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare:\n  background: dark\n")
    res = invoke("synth", "--n", "1", "--out", "raw")
    assert res.exit_code == 2 and "prepare.background" in res.output, res.output
    (tmp_path / "params.yaml").write_text("prepare:\n  objects: [4, 20]\n")
    res = invoke("synth", "--n", "1", "--out", "raw")
    assert res.exit_code == 2 and "got 4-20" in res.output, res.output
    assert not (tmp_path / "raw").exists()


def test_mllm_eval_on_a_fresh_variant(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("mllm", "eval", "--model", tiny_llava, "--n", "4", "--objects", "1-2",
                 "--background", "noise", "--out", "m.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert "objects [1, 2]" in m["evaluated_on"] and "background noise" in m["evaluated_on"]
    res = invoke("mllm", "eval", "--model", tiny_llava, "--data", "prep", "--objects", "1-2",
                 "--out", "m2.json")  # fmt: skip
    assert res.exit_code == 2 and "do not apply with --data" in res.output, res.output


def test_training_mix():
    assert variants.training_mix(None, 3, 0, "plain") == [("plain", 0)] * 3
    mix = variants.training_mix(["plain", "texture"], 200, 5, "plain")
    assert mix == variants.training_mix(["plain", "texture"], 200, 5, "noise")  # by seed
    assert mix != variants.training_mix(["plain", "texture"], 200, 6, "plain")
    assert 60 < sum(s == "plain" for s, _ in mix) < 140
    with pytest.raises(ValueError, match="unknown background 'dark'"):
        variants.training_mix(["dark"], 2, 0, "plain")


def test_a_reference_model_trains_on_a_background_mix(tmp_path, monkeypatch):
    from evocomp.config import MLLMParams
    from evocomp.mllm.reference import train_reference

    drawn = []
    render = shapes.render

    def spy(objs, background="plain", seed=0):
        drawn.append(background)
        return render(objs, background, seed)

    monkeypatch.setattr(shapes, "render", spy)
    tiny = dict(
        n_images=64, val_images=16, align_steps=2, lm_steps=2, eval_every=2, batch_size=8,
        align_batch_size=16, curriculum_steps=1, threads=1,
    )  # fmt: skip
    out = train_reference(tmp_path / "mix", MLLMParams(**tiny, backgrounds=["noise", "texture"]),
                          log=lambda _: None)  # fmt: skip
    assert set(drawn) == {"noise", "texture"} and len(drawn) == 80
    recipe = json.loads((out / "config.json").read_text())["evocomp"]["recipe"]
    assert recipe["backgrounds"] == ["noise", "texture"]
    drawn.clear()
    out = train_reference(tmp_path / "own", MLLMParams(**tiny), log=lambda _: None)
    assert set(drawn) == {"plain"}
    # the default stays out of the recipe, so a model trained before the key keeps its id
    assert "backgrounds" not in json.loads((out / "config.json").read_text())["evocomp"]["recipe"]


@pytest.fixture
def heldout_variants(bench_module):
    return bench_module("heldout_variants")


def test_heldout_variants_bench(heldout_variants, tiny_llava, tmp_path):
    out = tmp_path / "hv.json"
    report = heldout_variants.main(
        ["--benchmark", "shapes", "--model", str(tiny_llava), "--n", "3", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["variants"]
    assert list(rows) == list(heldout_variants.VARIANTS["shapes"])
    for r in rows.values():
        assert r["samples"] == 3 and 0 <= r["full"] <= 1 and r["full_se"] >= 0
        assert set(r["0.111"]) == {"oracle", "random"} and "0.333" in r
    with pytest.raises(SystemExit):
        heldout_variants.main(["--model", str(tmp_path / "nothing"), "--out", str(out)])


@pytest.mark.parametrize(
    ("value", "match"),
    [("plain,dark", "unknown background 'dark'"), (",", "name at least one of")],
)
def test_mllm_train_refuses_bad_backgrounds(tmp_path, monkeypatch, value, match):
    monkeypatch.chdir(tmp_path)
    res = invoke("mllm", "train", "--backgrounds", value, "--out", "m")
    assert res.exit_code == 2 and match in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_heldout_variants_bench_hands_every_sample_to_evaluate(
    heldout_variants, tiny_llava, tmp_path, monkeypatch
):
    """--compressor: each variant's samples all in the test split, every method but the GA
    oracle (it needs labels of the variant), the result's tables kept."""
    from evocomp.data.prepared import load_prepared
    from evocomp.evaluation import run

    seen = []

    def fake(params, data, features, labels, compressor, mllm, speed, progress=None, **kw):
        seen.append((len(load_prepared(data, "test")), list(params.evaluate.methods), compressor))
        return {"prune_layer": 0, "full": 1.0, "ratios": {"0.111": {"random": 0.5}},
                "stderr": {"0.111": {"random": 0.1}}}  # fmt: skip

    monkeypatch.setattr(run, "run_evaluation", fake)
    (tmp_path / "comp").mkdir()
    report = heldout_variants.main(
        ["--model", str(tiny_llava), "--n", "3", "--ratios", "0.111",
         "--compressor", str(tmp_path / "comp"), "--out", str(tmp_path / "hv.json")]
    )  # fmt: skip
    assert len(seen) == len(heldout_variants.VARIANTS["shapes"])
    assert all(n == 3 and "oracle" not in m and "evocomp" in m for n, m, _ in seen)
    assert all(
        r["compression"]["ratios"]["0.111"]["random"] == 0.5 for r in report["variants"].values()
    )
    # one compressor per label budget, on the variants asked for: the nearest budget serves
    # each ratio (a variant has no val split), the paired differences kept
    seen.clear()
    (tmp_path / "comp2").mkdir()

    def fake2(params, data, features, labels, compressor, mllm, speed, progress=None, **kw):
        seen.append(
            (params.evaluate.choose, list(params.evaluate.ratios), compressor, kw["route_from"])
        )
        return {"prune_layer": 0, "full": 1.0, "ratios": {"0.111": {"random": 0.5}},
                "stderr": {"0.111": {"random": 0.1}},
                "paired": {"0.111": {"random": {"diff": 0.1, "stderr": 0.05}}},
                "compressor_for_ratio": {"0.111": "x"}, "tokens": {}}  # fmt: skip

    monkeypatch.setattr(run, "run_evaluation", fake2)
    report = heldout_variants.main(
        ["--model", str(tiny_llava), "--n", "3", "--ratios", "0.111", "--variants", "own,NOISE",
         "--compressor", str(tmp_path / "comp"), "--compressor", str(tmp_path / "comp2"),
         "--out", str(tmp_path / "hv.json")]
    )  # fmt: skip
    assert list(report["variants"]) == ["own (3-6 objects, plain)", "noise background"]
    # the comparison at --ratios, not params.yaml's evaluate.ratios
    assert seen == [("nearest", [0.111], [tmp_path / "comp", tmp_path / "comp2"], None)] * 2
    row = report["variants"]["noise background"]["compression"]
    assert set(row) == {"prune_layer", "full", "ratios", "stderr", "paired", "compressor_for_ratio"}
    assert report["compressor"] == [str(tmp_path / "comp"), str(tmp_path / "comp2")]
    # --route: the evaluation's choice reaches every variant's evaluation; an unreadable one,
    # or one without compressors, stops before any variant is drawn
    seen.clear()
    route = tmp_path / "eval.json"
    route.write_text(json.dumps({"compressor_for_ratio": {"0.111": str(tmp_path / "comp2")}}))
    two = ["--compressor", str(tmp_path / "comp"), "--compressor", str(tmp_path / "comp2")]
    report = heldout_variants.main(
        ["--model", str(tiny_llava), "--n", "3", "--ratios", "0.111", "--variants", "own",
         *two, "--route", str(route), "--out", str(tmp_path / "hv.json")]
    )  # fmt: skip
    assert [s[3] for s in seen] == [route] and report["route"] == str(route)
    for args in (["--route", str(tmp_path / "none.json"), *two], ["--route", str(route)]):
        with pytest.raises(SystemExit):
            heldout_variants.main(
                ["--model", str(tiny_llava), *args, "--out", str(tmp_path / "x.json")]
            )
    assert len(seen) == 1 and not (tmp_path / "x.json").exists()
    for bad in ("purple", ","):
        with pytest.raises(SystemExit):
            heldout_variants.main(
                ["--model", str(tiny_llava), "--variants", bad, "--out", str(tmp_path / "x.json")]
            )
    assert not (tmp_path / "x.json").exists()


def test_mllm_train_refuses_compile_for_the_shapes_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("mllm", "train", "--compile", "--out", "m")
    assert res.exit_code == 2 and "only the scenes-vqa recipe" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
