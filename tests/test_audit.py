"""The audit library: suspect ranking, run health, keep statistics, GHM advice, params.yaml edits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from evocomp.audit import ghm, params_edit, suspects
from evocomp.config import AuditParams, TrainParams, parse_params
from evocomp.errors import ParamsError

RULES = AuditParams()


def fact(sample: str, run: int = 1, **kw) -> dict:
    """One healthy done label unless overridden: loss scale 8 nats (worst heuristic 8.45,
    full-token loss 0.45), the label 0.05 above the full-token loss and 0.1 below the best
    heuristic, a clear margin, converged early."""
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
        "best_heuristic_loss": 0.6,
        "worst_heuristic_loss": 8.45,
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
    assert out["scale"].iloc[0] == pytest.approx(8.0)
    assert out["gap"].iloc[0] == pytest.approx(-0.1 / 8)


ROOM = {"loss": 2.0, "best_heuristic_loss": 2.5}  # 1.55 nats = 0.19 scales above full: room


@pytest.mark.parametrize(
    ("override", "reason", "flagged"),
    [
        ({"loss": 0.9}, "heuristic", True),  # 0.3 nats above the best heuristic
        ({"loss": 6.0, "best_heuristic_loss": 6.0}, "excess", False),  # 0.69 scales: mild
        ({"loss": 8.45, "best_heuristic_loss": 8.45}, "excess", True),  # as bad as the worst
        (ROOM | {"margin": 0.0}, "margin", False),  # a doubt alone flags nothing
        (ROOM | {"margin": 0.04}, "margin", False),
        (ROOM | {"agreement": 0.0}, "agreement", False),
        (ROOM | {"converged_gen": 10, "last_gen": 10}, "not_converged", False),
    ],
)
def test_each_reason_fires_alone(override, reason, flagged):
    out = suspects.score_suspects(frame(fact("a", **override)))
    assert out["reasons"].iloc[0] == reason
    assert 0 < out["score"].iloc[0] <= suspects.WEIGHTS[reason]
    assert out["suspect"].iloc[0] == flagged


@pytest.mark.parametrize(
    "override",
    [
        {"margin": 0.0},  # any mask keeps the answer: ties are no evidence
        {"agreement": 0.0},
        {"converged_gen": 10, "last_gen": 10},
    ],
)
def test_search_doubts_need_room_to_improve(override):
    out = suspects.score_suspects(frame(fact("a", **override)))
    assert out["score"].iloc[0] == 0 and not out["suspect"].iloc[0]


def test_reason_counts_follow_the_suspects_only_switch():
    """A mild excess fires a reason without flagging its label: counted among all labels,
    not among the suspects (the dashboard's reason chart follows its "Suspects only")."""
    out = suspects.score_suspects(
        frame(
            fact("mild", loss=6.0, best_heuristic_loss=6.0),  # excess, not flagged
            fact("bad", loss=8.45, best_heuristic_loss=8.45),  # excess, flagged
            fact("heur", loss=0.9),  # heuristic, flagged
            fact("ok"),
        )
    )
    every = suspects.reason_counts(out, suspects_only=False)
    flagged = suspects.reason_counts(out, suspects_only=True)
    assert every.to_dict() == {"heuristic": 1, "excess": 2, "margin": 0, "agreement": 0,
                               "not_converged": 0}  # fmt: skip
    assert flagged.to_dict() == every.to_dict() | {"excess": 1}


def test_the_scale_makes_rules_hold_for_easy_and_hard_questions():
    # an easy yes/no question: every mask is within 0.004 nats, yet a random mask at 0.005
    # is as wrong, relative to what the choice can change, as one at 8 nats on a hard one
    easy = {"full_loss": 0.001, "worst_heuristic_loss": 0.005, "best_heuristic_loss": 0.0012}
    rows = frame(
        fact("easy-clean", **easy, loss=0.0011),
        fact("easy-noisy", **easy, loss=0.005),
        fact("hard-noisy", loss=8.45),
    )
    out = suspects.score_suspects(rows).set_index("sample_id")
    assert not out.loc["easy-clean", "suspect"]
    assert out.loc["easy-noisy", "suspect"] and out.loc["hard-noisy", "suspect"]
    # below the floor a difference is no scale: 2e-5 nats never makes a suspect
    tiny = {"full_loss": 0.0, "worst_heuristic_loss": 2e-5, "best_heuristic_loss": 0.0}
    out = suspects.score_suspects(frame(fact("t", **tiny, loss=2e-5)))
    assert not out["suspect"].iloc[0]


def test_ranking_orders_by_evidence():
    loser = {"loss": 6.45, "best_heuristic_loss": 6.5, "converged_gen": 10}  # 0.75 scales
    rows = frame(
        fact("healthy"),
        fact("just-above-heuristic", loss=0.8),  # 0.025 scales: severity ~0.5
        fact("far-above-heuristic", loss=4.0),  # severity 1, and excess
        fact("undecided-loser", **loser, margin=0.0),  # loses the answer, tie, not converged
        fact("room-and-margin", **ROOM, margin=0.0),  # a doubt alone
        fact("failed", status="failed", margin=None, loss=None, full_loss=None),
    )
    out = suspects.score_suspects(rows)
    assert list(out["sample_id"])[:4] == [
        "far-above-heuristic",
        "just-above-heuristic",  # beaten by a heuristic: above every merely doubtful label
        "undecided-loser",
        "room-and-margin",
    ]
    assert out.set_index("sample_id").loc["failed", "suspect"] == False  # noqa: E712
    assert set(out.loc[out["suspect"], "sample_id"]) == {
        "far-above-heuristic",
        "just-above-heuristic",
        "undecided-loser",
    }


def test_score_ties_rank_the_larger_excess_first():
    rows = frame(fact("a", loss=0.46), fact("b", loss=0.55), fact("c", loss=0.5))
    assert list(suspects.score_suspects(rows)["sample_id"]) == ["b", "c", "a"]


def test_without_heuristic_losses_the_heuristic_rule_is_silent():
    rows = frame(fact("a", loss=3.0, best_heuristic_loss=None, worst_heuristic_loss=None))
    out = suspects.score_suspects(rows)
    assert out["reasons"].iloc[0] == "excess"  # scale = the label's own excess: 1 scale


def test_agreement_absent_with_one_seed_is_not_a_reason():
    out = suspects.score_suspects(
        frame(fact("a", **ROOM, agreement=None), fact("b", **ROOM, agreement=float("nan")))
    )
    assert not out["suspect"].any()


def test_generation_zero_search_is_not_called_unconverged():
    out = suspects.score_suspects(frame(fact("a", **ROOM, converged_gen=0, last_gen=0)))
    assert out["reasons"].iloc[0] == ""


def test_rules_are_thresholds():
    rows = frame(fact("a", loss=0.62))  # 0.0025 scales above the best heuristic
    assert not suspects.score_suspects(rows)["suspect"].iloc[0]
    loose = RULES.model_copy(update={"max_heuristic_gap": 0.001})
    assert suspects.score_suspects(rows, loose)["suspect"].iloc[0]
    assert not suspects.score_suspects(rows, loose.model_copy(update={"flag_score": 2.0}))[
        "suspect"
    ].iloc[0]


def test_empty_facts():
    cols = list(fact("a"))
    out = suspects.score_suspects(pd.DataFrame(columns=cols))
    assert out.empty and "score" in out
    assert suspects.run_health(out).empty
    assert suspects.before_after(pd.DataFrame(columns=cols)).empty


# ---- health, latest, before/after ---------------------------------------------------------


def test_health_counts_failures_and_suspects():
    rows = frame(
        *(fact(f"clean{i}") for i in range(6)),
        fact("c", loss=8.45),  # a strong suspect: score >= 1
        fact("d", status="failed"),
        fact("a", run=2),
    )
    health = suspects.run_health(suspects.score_suspects(rows)).set_index("run_id")
    assert health.loc[1, "done"] == 7 and health.loc[1, "failed"] == 1
    assert health.loc[1, "bad_share"] == pytest.approx((1 + 1) / 8)
    assert health.loc[1, "health"] == pytest.approx(1 - 0.25 / RULES.health_tolerance)
    assert health.loc[2, "health"] == 1.0


def test_health_is_zero_at_the_tolerated_bad_share():
    rows = frame(*(fact(f"c{i}") for i in range(3)), fact("bad", loss=8.45))
    health = suspects.run_health(suspects.score_suspects(rows))
    assert health["bad_share"].iloc[0] == pytest.approx(0.25)
    assert health["health"].iloc[0] == 0.0


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
