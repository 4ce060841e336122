"""The library stages chained on a tiny random LLaVA: features -> label -> export -> train -> evaluate."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import replace

import pandas as pd
import pytest
import torch

from evocomp.compress.fit import best_epoch
from evocomp.compress.model import keep_logits, load_compressor, select_topk
from evocomp.compress.training import items_from_labels, train_compressor
from evocomp.config import Params, SearchParams, TrainParams
from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset
from evocomp.errors import DatasetError, ModelError
from evocomp.features.cache import FeatureStore
from evocomp.features.compute import ensure_features
from evocomp.labeling.sample import fitness_fn, label_and_store, label_sample
from evocomp.labeling.steps import register_samples
from evocomp.mllm.hf_llava import HFLlava, checkpoint_info
from evocomp.store import export_labels, get_engine, get_or_create_run, upgrade
from evocomp.tolerance import loss_on_grid

SMALL = SearchParams(population=8, parents=4, generations=2)


@pytest.fixture(scope="module")
def world(tiny_llava, shapes_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    write_prepared(read_dataset(shapes_data), root / "prepared", "shapes")
    samples = load_prepared(root / "prepared")
    mllm = HFLlava(tiny_llava)
    fstore = ensure_features(mllm, samples, root / "features", batch_size=16)
    url = f"sqlite:///{root}/store.db"
    upgrade(url)
    engine = get_engine(url)
    register_samples(engine, "shapes", str(shapes_data), samples)
    run = get_or_create_run(engine, mllm.model_id, SMALL.model_dump(), "test")
    for s in samples:
        assert label_and_store(mllm, s, fstore.get(s.id), SMALL, engine, run) == "done"
    export_labels(engine, root / "labels.parquet", model_id=mllm.model_id)
    return {"root": root, "samples": samples, "mllm": mllm, "fstore": fstore, "engine": engine}


def test_features_cached_once(world):
    fstore, mllm = world["fstore"], world["mllm"]
    shards = sorted(fstore.dir.glob("shard-*"))
    again = ensure_features(mllm, world["samples"], world["root"] / "features")
    assert sorted(again.dir.glob("shard-*")) == shards  # nothing recomputed
    f = FeatureStore(world["root"] / "features", mllm.model_id).get(world["samples"][0].id)
    assert f.tokens.shape == (36, 64) and f.nearest.shape == (36,) and f.text.shape[1] == 64


def test_features_with_nan_refused(world):
    f = world["fstore"].get(world["samples"][0].id)
    bad = replace(f, tokens=f.tokens.clone())
    bad.tokens[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        label_sample(world["mllm"], world["samples"][0], bad, SMALL)
    assert f.cells.shape == (36, 2) and f.layout.tolist() == [6, 6]
    with pytest.raises(ValueError, match="cells"):
        label_sample(world["mllm"], world["samples"][0], replace(f, cells=f.cells[:5]), SMALL)


@pytest.mark.parametrize("mode", ["paper", "budget"])
def test_label_sample_is_deterministic(world, mode):
    s = world["samples"][1]
    p = SMALL.model_copy(update={"mode": mode})
    a = label_sample(world["mllm"], s, world["fstore"].get(s.id), p)
    b = label_sample(world["mllm"], s, world["fstore"].get(s.id), p)
    assert a.result.kept == b.result.kept and a.result.loss == b.result.loss
    assert set(a.result.heuristic_losses) == set(SMALL.heuristics)
    if mode == "budget":  # seeded with the heuristics: never worse than the best of them
        assert a.result.loss <= min(a.result.heuristic_losses.values()) + 1e-6
        assert a.result.k == 12
    else:
        assert a.result.k == a.result.n_groups == len(set(a.groups))


def test_export_has_one_label_per_sample(world):
    df = pd.read_parquet(world["root"] / "labels.parquet")
    assert len(df) == len(world["samples"]) and df["sample_id"].is_unique
    assert (df["k"] == df["n_groups"]).all()


@pytest.mark.parametrize("monitor", ["precision", "loss"])
def test_train_and_refuse_mismatch(world, tiny_llava, tmp_path, monitor):
    info = checkpoint_info(tiny_llava)
    params = TrainParams(epochs=4, patience=4, monitor=monitor)
    history, summary = train_compressor(
        world["root"] / "labels.parquet",
        world["root"] / "features",
        info,
        params,
        tmp_path / "comp",
    )
    assert len(history) == 4 and (tmp_path / "comp" / "model.safetensors").is_file()
    # the summary (metrics/train.json) reports the epoch whose weights were saved
    best = best_epoch(history, monitor)
    assert (summary["best_epoch"], summary["val_loss"]) == (best["epoch"], best["val_loss"])
    _, extra = load_compressor(tmp_path / "comp")
    assert extra["best_epoch"] == best["epoch"]
    assert summary["label_set_hash"] and summary["model_id"] == info["model_id"]
    labels = pd.read_parquet(world["root"] / "labels.parquet")
    assert extra["label_keep_ratio"] == round(float((labels.k / labels.n_tokens).mean()), 4)
    # a random ranking's precision, the yardstick printed beside val_precision
    val = labels[labels.split == "val"]
    assert summary["val_precision_chance"] == pytest.approx(float((val.k / val.n_tokens).mean()))
    other = FeatureStore(world["root"] / "features", "another-model")
    df = pd.read_parquet(world["root"] / "labels.parquet")
    with pytest.raises(ValueError, match="made with model"):
        items_from_labels(df, other)
    df.loc[0, "n_tokens"] = 99
    with pytest.raises(ValueError, match="label has 99 tokens"):
        items_from_labels(df, world["fstore"])


def test_answer_loss_monitor_is_the_labels_loss_from_the_compressors_top_k(
    world, tiny_llava, tmp_path
):
    """train.monitor answer_loss: val_answer_loss is the mean, over the val labels' samples, of
    the loss the search minimised (fitness_fn, on the loss grid) for the saved compressor's top
    k at each label's own k; its yardsticks are the val labels' own and all-token losses."""
    info = checkpoint_info(tiny_llava)
    params = TrainParams(epochs=3, patience=3, monitor="answer_loss")
    labels = world["root"] / "labels.parquet"
    args = (labels, world["root"] / "features", info, params, tmp_path / "comp")
    with pytest.raises(ValueError, match="needs the labels' MLLM"):
        train_compressor(*args)
    history, summary = train_compressor(*args, mllm=world["mllm"])
    assert all(r["val_answer_loss"] is not None for r in history)
    best = best_epoch(history, "answer_loss")
    assert best["val_answer_loss"] == min(r["val_answer_loss"] for r in history)
    assert (summary["best_epoch"], summary["val_answer_loss"]) == (
        best["epoch"],
        best["val_answer_loss"],
    )
    model, _ = load_compressor(tmp_path / "comp")
    df = pd.read_parquet(labels)
    val = df[df.split == "val"]
    by_id = {s.id: s for s in world["samples"]}
    losses = []
    for row in val.itertuples():
        f = world["fstore"].get(row.sample_id)
        top = select_topk(keep_logits(model, f.tokens, f.cells, f.text), k=int(row.k))
        fitness = fitness_fn(world["mllm"], by_id[row.sample_id], f)
        losses.append(loss_on_grid(float(fitness(top[None])[0])))
    assert summary["val_answer_loss"] == loss_on_grid(sum(losses) / len(losses))
    assert summary["val_label_loss"] == pytest.approx(val["loss"].mean(), abs=1e-6)
    assert summary["val_full_loss"] == pytest.approx(val["full_loss"].mean(), abs=1e-6)


def test_restarts_keep_the_run_the_monitor_scores_best(world, tiny_llava, tmp_path):
    """train.restarts 3 fits seeds 5, 6, 7 and saves the one whose kept epoch scores lowest:
    byte for byte the compressor a single training from that seed saves."""
    info = checkpoint_info(tiny_llava)
    params = TrainParams(epochs=3, patience=3, monitor="loss", seed=5, restarts=3)
    common = (world["root"] / "labels.parquet", world["root"] / "features", info)
    seen = []
    history, summary = train_compressor(
        *common, params, tmp_path / "best", log=lambda r: seen.append(r["seed"])
    )
    runs = summary["restarts"]
    assert [r["seed"] for r in runs] == [5, 6, 7] and sorted(set(seen)) == [5, 6, 7]
    assert len({r["score"] for r in runs}) > 1  # the seeds differ, so the choice is real
    pick = min(runs, key=lambda r: (r["score"], r["seed"]))
    assert summary["seed"] == pick["seed"] and summary["best_epoch"] == pick["best_epoch"]
    single, one = train_compressor(
        *common,
        params.model_copy(update={"seed": pick["seed"], "restarts": 1}),
        tmp_path / "single",
    )
    assert single == history and "restarts" not in one
    best, single = (load_compressor(tmp_path / d)[1] for d in ("best", "single"))
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == (
        tmp_path / "single" / "model.safetensors"
    ).read_bytes()
    # the same record but for the restart fields; its params retrain this model in one run
    assert {k: v for k, v in best.items() if k not in ("seed", "restarts")} == single
    assert best["params"]["seed"] == pick["seed"] and "restarts" not in best["params"]


def test_train_cli_reports_the_answer_loss_and_the_kept_restart(world, tiny_llava, tmp_path):
    from typer.testing import CliRunner

    from evocomp.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(
        "train: {epochs: 2, patience: 2, monitor: answer_loss, restarts: 2, seed: 3}\n"
    )
    metrics = tmp_path / "train.json"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--labels",
            str(world["root"] / "labels.parquet"),
            "--features",
            str(world["root"] / "features"),
            "--model",
            str(tiny_llava),
            "--out",
            str(tmp_path / "comp"),
            "--curve",
            str(tmp_path / "curve.csv"),
            "--metrics",
            str(metrics),
            "--params",
            str(params),
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    out = json.loads(metrics.read_text())
    assert [r["seed"] for r in out["restarts"]] == [3, 4] and out["seed"] in (3, 4)
    assert {"val_answer_loss", "val_label_loss", "val_full_loss"} <= set(out)
    assert f"seed {out['seed']} of 2" in res.output
    assert f"val answer loss {out['val_answer_loss']}" in res.output
    assert "seed 4 epoch 2:" in res.output  # progress names each run's seed
    assert "val_answer_loss" in (tmp_path / "curve.csv").read_text().splitlines()[0]


def test_evaluate_every_method(world, tiny_llava, tmp_path):

    from evocomp.evaluation.report import print_table
    from evocomp.evaluation.run import run_evaluation

    info = checkpoint_info(tiny_llava)
    train_compressor(
        world["root"] / "labels.parquet",
        world["root"] / "features",
        info,
        TrainParams(epochs=1),
        tmp_path / "comp",
    )
    params = Params()
    seen: list[tuple[str, int, int]] = []

    def evaluate(compressor: str, **kw) -> dict:
        root = world["root"]
        return run_evaluation(
            params, root / "prepared", root / "features", root / "labels.parquet",
            tmp_path / compressor, world["mllm"], tmp_path / "no-bench.json", **kw,
        )  # fmt: skip

    result = evaluate(
        "comp",
        progress=lambda phase, done, total: seen.append((phase, done, total)),
    )
    n_test = result["samples"]  # progress reached every test sample at both pruning positions
    assert ("evaluate (l=0)", n_test, n_test) in seen
    assert ("evaluate (l=1)", n_test, n_test) in seen
    assert set(result["ratios"]) == {"0.500", "0.333", "0.222", "0.111"}
    assert set(result["ratios"]["0.333"]) == set(params.evaluate.methods)
    assert result["tokens"]["0.333"] == 12 and "evocomp_l1" in result
    # every token-selecting method at the other pruning position too (the mergers: l=0 only)
    selectors = set(params.evaluate.methods) - {"visionzip", "prumerge"}
    assert {"sparsevlm", "prumerge"} <= set(result["ratios"]["0.333"])
    assert set(result["ratios_l1"]["0.333"]) == selectors
    assert result["evocomp_l1"]["0.333"] == result["ratios_l1"]["0.333"]["evocomp"]
    for key in ("stderr", "stderr_l1"):
        for r, row in result[key].items():
            acc = result["ratios" + key.removeprefix("stderr")][r]
            for m, se in row.items():
                want = (acc[m] * (1 - acc[m]) / result["samples"]) ** 0.5
                assert se == pytest.approx(want, abs=1e-4)
    for key in ("paired", "paired_l1"):  # evocomp minus each other method, sample by sample
        accs = result["ratios" + key.removeprefix("paired")]
        for r, row in result[key].items():
            assert set(row) == set(accs[r]) - {"evocomp", "oracle"}
            for m, d in row.items():
                assert d["diff"] == pytest.approx(accs[r]["evocomp"] - accs[r][m], abs=2e-4)
                assert d["evocomp_only"] - d["other_only"] == round(d["diff"] * n_test)
    assert (
        result["prefill_flops"]["0.111"]["ratio_to_full"]
        < result["prefill_flops"]["0.500"]["ratio_to_full"]
        < 1
    )
    assert "full" in result["latency_seconds"]
    json.dumps(result)
    assert "oracle" in print_table(result)
    # evocomp_fill: the compressor's own top-k up to its labels' size, so the same kept sets
    # (and answers) as evocomp at every ratio at or below it
    label_ratio = load_compressor(tmp_path / "comp")[1]["label_keep_ratio"]
    for r, row in result["ratios"].items():
        if float(r) <= label_ratio:
            assert row["evocomp_fill"] == row["evocomp"]
    config = tmp_path / "comp" / "config.json"
    meta = json.loads(config.read_text())
    del meta["extra"]["label_keep_ratio"]  # a compressor trained before the field existed
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not record its labels' keep ratio"):
        evaluate("comp")
    with pytest.raises(FileNotFoundError, match="no compressor"):
        evaluate("missing")


def test_evaluate_ranks_each_ratio_by_the_compressor_trained_nearest_it(
    world, tiny_llava, tmp_path
):
    """One compressor per label budget: every ratio's EvoComp rows are those of the one whose
    labels' keep ratio is nearest by factor, as if it had been evaluated alone."""
    import math

    from evocomp.evaluation.run import run_evaluation

    info = checkpoint_info(tiny_llava)
    common = (world["root"] / "labels.parquet", world["root"] / "features", info)
    for name, seed in (("a", 0), ("b", 1)):
        train_compressor(*common, TrainParams(epochs=1, seed=seed), tmp_path / name)
    ratio_a = load_compressor(tmp_path / "a")[1]["label_keep_ratio"]
    ratio_b = 0.111 if ratio_a > 0.3 else 0.5  # b claims labels of another budget
    config = tmp_path / "b" / "config.json"
    meta = json.loads(config.read_text())
    meta["extra"]["label_keep_ratio"] = ratio_b
    config.write_text(json.dumps(meta))
    params = Params.model_validate({"evaluate": {"methods": ["evocomp", "evocomp_fill"]}})

    def evaluate(*names: str) -> dict:
        root = world["root"]
        return run_evaluation(
            params, root / "prepared", root / "features", root / "labels.parquet",
            [tmp_path / n for n in names], world["mllm"], tmp_path / "no-bench.json",
        )  # fmt: skip

    both, alone = evaluate("a", "b"), {n: evaluate(n) for n in ("a", "b")}
    assert "compressor_for_ratio" not in alone["a"] and "compressor_choice" not in alone["a"]
    assert both["compressor_choice"] == {"rule": "nearest"}
    for r in params.evaluate.ratios:
        near = min((ratio_a, "a"), (ratio_b, "b"), key=lambda c: (abs(math.log(r / c[0])), c[0]))
        key = f"{r:.3f}"
        assert both["compressor_for_ratio"][key] == str(tmp_path / near[1])
        for rows in ("ratios", "ratios_l1"):
            assert both[rows][key] == alone[near[1]][rows][key], (rows, key)
    assert set(both["compressor_for_ratio"].values()) == {str(tmp_path / "a"), str(tmp_path / "b")}
    with pytest.raises(ValueError, match="both trained on labels of keep ratio"):
        evaluate("a", "a")
    # --route: another evaluation's choice serves the ratios it names (here b, even where a is
    # nearer), the nearest budget the rest; a route to a folder not passed is refused
    first, *rest = params.evaluate.ratios
    route = tmp_path / "eval.json"
    route.write_text(
        json.dumps({"compressor_for_ratio": {f"{r:.3f}": str(tmp_path / "b") for r in rest}})
    )
    root = world["root"]

    def routed(*names: str) -> dict:
        return run_evaluation(
            params, root / "prepared", root / "features", root / "labels.parquet",
            [tmp_path / n for n in names], world["mllm"], tmp_path / "no-bench.json",
            route_from=route,
        )  # fmt: skip

    given = routed("a", "b")
    assert given["compressor_choice"] == {"rule": "route", "route": str(route)}
    for r in params.evaluate.ratios:
        key = f"{r:.3f}"
        name = "b" if r in rest else both["compressor_for_ratio"][key][-1]
        assert given["compressor_for_ratio"][key] == str(tmp_path / name)
        assert given["ratios"][key] == alone[name]["ratios"][key], key
    with pytest.raises(ValueError, match="which is not among the --compressor folders"):
        routed("a")


