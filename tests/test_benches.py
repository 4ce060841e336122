"""Smoke tests of the workspace benchmarks (label quality, throughput, ablation) on a tiny random
LLaVA, and unit tests of their helpers. No timing assertions: timings belong in bench/."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

SEARCH = ["--population", "8", "--parents", "2", "--generations", "1"]


@pytest.fixture
def bench(bench_module):
    """The benchmark modules."""
    return SimpleNamespace(
        setup=bench_module("_setup"),
        quality=bench_module("label_quality"),
        throughput=bench_module("label_throughput"),
        ablation=bench_module("ablation"),
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One workspace cache for the module: the scripts share synthetic sets and features."""
    return tmp_path_factory.mktemp("bench-cache")


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _run(main, out, argv):
    report = main([*argv, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert not list(out.parent.glob("*.tmp"))
    assert data["machine"]["cpu_count"] >= 1 and data["command"].split()[1].startswith("bench/")
    return data


def test_label_quality(bench, tiny_llava, cache, tmp_path):
    argv = ["--model", str(tiny_llava), "--samples", "4", "--cache", str(cache), *SEARCH]
    data = _run(bench.quality.main, tmp_path / "q.json", argv)
    assert set(data["modes"]) == {"paper", "budget"}
    for mode, r in data["modes"].items():
        assert r["samples"] == 4 and r["failed"] == 0, mode
        for key in (
            "mean_label_loss",
            "mean_full_loss",
            "mean_best_heuristic_loss",
            "margin_vs_best_method",
            "worse_than_best_heuristic",
            "mean_kept_fraction",
            "median_groups",
            "seconds_per_sample",
        ):
            assert _finite(r[key]), (mode, key)
        assert set(r["mean_heuristic_loss"]) == {
            "random",
            "pooling",
            "fastv",
            "visionzip",
            "divprune",
            "dart",
        }
        assert all(_finite(v) for v in r["mean_heuristic_loss"].values())
        assert r["mean_best_heuristic_loss"] <= min(r["mean_heuristic_loss"].values()) + 1e-9
        assert sum(r["group_histogram"].values()) == 4
        assert 0 < r["mean_kept_fraction"] <= 1
    # budget mode seeded with the heuristics: never worse than the best of them on any sample
    assert data["modes"]["budget"]["worse_samples"] == 0 and data["budget_never_worse"] is True
    assert data["modes"]["budget"]["mean_k"] == round(36 / 3)
    g = data["grouping"]
    assert 0 < g["mean_largest_group_fraction"] <= 1 and g["median_distinct_words"] >= 1
    assert isinstance(g["degenerate"], bool) and _finite(g["meaningful_nearest_word"])


def test_label_throughput(bench, tiny_llava, cache, tmp_path):
    argv = ["--model", str(tiny_llava), "--samples", "2", "--repeats", "1", "--cache", str(cache)]
    data = _run(bench.throughput.main, tmp_path / "t.json", [*argv, *SEARCH])
    for key in (
        "seconds_per_sample",
        "forwards_per_sample",
        "ratio_to_floor",
        "batched_speedup",
        "batched_speedup_at_population",
    ):
        assert _finite(data[key]) and data[key] > 0, key
    # generation 0 and generation 1 each score new candidates: 2 forwards
    assert data["forwards_per_sample"] == 2
    assert set(data["targets"]) == {"ratio_to_floor", "batched_speedup"}


def test_label_throughput_budget_mode_flags(bench, tiny_llava):
    args = bench.throughput.parse_args(["--benchmark", "scenes", "--keep-ratio", "0.111"])
    assert args.keep_ratio == 0.111
    assert args.out == REPO / "metrics" / "scenes" / "bench_label_throughput.json"
    assert bench.throughput.parse_args([]).out == REPO / "metrics" / "bench_label_throughput.json"
    with pytest.raises(SystemExit) as e:
        bench.throughput.parse_args(["--keep-ratio", "0"])
    assert e.value.code == 2


ABLATION = ["--samples", "16", "--epochs", "1"]


def test_ablation(bench, tiny_llava, cache, tmp_path):
    argv = ["--model", str(tiny_llava), *ABLATION, "--train-seeds", "1", "--cache", str(cache)]
    data = _run(bench.ablation.main, tmp_path / "a.json", [*argv, *SEARCH])
    assert set(data["accuracy"]) == set(bench.ablation.VARIANTS)
    n_test = data["splits"]["test"]
    assert data["accuracy_stderr_kind"] == "binomial" and data["train_seeds"] == [0]
    for name, acc in data["accuracy"].items():
        assert set(acc) == {"0.222", "0.111"}, name
        assert all(0.0 <= a <= 1.0 for a in acc.values()), name
        assert data["accuracy_per_seed"][name] == {k: [a] for k, a in acc.items()}
        for k, a in acc.items():  # one seed: the binomial standard error of the test accuracy
            se = data["accuracy_stderr"][name][k]
            assert se == pytest.approx(math.sqrt(a * (1 - a) / n_test)), (name, k)
    assert set(data["label_sets"]) == {"vocab", "random_in_group", "kmeans", "vocab_paper"}
    assert all(_finite(s["mean_loss"]) for s in data["label_sets"].values())
    assert data["splits"]["train"] >= 1 and data["splits"]["test"] >= 1
    labels = list((cache / "shapes-vqa-seed3-n16" / "labels").glob("*/*.parquet"))
    assert len(labels) == 4  # cached for the next run
    # the variants differ where they should
    train = {n: v["train"]["params"] for n, v in data["variants"].items()}
    assert train["full"]["loss"] == "ghm" and train["full"]["cos_alpha"] > 0
    assert train["ce_only"]["loss"] == "bce" and train["ce_only"]["cos_alpha"] == 0
    assert train["ce_cos"]["loss"] == "bce" and train["ce_cos"]["cos_alpha"] > 0
    assert train["focal_cos"]["loss"] == "focal" and train["focal_cos"]["cos_alpha"] > 0
    assert train["ghm_no_cos"]["cos_alpha"] == 0 and train["no_text"]["use_text"] is False


def test_ablation_over_training_seeds(bench, tiny_llava, cache, tmp_path, capsys):
    """Two seeds per variant on the same (cached) labels, at the ratios asked for."""
    argv = ["--model", str(tiny_llava), *ABLATION, "--cache", str(cache), *SEARCH]
    argv += ["--train-seeds", "2", "--ratios", "0.333,0.111", "--variants", "full,focal_cos"]
    data = _run(bench.ablation.main, tmp_path / "s.json", argv)
    assert data["ratios"] == ["0.333", "0.111"] and data["train_seeds"] == [0, 1]
    assert data["accuracy_stderr_kind"] == "seeds"
    assert set(data["accuracy"]) == {"full", "focal_cos"} and set(data["label_sets"]) == {"vocab"}
    for name, acc in data["accuracy"].items():
        v = data["variants"][name]
        assert [r["seed"] for r in v["train"]["runs"]] == v["train"]["seeds"] == [0, 1]
        # the seeds train different compressors (a different init and batch order)
        assert v["train"]["runs"][0]["val_loss"] != v["train"]["runs"][1]["val_loss"], name
        for k in ("0.333", "0.111"):
            per_seed = data["accuracy_per_seed"][name][k]
            assert len(per_seed) == 2 and acc[k] == pytest.approx(sum(per_seed) / 2)
            # sample std of two values / sqrt(2) = |a - b| / 2
            se = abs(per_seed[0] - per_seed[1]) / 2
            assert data["accuracy_stderr"][name][k] == pytest.approx(se), (name, k)
    assert data["variants"]["focal_cos"]["train"]["params"]["loss"] == "focal"
    out = capsys.readouterr().out
    assert "mean ± standard error over 2 training seeds" in out and "keep 0.333" in out


def test_workspace_is_cached_and_keyed_by_model(bench, tiny_llava, tmp_path):
    from conftest import make_tiny_llava

    ws = bench.setup.build_workspace(tiny_llava, 3, seed=5, cache=tmp_path, log=lambda _: None)
    dataset = ws.root / "raw" / "dataset.json"
    stamp = dataset.stat().st_mtime_ns
    other = make_tiny_llava(tmp_path / "other", seed=1)
    ws2 = bench.setup.build_workspace(other, 3, seed=5, cache=tmp_path, log=lambda _: None)
    assert ws2.root == ws.root and dataset.stat().st_mtime_ns == stamp  # data reused
    assert ws2.info["model_id"] != ws.info["model_id"]
    assert sorted(p.name for p in (ws.root / "features").iterdir()) == sorted(
        [ws.info["model_id"], ws2.info["model_id"]]
    )
    assert [s.id for s in ws2.samples] == [s.id for s in ws.samples]


def test_missing_model_is_a_clear_error(bench, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        bench.setup.build_workspace(tmp_path / "nope", 3, seed=5, cache=tmp_path)


@pytest.mark.parametrize(
    "points, k",
    [
        (torch.randn(10, 3), 1),  # one cluster
        (torch.randn(10, 3), 10),  # keep-all: every point its own cluster
        (torch.cat([torch.zeros(8, 3), torch.ones(2, 3)]), 3),  # 2 distinct points, 3 clusters
        (torch.zeros(5, 2), 2),  # all points identical
    ],
)
def test_kmeans_has_no_empty_cluster(bench, points, k):
    assign = bench.ablation.kmeans(points, k, seed=0)
    assert assign.shape == (points.shape[0],)
    assert torch.bincount(assign, minlength=k).min() >= 1 and int(assign.max()) == k - 1


def test_kmeans_recovers_planted_clusters(bench):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    points = centres[truth] + torch.randn(60, 2, generator=g)
    assign = bench.ablation.kmeans(points, 3, seed=1)
    # the same partition up to renaming: every planted cluster maps to one found cluster
    pairs = {(int(t), int(a)) for t, a in zip(truth, assign, strict=True)}
    assert len(pairs) == 3 and len({a for _, a in pairs}) == 3
    assert torch.equal(assign, bench.ablation.kmeans(points, 3, seed=1))  # deterministic


def test_kmeans_refuses_bad_k(bench):
    with pytest.raises(ValueError, match="k <= N"):
        bench.ablation.kmeans(torch.randn(4, 2), 5, seed=0)


def test_forward_shapes_checks_the_logbook(bench):
    log = [{"nevals": 5}, {"nevals": 0}, {"nevals": 3}]
    ok = SimpleNamespace(logbook=log, n_forwards=2, n_evals=8)
    assert bench.throughput.forward_shapes(ok) == [5, 3]
    with pytest.raises(RuntimeError, match="disagrees"):
        bench.throughput.forward_shapes(SimpleNamespace(logbook=log, n_forwards=3, n_evals=8))


@pytest.mark.parametrize(
    "module, argv",
    [
        ("quality", ["--modes", "paper,nope"]),
        ("quality", ["--keep-ratio", "0"]),
        ("throughput", ["--repeats", "0"]),
        ("ablation", ["--variants", "full,nope"]),
        ("ablation", ["--epochs", "0"]),
    ],
)
def test_bad_flags_are_refused(bench, module, argv):
    with pytest.raises(SystemExit):
        getattr(bench, module).parse_args(argv)
