"""scenes-vqa end to end: its reference model, its profile's DVC stage set, grid mismatches.

The stage set runs for real (`dvc repro scenes_evaluate` in a temp git copy of the repo)
on a tiny setting: a 6 x 6 scenes grid, a reference model trained for a few steps, a short
search and a 3-epoch compressor.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.config import MLLMParams
from evocomp.data import scenes, scenes_qa
from evocomp.data.synth import write_dataset
from evocomp.mllm import scenes_recipe
from evocomp.mllm.hf_llava import HFLlava
from evocomp.mllm.recipe import recipe_record
from evocomp.mllm.scenes_reference import train_scenes_reference
from tests.dvc_helpers import BIN, copy_repo, git_workspace, sh

TINY = dict(
    benchmark="scenes", grid=6, n_images=64, val_images=16, align_steps=3, lm_steps=4,
    eval_every=2, batch_size=8, align_batch_size=16, curriculum_steps=2, threads=1, seed=3,
    vision_layers=1, lm_layers=1, eval_images=12, lm_pack=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def scenes_model(tmp_path_factory) -> Path:
    return train_scenes_reference(
        tmp_path_factory.mktemp("scenes") / "ref", MLLMParams(**TINY), log=lambda _: None
    )


def test_scenes_reference_writes_a_checkpoint_that_loads(scenes_model):
    m = HFLlava(scenes_model)
    assert m.n_tokens == 36 and m.grid == (6, 6)
    ev = m.model.config.evocomp
    assert ev["recipe"]["benchmark"] == "scenes" and ev["lm_steps_run"] == 4
    assert set(ev["held_out_accuracy"]) <= set(scenes_qa.QTYPES)
    scene = scenes.make_scene(random.Random(1), 6)
    img = scenes.render(scene)
    answer = m.generate(["how many red objects are there ?"], m.visual_tokens([img]), [None])
    assert isinstance(answer[0], str)
    # every question word is in the vocabulary (no <unk>)
    ids = m.tokenizer("what shape is in the top left ?")["input_ids"]
    assert m.tokenizer.unk_token_id not in ids


def test_patch_truth_marks_each_objects_first_patch():
    scene = scenes.make_scene(random.Random(4))
    words = ["background", *scenes.COLOURS, *scenes.SHAPES]
    ids = {w: i for i, w in enumerate(words)}
    targets, is_object, size, anchor = scenes_recipe.patch_truth(scene, ids, len(words))
    assert anchor.sum() == len(scene.objects)
    for o in scene.objects:
        first = min(o.patches)
        assert anchor[first] == 1 and all(anchor[p] == 0 for p in o.patches if p != first)
        assert targets[first, ids[o.colour]] == 0.5 and targets[first, ids[o.shape]] == 0.5
        assert size[first] == scenes.SIZES.index(o.size)
    empty = is_object == 0
    assert torch.all(targets[empty, ids["background"]] == 1) and torch.all(size[empty] == -1)


def test_subset_rows_keep_the_anchors_the_answer_needs():
    rng = random.Random(0)
    for _ in range(50):
        scene = scenes.make_scene(rng)
        qa = scenes_qa.make_question(scene, rng)
        kept = set(scenes_recipe._kept(scene, [qa], rng, 144, "subset").tolist())
        easy = set(scenes_recipe._kept(scene, [qa], rng, 144, "curriculum").tolist())
        assert set(qa.relevant) <= easy
        needed = [o for o in scene.objects if set(o.patches) & set(qa.relevant)]
        assert all(min(o.patches) in kept for o in needed)
    assert scenes_recipe._kept(scene, [qa], rng, 144, "full").tolist() == list(range(144))


def test_lm_rows_keep_original_positions():
    emb = torch.nn.Embedding(50, 4)
    feats = torch.randn(2, 9, 4)
    rows = [(0, torch.tensor([1, 5]), ([10, 11], [12])), (1, torch.arange(9), ([10], [13]))]
    x, mask, labels, pos = scenes_recipe.lm_batch(rows, [2, 3], feats, emb)
    assert pos[0, :7].tolist() == [
        0,
        1,
        3,
        7,
        11,
        12,
        13,
    ]  # text after the image: as if 9 were there
    assert mask[0].sum() == 7 and mask[1].sum() == 2 + 9 + 2
    assert torch.equal(x[0, 2], feats[0, 1]) and torch.equal(x[0, 3], feats[0, 5])
    assert labels[0, 5] == 12 and labels[1, 11] == 13  # the answer is predicted one early


def test_grid_mismatch_is_one_line(scenes_model, tmp_path):
    """A 8 x 8 scenes set evaluated with a 6 x 6 model: exit 2, one line naming both."""
    write_dataset(tmp_path / "raw", 6, 5, benchmark="scenes", grid=8)
    runner = CliRunner()
    prep = runner.invoke(
        app, ["prepare", "--source", str(tmp_path / "raw"), "--out", str(tmp_path / "prep")]
    )
    assert prep.exit_code == 0, prep.output
    out = tmp_path / "mllm.json"
    res = runner.invoke(
        app,
        ["mllm", "eval", "--data", str(tmp_path / "prep"), "--split", "train",
         "--model", str(scenes_model), "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "8 x 8 = 64-patch" in lines[0] and "36 visual tokens" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_scenes_stage_set_end_to_end(tmp_path, repo_root):
    """`dvc repro scenes_evaluate` on a tiny scenes profile: every stage of the set runs, its
    metrics land under metrics/scenes/, and `dvc metrics show` lists them."""
    ws = tmp_path / "ws"
    copy_repo(repo_root, ws, skip=("models/", "metrics/scenes/"))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    tiny = {k: v for k, v in TINY.items() if k != "threads"}
    params["profiles"]["scenes"] = {
        "prepare": {"source": "data/raw/scenes-vqa", "n_images": 24},
        "mllm": {"checkpoint": "models/scenes/mllm", **tiny},
        "label": {
            "keep_ratio": 0.111,
            "population": 12,
            "parents": 4,
            "generations": 2,
            "budgets": [0.222, 0.333],
        },
        "train": {"epochs": 3, "patience": 2, "monitor": "answer_loss"},
        "evaluate": {"ratios": [0.333, 0.222, 0.111]},
    }
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = git_workspace(ws)
    sh([str(BIN / "dvc"), "repro", "scenes_evaluate", "scenes_mllm_eval"], ws, env)

    mllm = json.loads((ws / "metrics/scenes/mllm.json").read_text())
    assert "scenes-vqa" in mllm["evaluated_on"] and set(mllm["ratios"]) >= {"0.111"}
    labels = json.loads((ws / "metrics/scenes/labels.json").read_text())
    assert "never_worse_than_best_heuristic" in labels
    # a label set per evaluated budget (one run each in the store); the scorer trains on 1/9's
    at = {
        r: json.loads((ws / f"metrics/scenes/labels_{r}.json").read_text())
        for r in ("0.222", "0.333")
    }
    fractions = [labels["mean_kept_fraction"]] + [at[r]["mean_kept_fraction"] for r in at]
    assert fractions == sorted(fractions) and len(set(fractions)) == 3
    train = json.loads((ws / "metrics/scenes/train.json").read_text())
    assert train["label_set_hashes"] == [labels["label_set_hash"]]
    assert len({labels["label_set_hash"], *(at[r]["label_set_hash"] for r in at)}) == 3
    # a compressor per budget, on that budget's labels, early-stopped on the val answer loss
    for r in at:
        tr = json.loads((ws / f"metrics/scenes/train_{r}.json").read_text())
        assert tr["label_set_hashes"] == [at[r]["label_set_hash"]]
        assert tr["val_answer_loss"] is not None and "val_full_loss" in tr
    ev = json.loads((ws / "metrics/scenes/eval.json").read_text())
    assert ev["compressor_for_ratio"] == {
        "0.111": "models/scenes/compressor",
        "0.222": "models/scenes/compressor_0.222",
        "0.333": "models/scenes/compressor_0.333",
    }
    assert set(ev["ratios"]) == {"0.333", "0.222", "0.111"}
    assert {"evocomp", "divprune", "fastv"} <= set(ev["ratios"]["0.111"])
    assert all("oracle" in ev["ratios"][r] for r in ev["ratios"])  # per-ratio label: test_stages
    data = json.loads((ws / "data/raw/scenes-vqa/dataset.json").read_text())
    assert len(data) == 24 and data[0]["metadata"]["grid"] == [6, 6]
    shown = json.loads(sh([str(BIN / "dvc"), "metrics", "show", "--json"], ws, env))
    files = {f for rev in shown.values() for f in rev.get("data", {})}
    assert "metrics/scenes/eval.json" in files and "metrics/scenes/labels.json" in files
    assert not (ws / "models/mllm").exists()  # the shapes stage set did not run
    # new data labelled warm-started from the trained compressor: a run of its own, keyed by
    # the compressor's content; its labels are never worse than the compressor's own pick
    sh([str(BIN / "evocomp"), "--profile", "scenes", "label", "--in-process",
        "--data", "data/scenes/prepared", "--features", "data/scenes/features",
        "--split", "test", "--warm-start", "models/scenes/compressor",
        "--out", "warm.parquet", "--metrics", "warm.json"], ws, env)  # fmt: skip
    from sqlalchemy import create_engine, text

    with create_engine(f"sqlite:///{ws / 'data/evocomp.db'}").connect() as conn:
        runs = [json.loads(r[0]) for r in conn.execute(text("SELECT params FROM label_runs"))]
    warm = [r for r in runs if "warm_start" in r]
    assert len(warm) == 1 and warm[0]["warm_start"].startswith("compressor-")
    assert (
        len(pd.read_parquet(ws / "warm.parquet"))
        == json.loads((ws / "warm.json").read_text())["samples"]
        > 0
    )


@pytest.fixture
def scenes_lm_trials(bench_module):
    return bench_module("scenes_lm_trials")


@pytest.fixture
def sp(bench_module):
    """bench/scenes_spatial_probe.py."""
    return bench_module("scenes_spatial_probe")


def test_lm_trials_bench_runs_on_the_models_own_images(scenes_model, tmp_path, scenes_lm_trials):
    """bench/scenes_lm_trials.py: every trial knob at once, on the tiny scenes model."""
    out, cache = tmp_path / "trial.json", tmp_path / "tokens.pt"
    flags = ["--model", str(scenes_model), "--layers", "2", "--heads", "2", "--steps", "4"]
    flags += ["--batch", "4", "--eval-every", "2", "--curriculum", "1", "--ramp", "2"]
    flags += ["--qk-gain", "2", "--rope-factor", "4", "--attention-supervision", "0.5"]
    flags += ["--objects", "1", "--marker", "1", "--types", "colour", "count", "--where", "0.5"]
    flags += ["--description-supervision", "0.3", "--readout-supervision", "0.3"]
    flags += ["--position-supervision", "1"]
    ask = scenes_recipe.ask
    rep = scenes_lm_trials.main([*flags, "--cache", str(cache), "--out", str(out)])
    assert scenes_recipe.ask is ask  # --where patched it for the trial only
    assert [c["step"] for c in rep["curve"]] == [2, 4]
    assert set(rep["curve"][-1]["training_images"]) <= set(scenes_qa.QTYPES)
    assert set(rep["nearest_word"]) == {"shape", "colour"}
    assert all(0.0 <= a <= 1.0 for a in rep["nearest_word"].values())
    written = json.loads(out.read_text())
    assert written["final_mean"] == rep["final_mean"] and 0.0 <= rep["final_mean"] <= 1.0
    assert set(written["curve"][-1]["by_type"]) <= set(scenes_qa.QTYPES)
    assert all(c["description_loss"] >= 0.0 for c in written["curve"])
    assert all(c["position_loss"] >= 0.0 for c in written["curve"])
    feats, val_feats = torch.load(cache)  # the model's own 64 + 16 images, 36 tokens each
    assert feats.shape[:2] == (64, 36) and val_feats.shape[:2] == (16, 36)


def test_lm_trials_where_question_names_the_objects_region(scenes_lm_trials):
    """--where: "what is the <description> in ?" -> the region of that object's centre
    patch, asked instead of a benchmark question with probability p; the recipe's ask is
    restored after a trial (the smoke test above)."""
    rng = random.Random(0)
    for _ in range(30):
        sc = scenes.make_scene(rng, 12)
        qa = scenes_lm_trials.where_question(sc, rng)
        (o,) = [o for o in sc.objects if o.patches is qa.relevant]
        c0, r0, w, h = o.footprint
        assert qa.answer == scenes_qa.REGIONS[(r0 + h // 2) // 4 * 3 + (c0 + w // 2) // 4]
        assert qa.question.startswith("what is the ") and qa.question.endswith(" in ?")
    asking = scenes_lm_trials.with_where(scenes_recipe.ask, 0.5)
    types = [asking(sc, rng, {"colour": 1.0}).qtype for _ in range(200)]
    assert set(types) == {"where", "colour"} and 70 < types.count("where") < 130


def test_description_targets_name_each_described_object():
    """The targets of the trials' --description-supervision and the recipe's lookup term:
    the last word of each description, and the patches of the object it names (a spatial
    question's two, each on its own)."""
    rng, spatial = random.Random(0), 0
    for _ in range(200):
        sc = scenes.make_scene(rng, 12)
        for qtype in scenes_qa.QTYPES:
            qa = scenes_qa.make_question(sc, rng, qtype)
            words, targets = qa.question.split(), scenes_qa.description_targets(sc, qa)
            if qa.qtype != "spatial":  # the phrase ends before "are there ?" or "?"
                last = words.index("are" if qa.qtype == "count" else "?") - 1
                assert targets == ([(last, set(qa.relevant))] if qa.relevant else [])
                continue
            spatial += 1
            (a, pa), (b, pb) = targets
            assert words[a + 1] in ("left", "above") and words[b + 1] == "?"
            assert pa | pb == set(qa.relevant) and not pa & pb
            for word, patches in targets:  # one object, the one its phrase fits
                (o,) = [o for o in sc.objects if set(o.patches) == patches]
                assert words[word] in (o.shape, "object")
    assert spatial > 150


def test_lookups_name_one_object_each_at_its_phrase():
    """The lookup term's targets: every phrase that names one object (a spatial question's
    two, an attribute or position question's one, an existence yes with one match), never
    a count or an existence no; the word is that object's shape, colour or region word."""
    rng, seen = random.Random(5), {t: 0 for t in scenes_qa.QTYPES}
    for _ in range(150):
        sc = scenes.make_scene(rng, 12)
        for qtype in scenes_qa.QTYPES:
            qa = scenes_qa.make_question(sc, rng, qtype)
            words, found = qa.question.split(), scenes_qa.lookups(sc, qa)
            seen[qa.qtype] += len(found)
            if qa.qtype == "count" or qa.answer == "no" and qa.qtype == "exists":
                assert found == []
            if qa.qtype == "spatial":
                assert len(found) == 2 and set(found[0][1].patches) | set(
                    found[1][1].patches
                ) == set(qa.relevant)
            if qa.qtype in ("colour", "shape", "position"):
                assert len(found) == 1 and found[0][1].patches == qa.relevant
                assert qa.answer in (found[0][1].colour, found[0][1].shape)
            for w, o in found:
                assert o in sc.objects
                assert words[w] in (
                    o.shape,
                    o.colour,
                    "object",
                    *scenes_qa.ROWS,
                    *scenes_qa.COLS,
                    "centre",
                )
    assert seen["count"] == 0 and min(v for t, v in seen.items() if t != "count") > 40


def test_lookup_targets_index_each_phrases_word_in_packed_and_single_rows():
    """The (row, sequence index) of each lookup is its phrase's last word in the batch's
    inputs, for packed rows (several questions after one image) and single ones."""
    from evocomp.mllm import tiny_llava
    from evocomp.mllm.recipe import Questions

    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    embed = torch.nn.Embedding(len(tok), 4)
    q, rng = Questions(tok), random.Random(6)
    scs = [scenes.make_scene(rng, 6) for _ in range(3)]
    feats = torch.randn(3, 36, 4)
    qas = [[scenes_qa.make_question(sc, rng, t) for t in scenes_qa.QTYPES] for sc in scs]
    kept = [torch.tensor([0, 3, 4, 20, 35]), torch.arange(36), torch.arange(10)]
    packed = [(i, kept[i], [q(qa) for qa in qas[i]]) for i in range(3)]
    single = [(i, kept[i], [q(qa)]) for i in range(3) for qa in qas[i]]  # one question a row
    flat = [[qa] for row in qas for qa in row]
    lm_rows = [(i, k, qs[0]) for i, k, qs in single]
    n = 0
    for rows, asked, x in (
        (packed, qas, scenes_recipe.packed_batch(packed, q.prefix, feats, embed)[0]),
        (single, flat, scenes_recipe.lm_batch(lm_rows, q.prefix, feats, embed)[0]),
    ):
        at, objs = scenes_recipe.lookup_targets(rows, asked, scs, len(q.prefix))
        assert len(at) == sum(len(scenes_qa.lookups(scs[i], qa)) for i in range(3) for qa in qas[i])
        for (r, c), o in zip(at, objs, strict=True):
            (i,) = (embed.weight == x[r, c]).all(-1).nonzero()[0].tolist()
            word = tok.convert_ids_to_tokens(i)
            assert word in (o.shape, o.colour, "object", *scenes_qa.ROWS, *scenes_qa.COLS, "centre")
            n += 1
    assert n > 10


def test_lookup_loss_is_zero_for_a_probe_that_reads_the_object():
    """The lookup term: 10 x squared error of the centre + cross-entropy of colour and shape;
    near 0 for a probe that reads them exactly, larger for a wrong colour."""
    sc = scenes.make_scene(random.Random(7), 12)
    o = sc.objects[0]
    c0, r0, w, h = o.footprint
    truth = torch.zeros(scenes_recipe.LOOKUP_OUT)
    truth[:2] = torch.tensor([r0 + (h - 1) / 2, c0 + (w - 1) / 2]) / 11
    C = len(scenes.COLOURS)
    truth[2 + list(scenes.COLOURS).index(o.colour)] = 50.0
    truth[2 + C + scenes.SHAPES.index(o.shape)] = 50.0
    probe = torch.nn.Linear(1, scenes_recipe.LOOKUP_OUT)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.copy_(truth)
    hidden = torch.zeros(1, 5, 1)
    assert scenes_recipe.lookup_loss(hidden, [(0, 3)], [o], probe, 12).item() < 1e-6
    with torch.no_grad():
        probe.bias[2 : 2 + C] = probe.bias[2 : 2 + C].roll(1)  # the wrong colour at 50
    assert scenes_recipe.lookup_loss(hidden, [(0, 3)], [o], probe, 12).item() == pytest.approx(50.0)
    assert scenes_recipe.lookup_loss(hidden, [], [], probe, 12).item() == 0.0


def test_readout_targets_sit_where_each_spatial_answer_is_predicted():
    """The readout term's targets: one per spatial question, at the token whose logits
    predict its answer (the labels' first answer token is the next one), with the two
    objects its phrases name, in order."""
    from evocomp.mllm import tiny_llava
    from evocomp.mllm.recipe import Questions

    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    embed = torch.nn.Embedding(len(tok), 4)
    q, rng = Questions(tok), random.Random(8)
    scs = [scenes.make_scene(rng, 6) for _ in range(4)]
    feats = torch.randn(4, 36, 4)
    qas = [
        [scenes_qa.make_question(sc, rng, t) for t in ("spatial", "colour", "spatial")]
        for sc in scs
    ]
    rows = [(i, torch.arange(0, 36, 1 + i), [q(qa) for qa in qas[i]]) for i in range(4)]
    _, _, labels, _ = scenes_recipe.packed_batch(rows, q.prefix, feats, embed)
    at, pairs = scenes_recipe.readout_targets(rows, qas, scs, len(q.prefix))
    expected = [
        tuple(o for _, o in scenes_qa.lookups(scs[i], qa))
        for i in range(4)
        for qa in qas[i]
        if qa.qtype == "spatial" and len(scenes_qa.lookups(scs[i], qa)) == 2
    ]
    assert pairs == expected and len(pairs) >= 4
    for r, c in at:  # the answer's first token is the label of the position after
        assert labels[r, c - 1] == -100 and labels[r, c] != -100
        assert tok.convert_ids_to_tokens(int(labels[r, c])) in ("yes", "no")


def test_readout_loss_is_zero_for_a_probe_that_reads_both_centres():
    sc = scenes.make_scene(random.Random(9), 12)
    a, b = sc.objects[:2]
    both = torch.cat([scenes_recipe._centres([a], 12), scenes_recipe._centres([b], 12)], 1)[0]
    probe = torch.nn.Linear(1, 4)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.copy_(both)
    hidden = torch.zeros(1, 5, 1)
    assert scenes_recipe.readout_loss(hidden, [(0, 4)], [(a, b)], probe, 12).item() < 1e-9
    swapped = scenes_recipe.readout_loss(hidden, [(0, 4)], [(b, a)], probe, 12).item()
    assert swapped == pytest.approx(10 * ((both[:2] - both[2:]) ** 2).mean().item(), rel=1e-5)
    assert scenes_recipe.readout_loss(hidden, [], [], probe, 12).item() == 0.0


def test_scenes_reference_trains_with_the_lookup_term(tmp_path):
    """mllm.lookup_supervision trains a 2-layer LM with the probe on layer 1, records the
    term in config.json (a recipe without it records neither field) and is refused on the
    last layer."""
    logs: list[str] = []
    params = MLLMParams(**{**TINY, "lm_layers": 2, "lookup_supervision": 1.0, "eval_every": 2})
    out = train_scenes_reference(tmp_path / "ref", params, log=logs.append)
    recipe = json.loads((out / "config.json").read_text())["evocomp"]["recipe"]
    assert recipe["lookup_supervision"] == 1.0 and recipe["lookup_layer"] == 1
    assert any("lookup term" in m for m in logs)
    assert "lookup_layer" not in recipe_record(MLLMParams(**TINY), set())
    assert "readout_supervision" not in recipe
    with pytest.raises(ValueError, match="lookup_layer"):
        MLLMParams(**{**TINY, "lookup_supervision": 1.0})  # 1 layer: nothing reads layer 1
    with pytest.raises(ValueError, match="lookup_layer"):
        MLLMParams(**{**TINY, "readout_supervision": 1.0})


def test_scenes_reference_trains_with_the_readout_term(tmp_path):
    """mllm.readout_supervision adds its term on the layer after the lookup's (here the
    last of 2) and records itself and the lookup layer it is placed by."""
    logs: list[str] = []
    params = MLLMParams(
        **{**TINY, "lm_layers": 2, "lookup_supervision": 1.0, "readout_supervision": 1.0}
    )
    out = train_scenes_reference(tmp_path / "ref", params, log=logs.append)
    recipe = json.loads((out / "config.json").read_text())["evocomp"]["recipe"]
    assert recipe["readout_supervision"] == 1.0 and recipe["lookup_layer"] == 1
    assert any("readout term" in m for m in logs)


def test_lm_trials_supervision_losses_reward_attention_on_the_target(scenes_lm_trials):
    """Both auxiliary terms are -log(attention mass on the target): 0 when all of it is
    there, log(L) when it is spread evenly over L positions."""
    kept = torch.tensor([3, 7, 8])  # visual tokens at 2, 3, 4 after a 2-token prefix
    # suffix word 1 describes patches 7 and 8; 2 describes patch 3; the answer is predicted at 9
    rows = [(0, kept, ([10, 11, 12, 13], [14]), set(), [(1, {7, 8}), (2, {3})])]
    L = 2 + 3 + 4 + 1
    labels = torch.full((1, L), -100)
    labels[0, 8] = 14
    att = torch.zeros(1, 4, L, L)
    att[0, :, 6, 3] = att[0, :, 6, 4] = 0.5  # word 1 (position 5 + 1) on patches 7 and 8
    att[0, :, 7, 2] = 1.0  # word 2 on patch 3
    att[0, 0, 8, 6] = att[0, 1, 8, 7] = 1.0  # the answer: head 0 on word 1, head 1 on word 2
    described, read = scenes_lm_trials.description_loss, scenes_lm_trials.readout_loss
    assert described((att,), rows, 2, 1, 4).item() == pytest.approx(0.0)
    assert read((att,), rows, labels, 2).item() == pytest.approx(0.0)
    even = torch.full((1, 4, L, L), 1.0 / L)
    both = (math.log(L / 2) + math.log(L)) / 2  # word 1 has 2 of the L positions, word 2 one
    assert described((even,), rows, 2, 1, 4).item() == pytest.approx(both)
    assert read((even,), rows, labels, 2).item() == pytest.approx(math.log(L))


def test_lm_trials_position_loss_reads_each_described_objects_centre(scenes_lm_trials):
    """--position-supervision: the probe's (row, column) at a description's last word against
    its object's centre on a 0-1 scale; 0 for a probe that reads it exactly."""
    kept = torch.arange(9)  # a 3 x 3 grid after a 1-token prefix
    # word 0 names patches 0 and 1 (row 0, columns 0-1), word 2 patch 8 (row 2, column 2)
    rows = [(0, kept, ([10, 11, 12], [13]), set(), [(0, {0, 1}), (2, {8})])]
    hidden = torch.zeros(1, 1 + 9 + 4, 2)
    hidden[0, 10] = torch.tensor([0.0, 0.25])  # the centres, (row, column) / (3 - 1)
    hidden[0, 12] = torch.tensor([1.0, 1.0])
    probe = torch.nn.Linear(2, 2)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(2))
        probe.bias.zero_()
    assert scenes_lm_trials.position_loss(hidden, rows, 1, probe, 3).item() == 0.0
    hidden[0, 12] = 0.0  # reads (0, 0) for (1, 1): squared error 2 over 4 numbers
    assert scenes_lm_trials.position_loss(hidden, rows, 1, probe, 3).item() == pytest.approx(0.5)