@pytest.mark.parametrize("rule", ["val_answer_loss", "select_answer_loss"])
def test_evaluate_can_choose_each_ratios_compressor_by_its_held_out_answer_loss(
    world, tiny_llava, tmp_path, rule
):
    """``evaluate.choose``: each ratio goes to the compressor whose top k answers the held-out
    samples best -- the val split (``val_answer_loss``) or the train images every compressor
    left out of fitting (``select_answer_loss``, ``train.select_share``) -- recomputed here
    through the training code's ranking and the search's fitness; the test rows are that
    compressor's, as if it were evaluated alone."""
    import math

    from evocomp.data.samples import held_for_selection
    from evocomp.evaluation.run import run_evaluation
    from evocomp.tokens import keep_count

    info = checkpoint_info(tiny_llava)
    common = (world["root"] / "labels.parquet", world["root"] / "features", info)
    share = 0.4 if rule == "select_answer_loss" else 0.0
    for name, seed in (("a", 0), ("b", 3)):
        train_compressor(
            *common, TrainParams(epochs=1, seed=seed, select_share=share), tmp_path / name
        )
    ratio_a = load_compressor(tmp_path / "a")[1]["label_keep_ratio"]
    ratio_b = 0.111 if ratio_a > 0.3 else 0.5
    config = tmp_path / "b" / "config.json"
    meta = json.loads(config.read_text())
    meta["extra"]["label_keep_ratio"] = ratio_b
    config.write_text(json.dumps(meta))
    params = Params.model_validate({"evaluate": {"methods": ["evocomp"], "choose": rule}})
    root, mllm = world["root"], world["mllm"]

    def evaluate(*names: str, prepared=root / "prepared") -> dict:
        return run_evaluation(
            params, prepared, root / "features", root / "labels.parquet",
            [tmp_path / n for n in names], mllm, tmp_path / "no-bench.json",
        )  # fmt: skip

    if rule == "val_answer_loss":
        held = load_prepared(root / "prepared", "val")
        # no share: nothing held out, and the config reads as before select_share existed
        summary = load_compressor(tmp_path / "a")[1]
        assert "select_share" not in summary["params"] and "select_samples" not in summary
    else:  # the train images of the share, drawn from the image bytes alone
        train = load_prepared(root / "prepared", "train")
        held = [s for s in train if held_for_selection(s.image.read_bytes(), share)]
        assert 0 < len(held) < len(train)
        summary = load_compressor(tmp_path / "a")[1]
        assert summary["params"]["select_share"] == share
        assert (summary["train_samples"], summary["select_samples"]) == (
            len(train) - len(held),
            len(held),
        )
    assert held
    want: dict = {}
    for name, label_ratio in (("a", ratio_a), ("b", ratio_b)):
        model = load_compressor(tmp_path / name)[0]
        for r in params.evaluate.ratios:
            losses = []
            for s in held:
                f = world["fstore"].get(s.id)
                kept = select_topk(
                    keep_logits(model, f.tokens, f.cells, f.text), keep_count(r, len(f.tokens))
                )
                losses.append(loss_on_grid(float(fitness_fn(mllm, s, f)(kept[None])[0])))
            want.setdefault(f"{r:.3f}", {})[f"{label_ratio:.3f}"] = loss_on_grid(
                sum(losses) / len(losses)
            )
    both, alone = evaluate("a", "b"), {n: evaluate(n) for n in ("a", "b")}
    choice = both["compressor_choice"]
    split = "val" if rule == "val_answer_loss" else "select"
    assert choice == {"rule": rule, f"{split}_samples": len(held), rule: want}
    folder = {f"{ratio_a:.3f}": "a", f"{ratio_b:.3f}": "b"}
    for r in params.evaluate.ratios:
        key = f"{r:.3f}"
        best = min(
            (ratio_a, ratio_b),
            key=lambda lr, r=r: (want[key][f"{lr:.3f}"], abs(math.log(r / lr)), lr),
        )
        name = folder[f"{best:.3f}"]
        assert both["compressor_for_ratio"][key] == str(tmp_path / name)
        for rows in ("ratios", "ratios_l1"):
            assert both[rows][key] == alone[name][rows][key], (rows, key)
    if rule == "select_answer_loss":
        # a compressor fitted on the share (none left out, or another share): one line naming
        # it, before any test sample is scored
        for other in (0.0, 0.2):
            train_compressor(*common, TrainParams(epochs=1, select_share=other), tmp_path / "c")
            config = tmp_path / "c" / "config.json"
            meta = json.loads(config.read_text())
            meta["extra"]["label_keep_ratio"] = 0.9
            config.write_text(json.dumps(meta))
            with pytest.raises(ValueError, match=f"c was trained with train.select_share {other}"):
                evaluate("a", "b", "c")
        return
    # no val split to choose on: one line naming the fix, before any test sample is scored
    df = pd.read_parquet(root / "prepared" / "samples.parquet")
    no_val = tmp_path / "no-val"
    no_val.mkdir()
    df[df["split"] != "val"].to_parquet(no_val / "samples.parquet", index=False)
    with pytest.raises(ValueError, match="val split is empty.*evaluate.choose: nearest"):
        evaluate("a", "b", prepared=no_val)
    nearest = Params.model_validate({"evaluate": {"methods": ["evocomp"]}})
    assert nearest.evaluate.choose == "nearest"
    with pytest.raises(ValueError, match="choose"):
        Params.model_validate({"evaluate": {"choose": "test_accuracy"}})


