"""The audit library: suspect ranking, run health, keep statistics, GHM advice, params.yaml edits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from evocomp.audit import ghm, params_edit, suspects
from evocomp.config import TrainParams, parse_params
from evocomp.errors import ParamsError

RULES = suspects.SuspectRules()


def fact(sample: str, run: int = 1, **kw) -> dict:
    """One healthy done label unless overridden."""
    row = {
        "label_id": hash((sample, run)) % 10_000,
        "run_id": run,
        "sample_id": sample,
        "status": "done",
        "k": 4,
        "n_tokens": 36,
        "n_groups": 4,
        "loss": 0.5,
        "full_loss": 0.45,
        "margin": 0.2,
        "agreement": None,
        "converged_gen": 3,
        "last_gen": 10,
        "qtype": "colour",
        "split": "train",
        "model_id": "m",
        "run_created": pd.Timestamp("2026-01-01") + pd.Timedelta(days=run),
    }
    return row | kw


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


# ---- suspects -----------------------------------------------------------------------------


def test_healthy_label_is_not_suspect():
    out = suspects.score_suspects(frame(fact("a")))
    assert not out["suspect"].iloc[0] and out["score"].iloc[0] == 0 and out["reasons"].iloc[0] == ""


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"margin": 0.001}, "margin"),
        ({"agreement": 0.2}, "agreement"),
        ({"loss": 1.5, "full_loss": 0.4}, "excess"),
        ({"converged_gen": 10, "last_gen": 10}, "not_converged"),
    ],
)
def test_each_reason_fires_alone(override, reason):
    out = suspects.score_suspects(frame(fact("a", **override)))
    assert out["suspect"].iloc[0] and out["reasons"].iloc[0] == reason
    assert 0 < out["score"].iloc[0] <= 1.0


def test_ranking_orders_by_severity_and_reason_count():
    rows = frame(
        fact("healthy"),
        fact("just-under-margin", margin=0.0099),  # barely: severity ~0.5
        fact("negative-margin", margin=-0.5),  # far past: severity 1
        fact("two-reasons", margin=0.0099, agreement=0.1),
        fact("failed", status="failed", margin=None, loss=None, full_loss=None),
    )
    out = suspects.score_suspects(rows)
    assert list(out["sample_id"])[:3] == ["two-reasons", "negative-margin", "just-under-margin"]
    assert out.set_index("sample_id").loc["failed", "suspect"] == False  # noqa: E712
    assert int(out["suspect"].sum()) == 3


def test_agreement_absent_with_one_seed_is_not_a_reason():
    out = suspects.score_suspects(
        frame(fact("a", agreement=None), fact("b", agreement=float("nan")))
    )
    assert not out["suspect"].any()


def test_generation_zero_search_is_not_called_unconverged():
    out = suspects.score_suspects(frame(fact("a", converged_gen=0, last_gen=0)))
    assert not out["suspect"].iloc[0]


def test_rules_are_thresholds():
    rows = frame(fact("a", margin=0.05))
    assert not suspects.score_suspects(rows)["suspect"].iloc[0]
    assert suspects.score_suspects(rows, suspects.SuspectRules(min_margin=0.1))["suspect"].iloc[0]


def test_empty_facts():
    cols = list(fact("a"))
    out = suspects.score_suspects(pd.DataFrame(columns=cols))
    assert out.empty and "score" in out
    assert suspects.run_health(out).empty
    assert suspects.before_after(pd.DataFrame(columns=cols)).empty


# ---- health, latest, before/after ---------------------------------------------------------


def test_health_counts_failures_and_suspects():
    rows = frame(
        fact("a"),
        fact("b"),
        fact("c", margin=-1.0),  # one strong suspect (score 1)
        fact("d", status="failed"),
        fact("a", run=2),
    )
    health = suspects.run_health(suspects.score_suspects(rows)).set_index("run_id")
    assert health.loc[1, "done"] == 3 and health.loc[1, "failed"] == 1
    assert health.loc[1, "health"] == pytest.approx(1 - (1 + 1) / 4)
    assert health.loc[2, "health"] == 1.0


def test_latest_label_per_sample_and_before_after():
    rows = frame(
        fact("a", loss=0.9),
        fact("b"),
        fact("a", run=2, loss=0.4),
        fact("b", run=2, status="failed"),
    )
    latest = suspects.latest_per_sample(rows).set_index("sample_id")
    assert latest.loc["a", "run_id"] == 2 and latest.loc["b", "run_id"] == 1
    ba = suspects.before_after(rows)
    assert list(ba["sample_id"]) == ["a"]
    assert ba["delta"].iloc[0] == pytest.approx(-0.5)


# ---- keep statistics ----------------------------------------------------------------------


def test_keep_stats():
    rows = frame(
        fact("a", k=6, n_groups=6),
        fact("b", k=12, n_groups=12, qtype="count"),
        fact("c", status="failed", k=0, n_tokens=0),
    )
    stats = suspects.keep_stats(rows)
    assert stats["labels"] == 2
    assert stats["keep_ratio"] == pytest.approx(18 / 72)
    by_q = stats["by_qtype"].set_index("qtype")["keep_ratio"]
    assert by_q["colour"] == pytest.approx(6 / 36) and by_q["count"] == pytest.approx(12 / 36)
    assert list(stats["kept_fraction"]) == pytest.approx([6 / 36, 12 / 36])


def test_keep_stats_empty():
    stats = suspects.keep_stats(pd.DataFrame(columns=list(fact("a"))))
    assert stats["labels"] == 0 and stats["keep_ratio"] is None


def test_keep_by_group_size():
    # 6 tokens: group 0 has 4 members, group 1 has 2; one token kept per group
    out = suspects.keep_by_group_size([([0, 4], [0, 0, 0, 0, 1, 1])]).set_index("group_size")
    assert out.loc[4, "tokens"] == 4 and out.loc[4, "kept"] == 1
    assert out.loc[2, "keep_rate"] == pytest.approx(0.5)
    assert suspects.keep_by_group_size([]).empty


# ---- GHM recommendation -------------------------------------------------------------------

TRAIN = TrainParams()  # bins 10, momentum 0, alpha 0.1, batch 32


def test_spread_histogram_keeps_ten_bins():
    g = np.linspace(0, 1, 10_000)
    rec = ghm.recommend_ghm(g, 0.7, TRAIN, mean_tokens=36, n_train=1000)
    assert rec.ghm_bins == 10 and "spread" in rec.reasons[0]


def test_concentrated_histogram_gets_more_bins():
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.uniform(0, 0.09, 9000), rng.uniform(0, 1, 1000)])  # 90% easy
    rec = ghm.recommend_ghm(g, 0.7, TRAIN, 36, 1000)
    assert rec.ghm_bins in (20, 30) and "concentrated" in rec.reasons[0]
    shares = ghm.region_shares(g, rec.ghm_bins)
    assert shares.max() <= ghm.CONCENTRATED or rec.ghm_bins == 30


def test_extremely_concentrated_caps_at_thirty():
    rec = ghm.recommend_ghm(np.full(1000, 0.001), 0.7, TRAIN, 36, 1000)
    assert rec.ghm_bins == 30


@pytest.mark.parametrize(
    ("n_train", "batch", "momentum"), [(1000, 32, 0.0), (10, 32, 0.75), (1000, 2, 0.75)]
)
def test_momentum_when_batches_are_small(n_train, batch, momentum):
    rec = ghm.recommend_ghm(None, None, TrainParams(batch_size=batch), 36, n_train)
    assert rec.ghm_momentum == momentum
    assert rec.ghm_bins == TRAIN.ghm_bins and rec.cos_alpha == TRAIN.cos_alpha  # nothing to judge


def test_no_training_labels_no_momentum_change():
    current = TrainParams(ghm_momentum=0.0)
    rec = ghm.recommend_ghm(None, None, current, mean_tokens=0.0, n_train=0)
    assert rec.updates() == {"ghm_bins": 10, "ghm_momentum": 0.0, "cos_alpha": 0.1}
    assert any("no training labels" in r for r in rec.reasons)


@pytest.mark.parametrize(
    ("overlap", "alpha"), [(0.95, 0.3), (0.7, 0.1), (0.2, 0.05), (math.nan, 0.1)]
)
def test_alpha_from_overlap(overlap, alpha):
    rec = ghm.recommend_ghm(np.linspace(0, 1, 100), overlap, TRAIN, 36, 1000)
    assert rec.cos_alpha == alpha
    assert any(r.startswith("cos_alpha") for r in rec.reasons)


def test_recommendation_is_valid_params():
    rec = ghm.recommend_ghm(np.full(10, 0.5), 0.99, TRAIN, 36, 1)
    TrainParams(**rec.updates())  # never a value the validator refuses


def test_gradient_norms_match_definition():
    import torch

    from evocomp.compress.fit import Item
    from evocomp.compress.model import CompressorConfig, TokenCompressor

    torch.manual_seed(0)
    model = TokenCompressor(CompressorConfig(dim=8, heads=2)).eval()
    items = [
        Item(
            torch.randn(n, 8),
            torch.zeros(n, 2, dtype=torch.long),
            torch.randn(3, 8),
            (torch.arange(n) % 3 == 0).float(),
        )
        for n in (6, 9)
    ]
    stats = ghm.gradient_norms(model, items, batch_size=1)
    assert stats.g.shape == (15,) and ((stats.g >= 0) & (stats.g <= 1)).all()
    with torch.no_grad():
        out = model(items[0].visual[None], items[0].grid_pos[None], None, items[0].text[None])
    expected = (out.logits[0].sigmoid() - items[0].target).abs().numpy()
    assert stats.g[:6] == pytest.approx(expected, abs=1e-6)
    assert -1 <= stats.overlap <= 1
    assert ghm.gradient_norms(model, []).overlap is None


# ---- params.yaml edits --------------------------------------------------------------------

PARAMS = """\
# EvoComp parameters
profile: demo