def test_lm_trials_curriculum_with_objects_keeps_them_whole(scenes_lm_trials):
    """--objects: curriculum rows hold the answer's patches and other objects whole."""
    args = scenes_lm_trials.parse_args(["--curriculum", "5", "--objects", "1"])
    rng, seen = random.Random(0), set()
    for _ in range(30):
        sc = scenes.make_scene(rng, 12)
        qa = scenes_qa.make_question(sc, rng, "colour")
        kept = set(scenes_lm_trials.kept_tokens(args, 0, sc, qa, rng, 144).tolist())
        assert set(qa.relevant) <= kept
        for o in sc.objects:  # an object is in view whole or, bar background draws, not at all
            inside = kept & set(o.patches)
            seen.add(inside == set(o.patches))
    assert seen == {True, False}  # per row U(0, 1): some objects in, some out


def test_lm_trials_word_readout_counts_each_patch(scenes_lm_trials):
    """A patch equal to its colour + shape words reads right; a background-like one wrong."""
    from evocomp.mllm import tiny_llava

    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    emb = torch.nn.Embedding(len(tok), 64)
    ref = torch.nn.Module()
    ref.get_input_embeddings = lambda: emb
    sc = scenes.make_scene(random.Random(1), 12)
    feats = torch.zeros(1, 144, 64)
    for o in sc.objects:
        word = emb.weight[tok.convert_tokens_to_ids([o.colour, o.shape])].sum(0)
        feats[0, list(o.patches)] = word.detach()
    assert scenes_lm_trials.word_readout(ref, tok, feats, [sc]) == {"shape": 1.0, "colour": 1.0}
    first = sc.objects[0]
    other = next(s for s in scenes.SHAPES if s != first.shape)
    feats[0, first.patches[0]] = emb.weight[tok.convert_tokens_to_ids([other])].detach()[0]
    n = sum(len(o.patches) for o in sc.objects)
    assert scenes_lm_trials.word_readout(ref, tok, feats, [sc])["shape"] == (n - 1) / n