def test_paired_difference_counts_only_the_samples_one_method_answers():
    from evocomp.evaluation.harness import paired_difference

    ours = [True] * 6 + [False] * 4  # 0.6
    theirs = [True] * 5 + [False, True, False, False, False]  # 0.6 too, other samples
    same = paired_difference(ours, theirs)
    assert same == {"diff": 0.0, "stderr": 0.1414, "evocomp_only": 1,
                    "other_only": 1}  # fmt: skip
    # 8 of 10 both right, ours one more: d = (1, 0 x 9); var = 0.1 - 0.01 = 0.09
    d = paired_difference([True] * 9 + [False], [True] * 8 + [False, False])
    assert d == {"diff": 0.1, "stderr": 0.0949, "evocomp_only": 1, "other_only": 0}
    # unpaired, the difference of 0.9 and 0.8 on 10 samples each has error sqrt(0.095^2 +
    # 0.126^2) = 0.158: pairing drops the 8 samples both answer
    assert paired_difference([True] * 4, [True] * 4)["stderr"] == 0.0
    with pytest.raises(ValueError, match="paired difference of 2 and 3"):
        paired_difference([True, False], [True, True, False])


def test_oracle_ranking_prefers_label():
    from types import SimpleNamespace

    from evocomp.evaluation.harness import oracle_ranking

    row = SimpleNamespace(n_tokens=6, kept=[4, 1], soft=[0, 0.5, 0, 0.9, 1.0, 0])
    assert oracle_ranking(row).topk(3).indices.tolist() == [4, 1, 3]
    assert torch.equal(oracle_ranking(row).topk(1).indices, torch.tensor([4]))


