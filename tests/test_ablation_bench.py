"""bench/ablation.py's seed aggregation and flags, on fakes (no model): the smoke runs of the
script itself are in test_benches.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from evocomp.config import TrainParams


@pytest.fixture
def ablation(bench_module):
    return bench_module("ablation")


def test_three_seeds_mean_stderr_and_per_seed(ablation):
    # by hand, 0.333: 0.5, 0.7, 0.6 -> mean 0.6, sample std 0.1, stderr 0.1 / sqrt(3)
    #          0.111: 0.25, 0.25, 0.4 -> mean 0.3, deviations -.05 -.05 .1, var .015 / 2, so
    #          std sqrt(0.0075) and stderr sqrt(0.0075 / 3) = 0.05
    runs = [
        {"0.333": 0.5, "0.111": 0.25},
        {"0.333": 0.7, "0.111": 0.25},
        {"0.333": 0.6, "0.111": 0.4},
    ]
    out = ablation.aggregate_seeds(runs, n_test=200)
    assert out["accuracy"] == pytest.approx({"0.333": 0.6, "0.111": 0.3})
    assert out["accuracy_per_seed"] == {"0.333": [0.5, 0.7, 0.6], "0.111": [0.25, 0.25, 0.4]}
    assert out["accuracy_stderr"] == pytest.approx({"0.333": 0.1 / math.sqrt(3), "0.111": 0.05})
    assert ablation.stderr_kind(3) == "seeds"


def test_equal_seeds_have_no_spread(ablation):
    out = ablation.aggregate_seeds([{"0.222": 0.75}] * 4, n_test=10)
    assert out["accuracy"] == {"0.222": 0.75} and out["accuracy_stderr"] == {"0.222": 0.0}


@pytest.mark.parametrize(
    "p, n_test, se",
    [(0.8, 100, 0.04), (0.5, 25, 0.1), (1.0, 30, 0.0), (0.0, 30, 0.0)],
    ids=["p0.8", "p0.5", "all-right", "all-wrong"],
)
def test_one_seed_gives_the_binomial_stderr(ablation, p, n_test, se):
    out = ablation.aggregate_seeds([{"0.111": p}], n_test=n_test)
    assert out["accuracy"] == {"0.111": p} and out["accuracy_per_seed"] == {"0.111": [p]}
    assert out["accuracy_stderr"]["0.111"] == pytest.approx(se)
    assert ablation.stderr_kind(1) == "binomial"


@pytest.mark.parametrize("runs, n_test", [([], 10), ([{"0.111": 0.5}], 0)])
def test_aggregate_refuses_nothing_to_aggregate(ablation, runs, n_test):
    with pytest.raises(ValueError, match="need >= 1 seed"):
        ablation.aggregate_seeds(runs, n_test)


def test_run_variant_trains_each_seed_on_the_same_labels(ablation, monkeypatch):
    """The wiring, with training and evaluation faked: one compressor per seed, each tested."""
    labels, test = object(), ["sample"] * 20
    items = {"train": ["t1", "t2"], "val": ["v1"]}
    trained = []

    def fake_items(df, fstore):
        assert df is labels  # every seed trains on the variant's one label set
        return items

    def fake_fit(train, val, params, device, llm_heads, llm_ffn, answer_loss):
        assert (train, val) == (items["train"], items["val"])
        assert answer_loss is None  # monitor precision: the MLLM is not asked
        trained.append(params)
        history = [
            {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_precision": 0.1 * params.seed}
        ]
        return SimpleNamespace(seed=params.seed), history

    def fake_evaluate(mllm, info, samples, fstore, ratios, methods, compressor):
        assert samples is test and methods == ["evocomp"]
        # seed s gets 10 + s hits of 20 at every ratio
        hits = [True] * (10 + compressor.seed) + [False] * (10 - compressor.seed)
        return {"hits": {f"evocomp@{r:.3f}": hits for r in ratios}}

    monkeypatch.setattr(ablation, "items_from_labels", fake_items)
    monkeypatch.setattr(ablation, "fit_compressor", fake_fit)
    monkeypatch.setattr(ablation, "evaluate_methods", fake_evaluate)
    ws = SimpleNamespace(fstore=None, mllm=None, info={"heads": 2, "ffn": 8})
    params = TrainParams(loss="focal", cos_alpha=0.2, seed=99)
    out = ablation.run_variant(
        ws, labels, test, params, "cpu", [1 / 3, 1 / 9], [4, 5, 6], log=lambda _: None
    )
    assert [tp.seed for tp in trained] == [4, 5, 6]
    assert all(tp.loss == "focal" and tp.cos_alpha == 0.2 for tp in trained)
    assert out["accuracy_per_seed"] == {"0.333": [0.7, 0.75, 0.8], "0.111": [0.7, 0.75, 0.8]}
    assert out["accuracy"]["0.333"] == pytest.approx(0.75)
    assert out["accuracy_stderr"]["0.111"] == pytest.approx(0.05 / math.sqrt(3))
    assert out["train"]["seeds"] == [4, 5, 6] and out["train"]["params"]["seed"] == 4
    assert [r["val_precision"] for r in out["train"]["runs"]] == pytest.approx([0.4, 0.5, 0.6])
    assert out["train"]["val_precision"] == pytest.approx(0.5)


def test_run_variant_scores_the_answer_loss_monitor_on_the_val_labels(ablation, monkeypatch):
    """train.monitor answer_loss: one monitor, built from the val rows with the labels' own
    objective and the workspace's MLLM, is handed to every seed's training."""
    import pandas as pd

    labels = pd.DataFrame(
        {"sample_id": ["a", "b", "c"], "split": ["train", "val", "val"], "k": [4, 5, 6]}
    )
    built, handed = [], []

    def fake_monitor(cases, mllm, objective):
        built.append(([(s.id, f, k) for s, f, k in cases], mllm, objective))
        return "the monitor"

    def fake_fit(train, val, params, device, llm_heads, llm_ffn, answer_loss):
        handed.append(answer_loss)
        history = [
            {
                "epoch": 1,
                "train_loss": 1.0,
                "val_loss": 0.5,
                "val_precision": 0.2,
                "val_answer_loss": 0.3,
            }
        ]
        return SimpleNamespace(seed=params.seed), history

    monkeypatch.setattr(ablation, "items_from_labels", lambda df, fs: {"train": [1], "val": [2]})
    monkeypatch.setattr(ablation, "answer_loss_monitor", fake_monitor)
    monkeypatch.setattr(ablation, "fit_compressor", fake_fit)
    monkeypatch.setattr(
        ablation,
        "evaluate_methods",
        lambda *a, **k: {"hits": {"evocomp@0.111": [True, False]}},
    )
    samples = {i: SimpleNamespace(id=i) for i in "abc"}
    ws = SimpleNamespace(
        fstore=SimpleNamespace(get=lambda i: f"features of {i}"),
        mllm="the mllm",
        info={"heads": 2, "ffn": 8},
        split=lambda name: [samples["c"], samples["b"]] if name == "val" else [samples["a"]],
    )
    params = TrainParams(monitor="answer_loss")
    ablation.run_variant(
        ws, labels, ["s"] * 2, params, "cpu", [1 / 9], [0, 1], lambda _: None, "distill"
    )
    assert built == [
        ([("b", "features of b", 5), ("c", "features of c", 6)], "the mllm", "distill")
    ]
    assert handed == ["the monitor", "the monitor"]


def test_ratios_default_to_the_exact_paper_ratios(ablation):
    args = ablation.parse_args([])
    assert args.ratios == [1 / 4.5, 1 / 9] and args.train_seeds == 3
    args = ablation.parse_args(["--ratios", "0.333,0.222,0.111", "--train-seeds", "1"])
    assert args.ratios == [0.333, 0.222, 0.111] and args.train_seeds == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--train-seeds", "0"],
        ["--ratios", "0.333,0.3331"],  # the same key in the metrics file
        ["--ratios", "1.5"],
        ["--ratios", "a,b"],
        ["--variants", "full,focal"],
    ],
)
def test_bad_ablation_flags_are_refused(ablation, argv):
    with pytest.raises(SystemExit):
        ablation.parse_args(argv)


def test_variants_are_the_issues_set(ablation):
    assert list(ablation.VARIANTS) == [
        "full",
        "ce_only",
        "ce_cos",
        "focal_cos",
        "ghm_no_cos",
        "no_text",
        "random_in_group",
        "kmeans_groups",
        "paper_labels",
    ]
    assert ablation.VARIANTS["ce_cos"] == ("vocab", {"loss": "bce"})
    assert ablation.VARIANTS["focal_cos"] == ("vocab", {"loss": "focal"})
    TrainParams(**ablation.VARIANTS["focal_cos"][1])  # a loss the config accepts