def test_lm_trials_marker_leaves_every_tokens_nearest_word(scenes_lm_trials):
    words = torch.randn(20, 32)
    ref = torch.nn.Module()
    ref.get_input_embeddings = lambda: torch.nn.Embedding.from_pretrained(words)
    a, b = torch.randn(5, 9, 32), torch.randn(3, 9, 32)
    ma, mb = scenes_lm_trials.marked(ref, 1.0, a, b)
    shift = ma - a
    assert torch.allclose(shift, (mb - b)[:1, :1], atol=1e-5)
    assert torch.allclose(shift, shift[:1, :1], atol=1e-5)
    torch.testing.assert_close(shift @ words.T, torch.zeros(5, 9, 20), atol=1e-4, rtol=0)
    torch.testing.assert_close(shift[0, 0].norm(), a.norm(dim=-1).mean())

    def nearest(x):
        return (torch.nn.functional.normalize(x, dim=-1) @ words.T).argmax(-1)

    assert torch.equal(nearest(ma), nearest(a))
    ref.get_input_embeddings = lambda: torch.nn.Embedding(40, 32)  # no room left for a marker
    with pytest.raises(ValueError, match="fewer words"):
        scenes_lm_trials.marked(ref, 1.0, a)


def test_lm_trials_question_first_rows(scenes_lm_trials):
    """--question-at before / both: the question moved / copied before the image."""
    emb = torch.nn.Embedding(50, 4)
    feats = torch.randn(2, 9, 4)
    # suffixes: question words then the one-token assistant tag (20)
    rows = [(0, torch.tensor([1, 5]), ([10, 11, 20], [12])), (1, torch.arange(9), ([10, 20], [13]))]
    x, mask, labels, pos = scenes_lm_trials.question_batch(rows, [2, 3], feats, emb, "before")
    # row 0: prefix 0 1, question 2 3, visual tokens 1 and 5 of 9 at 4+1, 4+5, tag after all 9
    assert pos[0, :8].tolist() == [0, 1, 2, 3, 5, 9, 13, 14]
    assert mask[0].sum() == 8 and mask[1].sum() == 2 + 1 + 9 + 2
    torch.testing.assert_close(x[0, 2], emb(torch.tensor(10)))
    assert torch.equal(x[0, 4], feats[0, 1]) and torch.equal(x[0, 5], feats[0, 5])
    torch.testing.assert_close(x[0, 6], emb(torch.tensor(20)))
    assert labels[0, 6] == 12 and labels[1, 12] == 13  # predicted from the tag's position
    # both: the question again after the image, positions running on after all 9 tokens
    x, mask, labels, pos = scenes_lm_trials.question_batch(rows, [2, 3], feats, emb, "both")
    assert pos[0, :10].tolist() == [0, 1, 2, 3, 5, 9, 13, 14, 15, 16]
    torch.testing.assert_close(x[0, 6:9], emb(torch.tensor([10, 11, 20])))
    assert labels[0, 8] == 12 and mask[0].sum() == 10