def test_label_sets_of_several_budgets_give_one_graded_target(world):
    small = pd.read_parquet(world["root"] / "labels.parquet")
    large = small.copy()  # a second budget: the small label plus two more tokens
    large["kept"] = [sorted({*map(int, k), 0, 35}) for k in small["kept"]]
    large["k"] = large["kept"].map(len)
    large["soft"] = None
    items = items_from_labels([small, large], world["fstore"])
    first = next(iter(small.itertuples()))
    item = items[first.split][0]
    in_small, extra = set(map(int, first.kept)), {0, 35} - set(map(int, first.kept))
    assert all(item.target[t] == 1.0 for t in in_small)
    assert all(item.target[t] == 0.5 for t in extra)  # kept by one budget of two
    assert float(item.target.sum()) == len(in_small) + 0.5 * len(extra)
    assert item.soft is None  # one set without soft labels: no soft target
    with pytest.raises(ValueError, match="cover different samples"):
        items_from_labels([small, large.iloc[1:]], world["fstore"])


def test_oracle_uses_the_label_searched_at_each_ratio(world):
    from evocomp.evaluation.harness import Selector, oracle_ranking
    from evocomp.tokens import keep_count

    small = pd.read_parquet(world["root"] / "labels.parquet")
    k = keep_count(1 / 3, 36)
    at_k = small.copy()
    at_k["kept"], at_k["k"], at_k["soft"] = [list(range(36 - k, 36))] * len(small), k, None
    samples = world["samples"][:2]
    feats = [world["fstore"].get(s.id) for s in samples]
    sel = Selector(world["mllm"], {}, labels=[small, at_k])
    scores = sel.scores("oracle", samples, feats)
    assert [t.tolist() for t in sel.kept("oracle", 1 / 3, samples, feats, scores)] == [
        list(range(36 - k, 36))
    ] * 2  # the label searched at k, not the first set's ranking
    by_id = small.set_index("sample_id")
    k9 = keep_count(1 / 9, 36)
    want = [
        sorted(oracle_ranking(by_id.loc[s.id].rename(s.id)).topk(k9).indices.tolist())
        for s in samples
    ]
    assert [t.tolist() for t in sel.kept("oracle", 1 / 9, samples, feats, scores)] == want