label:
  seeds: 1                  # independent searches

train:
  layers: 1
  ghm_bins: 10              # GHM-C regions
  ghm_momentum: 0.0
  cos_alpha: 0.1
  epochs: 60

# evaluation
evaluate:
  seed: 0
"""


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    body = [ln for ln in diff.splitlines() if not ln.startswith(("---", "+++", "@@"))]
    return [ln[1:] for ln in body if ln.startswith("-")], [
        ln[1:] for ln in body if ln.startswith("+")
    ]


def test_update_changes_exactly_what_the_diff_shows(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    update = params_edit.propose_train_update(
        PARAMS, {"ghm_bins": 30, "ghm_momentum": 0.75, "cos_alpha": 0.3}, str(path)
    )
    removed, added = changed_lines(update.diff)
    assert removed == [
        "  ghm_bins: 10              # GHM-C regions",
        "  ghm_momentum: 0.0",
        "  cos_alpha: 0.1",
    ]
    assert added == [
        "  ghm_bins: 30              # GHM-C regions",
        "  ghm_momentum: 0.75",
        "  cos_alpha: 0.3",
    ]
    params_edit.write_params(path, update)
    new = path.read_text()
    assert new == update.new_text
    old_lines, new_lines = PARAMS.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    assert [o for o, n in zip(old_lines, new_lines, strict=True) if o != n] == removed
    assert [n for o, n in zip(old_lines, new_lines, strict=True) if o != n] == added
    train = parse_params(yaml.safe_load(new)).train
    assert (train.ghm_bins, train.ghm_momentum, train.cos_alpha) == (30, 0.75, 0.3)


def test_missing_key_is_appended_to_the_train_block():
    update = params_edit.propose_train_update(PARAMS, {"lr": 1e-5})
    lines = update.new_text.splitlines()
    assert lines[lines.index("  epochs: 60") + 1] == "  lr: 1.0e-05"  # before the comment
    assert parse_params(yaml.safe_load(update.new_text)).train.lr == 1e-5


def test_missing_train_section_is_created():
    update = params_edit.propose_train_update("profile: demo\n", {"ghm_bins": 20})
    assert update.new_text == "profile: demo\ntrain:\n  ghm_bins: 20\n"


def test_same_values_give_an_empty_diff():
    assert params_edit.propose_train_update(PARAMS, {"ghm_bins": 10}).diff == ""


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"ghm_bins": 0}, "train.ghm_bins"),
        ({"ghm_momentum": 1.0}, "train.ghm_momentum"),
        ({"cos_alpha": -0.1}, "train.cos_alpha"),
        ({"ghm_bins": 2.5}, "train.ghm_bins"),
        ({"ghm_bins": "many"}, "train.ghm_bins"),
        ({"ghm_binz": 20}, "unknown train parameter"),
    ],
)
def test_invalid_values_are_refused(updates, message):
    with pytest.raises(ParamsError, match=message):
        params_edit.propose_train_update(PARAMS, updates)


def test_profile_override_is_refused():
    text = (
        PARAMS.replace("profile: demo", "profile: tiny")
        + "profiles:\n  tiny:\n    train: {ghm_bins: 5}\n"
    )
    with pytest.raises(ParamsError, match="profile 'tiny' overrides train.ghm_bins"):
        params_edit.propose_train_update(text, {"ghm_bins": 20})


def test_inline_train_section_is_refused():
    with pytest.raises(ParamsError, match="inline"):
        params_edit.propose_train_update("train: {ghm_bins: 10}\n", {"ghm_bins": 20})


def test_write_refuses_a_file_changed_since_the_diff(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    update = params_edit.propose_train_update(PARAMS, {"ghm_bins": 20})
    path.write_text(PARAMS + "# edited meanwhile\n")
    with pytest.raises(ParamsError, match="changed since the diff"):
        params_edit.write_params(path, update)
    assert path.read_text().endswith("# edited meanwhile\n")


def test_repo_params_yaml_round_trips(repo_root):
    text = (repo_root / "params.yaml").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("  ghm_bins:")]
    current = int(line.split(":")[1].split("#")[0])
    update = params_edit.propose_train_update(text, {"ghm_bins": current + 5})
    removed, added = changed_lines(update.diff)
    # only that line changes, and its comment stays
    assert removed == [line] and added == [line.replace(f": {current}", f": {current + 5}", 1)]