def test_lm_trials_question_first_runs(scenes_model, tmp_path, scenes_lm_trials):
    flags = ["--model", str(scenes_model), "--heads", "2", "--steps", "2", "--batch", "4"]
    flags += ["--eval-every", "2", "--question-at", "both", "--cache", str(tmp_path / "t.pt")]
    rep = scenes_lm_trials.main([*flags, "--out", str(tmp_path / "qf.json")])
    assert rep["flags"]["question_at"] == "both" and 0.0 <= rep["final_mean"] <= 1.0
    assert scenes_recipe.lm_batch.__module__ == "evocomp.mllm.scenes_recipe"  # restored


def test_lm_trials_bench_refuses_a_model_that_is_not_a_scenes_reference(tmp_path, scenes_lm_trials):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(SystemExit) as e:
        scenes_lm_trials.parse_args(["--model", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        scenes_lm_trials.parse_args(["--layers", "1", "--attention-supervision", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        scenes_lm_trials.parse_args(["--question-at", "both", "--attention-supervision", "1"])
    assert e.value.code == 2
    for bad in (["--objects", "1.5"], ["--marker", "-1"]):
        with pytest.raises(SystemExit) as e:
            scenes_lm_trials.parse_args(bad)
        assert e.value.code == 2


def test_packed_rows_answer_as_their_own_rows():
    """lm_pack: K questions after one image give each answer the logits of its own row."""
    from evocomp.mllm import tiny_llava
    from evocomp.mllm.recipe import Questions

    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    model = tiny_llava.build_model(tok, 0, 6 * scenes.CELL, scenes.CELL, 2, 2, 1, 2)
    lm, head, embed = model.model.language_model, model.lm_head, model.get_input_embeddings()
    q = Questions(tok)
    rng = random.Random(2)
    scs = [scenes.make_scene(rng, 6) for _ in range(2)]
    feats = torch.randn(2, 36, model.config.text_config.hidden_size)
    qas = [
        [scenes_qa.make_question(sc, rng, t) for t in ("colour", "count", "spatial")] for sc in scs
    ]
    kept = [torch.tensor([0, 3, 4, 20, 35]), torch.arange(36)]
    packed = [(i, kept[i], [q(qa) for qa in qas[i]]) for i in range(2)]
    single = [(i, kept[i], q(qa)) for i in range(2) for qa in qas[i]]

    def answer_logits(x, mask, labels, pos):
        h = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
        return head(h[labels != -100]), labels[labels != -100]

    with torch.no_grad():
        a, la = answer_logits(*scenes_recipe.packed_batch(packed, q.prefix, feats, embed))
        b, lb = answer_logits(*scenes_recipe.lm_batch(single, q.prefix, feats, embed))
    assert torch.equal(la, lb) and len(la) == 2 * 3 * 2  # answer word + EOS, 3 per image
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_count_targets_sit_where_each_count_answer_is_predicted():
    """The count term's targets: one per count question, at the token whose logits predict
    its answer, with the number of objects it counts."""
    from evocomp.mllm import tiny_llava
    from evocomp.mllm.recipe import Questions

    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    embed = torch.nn.Embedding(len(tok), 4)
    q, rng = Questions(tok), random.Random(11)
    scs = [scenes.make_scene(rng, 6) for _ in range(4)]
    qas = [[scenes_qa.make_question(sc, rng, t) for t in ("count", "shape", "count")] for sc in scs]
    rows = [(i, torch.arange(0, 36, 1 + i), [q(qa) for qa in qas[i]]) for i in range(4)]
    _, _, labels, _ = scenes_recipe.packed_batch(rows, q.prefix, torch.randn(4, 36, 4), embed)
    at, counts = scenes_recipe.count_targets(rows, qas, len(q.prefix))
    expected = [
        sum(bool(set(o.patches) & set(qa.relevant)) for o in scs[i].objects)
        for i in range(4)
        for qa in qas[i]
        if qa.qtype == "count"
    ]
    assert counts == expected and len(counts) == 8 and len(set(counts)) > 1
    for (r, c), n in zip(at, counts, strict=True):
        assert labels[r, c - 1] == -100
        assert tok.convert_ids_to_tokens(int(labels[r, c])) == scenes_qa.COUNT_WORDS[n]


def test_count_loss_is_zero_for_a_probe_that_reads_the_count():
    probe = torch.nn.Linear(1, 1)
    with torch.no_grad():
        probe.weight.fill_(1.0)
        probe.bias.zero_()
    hidden = torch.tensor([[[0.0], [2 / 6], [5 / 6]]])  # a hidden state that is the count / 6
    assert scenes_recipe.count_loss(hidden, [(0, 1), (0, 2)], [2, 5], probe).item() < 1e-12
    off = scenes_recipe.count_loss(hidden, [(0, 1)], [3], probe).item()
    assert off == pytest.approx(10 * (1 / 6) ** 2, rel=1e-5)
    assert scenes_recipe.count_loss(hidden, [], [], probe).item() == 0.0


def test_row_modes_spread_sparse_rows_over_the_subset_steps():
    """Curriculum first, then odd steps full; sparse_share of the even ones sparse, spread
    evenly, and none without it (the schedule the recipe had before)."""

    def modes(share):
        p = MLLMParams(**{**TINY, "lm_steps": 44, "curriculum_steps": 4, "sparse_share": share})
        return [scenes_recipe.row_mode(s, p) for s in range(44)]

    for share in (0.0, 0.25, 0.5, 1.0):
        m = modes(share)
        assert m[:4] == ["curriculum"] * 4
        assert all(m[s] == "full" for s in range(5, 44, 2))
        even = m[4::2]
        assert set(even) <= {"subset", "sparse"}
        assert even.count("sparse") == pytest.approx(share * len(even), abs=1)
    assert "sparse" not in modes(0.0) and "subset" not in modes(1.0)[4:]
    half = modes(0.5)[4::2]
    assert all(a != b for a, b in zip(half[:-1], half[1:], strict=True))  # alternate: evenly spread


def test_sparse_rows_keep_every_patch_the_answer_needs_and_few_others():
    rng = random.Random(5)
    sizes = []
    for _ in range(40):
        sc = scenes.make_scene(rng, 12)
        qa = scenes_qa.make_question(sc, rng, rng.choice(scenes_qa.QTYPES))
        kept = set(scenes_recipe._kept(sc, [qa], rng, 144, "sparse").tolist())
        assert set(qa.relevant) <= kept
        sizes.append(len(kept - set(qa.relevant)) / (144 - len(qa.relevant)))
    assert max(sizes) < 0.3 and sum(sizes) / len(sizes) < 0.15  # others kept at U(0, 0.2)


def test_scenes_reference_trains_with_the_count_term_and_sparse_rows(tmp_path):
    """mllm.count_supervision adds its term on the lookup's layer, mllm.sparse_share its
    rows; both are recorded, neither when off, and the count term needs a later layer."""
    logs: list[str] = []
    params = MLLMParams(
        **{**TINY, "lm_steps": 8, "lm_layers": 2, "count_supervision": 1.0, "sparse_share": 0.5}
    )
    out = train_scenes_reference(tmp_path / "ref", params, log=logs.append)
    recipe = json.loads((out / "config.json").read_text())["evocomp"]["recipe"]
    assert recipe["count_supervision"] == 1.0 and recipe["sparse_share"] == 0.5
    assert recipe["lookup_layer"] == 1 and recipe["lookup_supervision"] == 0.0
    assert any("count term" in m for m in logs) and not any("lookup term" in m for m in logs)
    plain = recipe_record(MLLMParams(**TINY), set())
    assert "count_supervision" not in plain and "sparse_share" not in plain
    with pytest.raises(ValueError, match="lookup_layer"):
        MLLMParams(**{**TINY, "count_supervision": 1.0})  # 1 layer: nothing reads layer 1


def test_packed_subset_rows_keep_every_questions_anchors():
    rng = random.Random(4)
    for _ in range(20):
        sc = scenes.make_scene(rng, 12)
        qas = [scenes_qa.make_question(sc, rng, t) for t in ("colour", "count", "exists")]
        kept = set(scenes_recipe._kept(sc, qas, rng, 144, "subset").tolist())
        for qa in qas:
            for o in sc.objects:
                if set(o.patches) & set(qa.relevant):
                    assert min(o.patches) in kept
    assert scenes_recipe._kept(sc, qas, rng, 144, "full").tolist() == list(range(144))


def test_spatial_probe_reads_positions_and_not_noise(sp):
    """bench/scenes_spatial_probe.py: tokens that carry their column and row answer left-of
    and above from the two objects' mean tokens; tokens of noise do not."""
    rng = random.Random(0)
    images = [scenes.make_scene(rng, 12) for _ in range(300)]
    grid = torch.arange(144)
    where = torch.stack([grid % 12, grid // 12], 1).float()  # (col, row) per patch
    noise = torch.randn(300, 144, 2, generator=torch.Generator().manual_seed(0))
    for relation, axis in sp.RELATIONS.items():
        x, y = sp.pairs(images[:200], where.expand(200, -1, -1), random.Random(1), axis)
        xv, yv = sp.pairs(images[200:], where.expand(100, -1, -1), random.Random(2), axis)
        assert 0.3 < y.mean() < 0.7  # both orders asked
        assert sp.probe(x, y, xv, yv, 300, 0)["held_out"] > 0.95, relation
        x, y = sp.pairs(images[:200], noise[:200], random.Random(1), axis)
        xv, yv = sp.pairs(images[200:], noise[200:], random.Random(2), axis)
        assert sp.probe(x, y, xv, yv, 300, 0)["held_out"] < 0.75, relation


def test_spatial_probe_runs_on_a_scenes_model_only(scenes_model, tiny_llava, tmp_path, sp):
    """bench/scenes_spatial_probe.py end to end on the tiny scenes model (both relations
    scored on its own images); a checkpoint of another recipe is a one-line parser error."""
    out = tmp_path / "probe.json"
    flags = ["--model", str(scenes_model), "--steps", "20", "--cache", str(tmp_path / "t.pt")]
    rep = sp.main([*flags, "--out", str(out)])
    assert set(rep["relations"]) == set(sp.RELATIONS)
    for r in json.loads(out.read_text())["relations"].values():
        assert 0.0 <= r["held_out"] <= 1.0 and r["train_pairs"] > r["held_out_pairs"] > 0
    with pytest.raises(SystemExit) as err:
        sp.main(["--model", str(tiny_llava), "--out", str(out)])
    assert err.value.code == 2


def test_scenes_reference_can_compile_its_lm_steps(tmp_path, monkeypatch):
    """mllm.compile runs the same training steps through torch.compile: the same losses to
    float rounding, recorded in config.json (a recipe without it records nothing, so
    committed models keep their ids); the shapes recipe refuses it."""
    import re

    def first_loss(params: MLLMParams, name: str) -> tuple[float, dict]:
        logs: list[str] = []
        out = train_scenes_reference(tmp_path / name, params, log=logs.append)
        line = next(m for m in logs if m.startswith("lm step 2:"))
        loss = float(re.search(r"loss ([0-9.]+)", line).group(1))
        return loss, json.loads((out / "config.json").read_text())["evocomp"]["recipe"]

    compiled_modules = []

    def spy(module, **kw):  # the real compiler, recording what it was handed
        compiled_modules.append(type(module).__name__)
        return real_compile(module, **kw)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", spy)
    base = {**TINY, "lm_layers": 2, "lookup_supervision": 1.0}
    eager, recipe = first_loss(MLLMParams(**base), "eager")
    assert compiled_modules == []
    compiled, compiled_recipe = first_loss(MLLMParams(**base, compile=True), "compiled")
    assert compiled_modules == ["LlamaModel"]  # the LM, once
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
    assert "compile" not in recipe and compiled_recipe["compile"] is True
    with pytest.raises(ValueError, match="only the scenes-vqa recipe"):
        MLLMParams(compile=True)