def test_elimination_soft_target_ranks_the_label_by_worth(world):
    """soft_target elimination: the same label, its tokens ranked 1/k..1 by backward
    elimination through the model (the last one dropped is worth most), 0 elsewhere; k - 1
    forwards more than the elite's target; the same on a second run."""
    s = world["samples"][2]
    feats = world["fstore"].get(s.id)
    p = SMALL.model_copy(update={"mode": "budget"})
    elite = label_sample(world["mllm"], s, feats, p).result
    lab = label_sample(world["mllm"], s, feats, p.model_copy(update={"soft_target": "elimination"}))
    r = lab.result
    assert r.kept == elite.kept and r.loss == elite.loss  # the search itself is untouched
    assert r.n_forwards == elite.n_forwards + r.k - 1
    soft = torch.tensor(r.soft)
    assert sorted(soft[r.kept].tolist()) == pytest.approx([(i + 1) / r.k for i in range(r.k)])
    assert soft.sum() == pytest.approx(sum((i + 1) / r.k for i in range(r.k)))  # 0 elsewhere
    prompt = world["mllm"].encode(s.question, s.answer)
    costs = world["mllm"].subset_loss(
        prompt, feats.tokens, torch.tensor([[t for t in r.kept if t != x] for x in r.kept])
    )
    on_grid = [loss_on_grid(c) for c in costs.tolist()]
    first = int(torch.argmin(soft.masked_fill(soft == 0, 2.0)))  # ranked 1/k: dropped first
    assert on_grid[r.kept.index(first)] == min(on_grid)  # the cheapest token to lose
    again = label_sample(
        world["mllm"], s, feats, p.model_copy(update={"soft_target": "elimination"})
    )
    assert again.result.soft == r.soft


@pytest.mark.parametrize("mode", ["paper", "budget"])
def test_warm_start_seeds_the_search_with_the_compressor_pick(world, tiny_llava, tmp_path, mode):
    """label.warm_start: the compressor's pick (budget: its top k; paper: its best-scored
    member of each group) is scored in the search's first generation and never beaten by
    the label, is no heuristic, and the run key holds the compressor's content: the same
    bytes elsewhere key the same run, other weights another; a compressor of another model
    or none at all is refused before any search."""
    import shutil

    from evocomp.compress.model import keep_logits
    from evocomp.labeling.sample import check_warm_start, warm_start_sets
    from evocomp.search import SearchSpace
    from evocomp.search.ga import run_spec

    info = checkpoint_info(tiny_llava)
    comp = tmp_path / "comp"
    train_compressor(
        world["root"] / "labels.parquet", world["root"] / "features", info,
        TrainParams(epochs=2, patience=2), comp,
    )  # fmt: skip
    s, mllm = world["samples"][3], world["mllm"]
    feats = world["fstore"].get(s.id)
    p = SMALL.model_copy(update={"mode": mode, "warm_start": str(comp)})
    space = SearchSpace.build(feats.nearest, None, p)
    (pick,) = warm_start_sets(mllm, feats, space, p).values()
    model, _ = load_compressor(comp)
    logits = keep_logits(model, feats.tokens, feats.cells, feats.text)
    if mode == "budget":
        assert set(pick.tolist()) == set(logits.topk(space.k).indices.tolist())
    else:  # one token per group, the group's best-scored
        assert sorted(space.group_of[t] for t in pick.tolist()) == list(range(len(space.members)))
        assert all(logits[t] == logits[m].max() for t, m in zip(pick, space.members, strict=True))
    r = label_sample(mllm, s, feats, p).result
    seeded = loss_on_grid(mllm.subset_loss(mllm.encode(s.question, s.answer), feats.tokens,
                                           pick.sort().values[None])[0])  # fmt: skip
    assert r.loss <= seeded and "compressor" not in r.heuristic_losses
    assert r.trace[0]["best"] <= seeded  # in generation 0 already
    copy = tmp_path / "elsewhere"
    shutil.copytree(comp, copy)
    key = run_spec(p)["warm_start"]
    assert key.startswith("compressor-") and str(comp) not in json.dumps(run_spec(p))
    assert run_spec(p.model_copy(update={"warm_start": str(copy)}))["warm_start"] == key
    (copy / "model.safetensors").write_bytes(
        (comp / "model.safetensors").read_bytes()[:-4] + b"\0" * 4
    )
    assert run_spec(p.model_copy(update={"warm_start": str(copy)}))["warm_start"] != key
    meta = json.loads((comp / "config.json").read_text())
    meta["extra"]["model_id"] = "mllm-another"
    (copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="trained for model 'mllm-another'"):
        check_warm_start(str(copy), mllm.model_id)
    with pytest.raises(FileNotFoundError, match="no compressor at"):
        check_warm_start(str(tmp_path / "nothing"), mllm.model_id)


def test_distill_objective_scores_the_kl_from_all_tokens(world):
    """objective distill: all tokens score 0, the label and every heuristic are scored by
    their KL divergence from the all-token answer distribution (not the answer's CE), the
    label is never worse than the best heuristic, and the run gets its own key while the
    default objective keeps the key the store had before the field existed."""
    from evocomp.search.ga import ALGORITHM_VERSION, run_spec

    s = world["samples"][2]
    feats = world["fstore"].get(s.id)
    p = SMALL.model_copy(update={"mode": "budget", "objective": "distill"})
    lab = label_sample(world["mllm"], s, feats, p)
    r = lab.result
    assert lab.full_loss == 0.0 and r.loss >= 0.0
    assert r.loss <= min(r.heuristic_losses.values())
    prompt = world["mllm"].encode(s.question, s.answer)
    ref = world["mllm"].answer_logprobs(prompt, feats.tokens)
    kept = torch.tensor([r.kept])
    kl = world["mllm"].subset_loss(prompt, feats.tokens, kept, reference=ref)[0]
    ce = world["mllm"].subset_loss(prompt, feats.tokens, kept)[0]
    assert r.loss == loss_on_grid(kl) and r.loss != loss_on_grid(ce)
    answer = p.model_copy(update={"objective": "answer"})
    assert "objective" not in run_spec(answer)  # old stores' runs keep their keys
    assert run_spec(answer) == answer.model_dump(
        mode="json", exclude={"objective", "warm_start"}
    ) | {"algorithm": ALGORITHM_VERSION}
    assert run_spec(p)["objective"] == "distill"


def test_the_selection_share_is_drawn_by_image_apart_from_the_split(tmp_path):
    """``train.select_share``: an image is in or out by its bytes alone (every question on it
    goes the same way, a grown dataset moves none), about ``share`` of the train images, drawn
    independently of the hash that put them in train; only train-split samples are drawn."""
    from evocomp.data.samples import assign_split, held_for_selection, selection_share

    blobs = [f"image {i}".encode() for i in range(4000)]
    train = [b for b in blobs if assign_split(b, 0.1, 0.15) == "train"]
    held = [b for b in train if held_for_selection(b, 0.125)]
    assert 0.10 < len(held) / len(train) < 0.15
    assert not any(held_for_selection(b, 0.0) for b in train)
    assert all(held_for_selection(b, 0.125) == (b in held) for b in train[:200])  # stable
    assert {b for b in train if held_for_selection(b, 0.25)} >= set(held)  # shares nest
    # the split's own draw: train images are those with u >= 0.25; were the share drawn by
    # the same u, no train image would fall below 0.125
    paths = []
    for i, b in enumerate(held[:3] + [b for b in train if b not in held][:3]):
        (tmp_path / f"{i}.png").write_bytes(b)
        paths.append(tmp_path / f"{i}.png")
    Row = namedtuple("Row", "image split")
    rows = [Row(p, "train") for p in paths] + [Row(paths[0], "train"), Row(paths[1], "val")]
    picked = selection_share(rows, 0.125)
    assert [r.image for r in picked] == [*paths[:3], paths[0]]  # both rows of image 0; no val
    with pytest.raises(DatasetError, match="image not found"):
        selection_share([Row(tmp_path / "gone.png", "train")], 0.125)
    assert selection_share([Row(tmp_path / "gone.png", "train")], 0.0) == []  # nothing read
