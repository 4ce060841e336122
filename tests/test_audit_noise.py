"""Planted label noise (``evocomp.audit.noise``): the wrong labels, the ranking figures, and
that the audit ranks planted labels above clean ones on a real (tiny) model's labels."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from evocomp.audit import noise, suspects
from evocomp.config import SearchParams

# ---- the figures --------------------------------------------------------------------------


def test_auroc_counts_ties_half():
    pos = pd.Series([True, True, False, False])
    assert noise.auroc(pd.Series([0.9, 0.8, 0.1, 0.0]), pos) == 1.0
    assert noise.auroc(pd.Series([0.0, 0.1, 0.8, 0.9]), pos) == 0.0
    assert noise.auroc(pd.Series([0.5, 0.5, 0.5, 0.5]), pos) == 0.5
    assert noise.auroc(pd.Series([1.0, 0.0, 0.0, 0.0]), pos) == 0.75
    with pytest.raises(ValueError):
        noise.auroc(pd.Series([1.0]), pd.Series([True]))


def test_precision_at_planted_breaks_ties_at_the_cut_at_random():
    pos = pd.Series([True, True, False, False])
    assert noise.precision_at_planted(pd.Series([0.9, 0.8, 0.1, 0.0]), pos) == 1.0
    # one sure hit, then one slot shared by a planted and two clean labels at 0.5
    scores = pd.Series([0.9, 0.5, 0.5, 0.5, 0.0])
    pos = pd.Series([True, True, False, False, False])
    assert noise.precision_at_planted(scores, pos) == pytest.approx((1 + 1 / 3) / 2)


def test_shift_moves_every_token_to_a_free_neighbour():
    rng = random.Random(0)
    for _ in range(50):
        kept = sorted(rng.sample(range(36), 4))
        out = noise.shift(kept, (6, 6), rng)
        assert len(out) == len(set(out)) == 4 and out != kept
        for t in out:  # each result is a grid neighbour of some kept token
            r, c = divmod(t, 6)
            assert any(abs(r - k // 6) + abs(c - k % 6) == 1 for k in kept)


def test_shift_keeps_a_full_grid_in_place():
    assert noise.shift([0, 1, 2, 3], (2, 2), random.Random(0)) == [0, 1, 2, 3]


def test_plant_replaces_a_seeded_share():
    facts = pd.DataFrame({"label_id": range(10), "loss": [0.1] * 10})
    wrong = pd.DataFrame({"label_id": range(10), "random": [5.0] * 10, "shift": [7.0] * 10})
    a, pa = noise.plant(facts, wrong, "shift", 0.3, seed=1)
    b, pb = noise.plant(facts, wrong, "shift", 0.3, seed=1)
    assert pa.sum() == 3 and pa.equals(pb) and a.equals(b)
    assert set(a.loc[pa, "loss"]) == {7.0} and set(a.loc[~pa, "loss"]) == {0.1}
    mixed, pm = noise.plant(facts, wrong, None, 0.5, seed=1)
    assert set(mixed.loc[pm, "loss"]) <= {5.0, 7.0} and facts["loss"].eq(0.1).all()


# ---- on a real model's labels ------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tiny_llava, shapes_data, tmp_path_factory):
    """Facts of 16 labels searched with the tiny model, and each one's wrong-label losses."""
    from evocomp.data.readers import read_dataset
    from evocomp.features.compute import ensure_features
    from evocomp.labeling.sample import label_sample
    from evocomp.mllm.hf_llava import HFLlava

    params = SearchParams(population=12, parents=4, generations=3, mode="budget", keep_ratio=0.25)
    mllm = HFLlava(tiny_llava)
    samples = read_dataset(shapes_data)[:16]
    fstore = ensure_features(mllm, samples, tmp_path_factory.mktemp("feat"), batch_size=16)
    rows, wrong = [], []
    for i, s in enumerate(samples):
        feats = fstore.get(s.id)
        lab = label_sample(mllm, s, feats, params)
        r = lab.result
        h = dict(r.heuristic_losses)
        rows.append(
            {
                "label_id": i,
                "run_id": 1,
                "sample_id": s.id,
                "status": "done",
                "loss": r.loss,
                "full_loss": lab.full_loss,
                "best_heuristic_loss": min(h.values()),
                "worst_heuristic_loss": max(h.values()),
                "margin": r.margin,
                "agreement": r.agreement,
                "converged_gen": r.converged_gen,
                "last_gen": params.generations,
            }
        )
        sets = noise.noisy_sets(s, feats, r.kept, h, params, mllm.grid)
        assert set(sets) == set(noise.KINDS)
        assert all(len(v) == r.k for v in sets.values())
        wrong.append({"label_id": i} | noise.noisy_losses(mllm, s, feats, sets))
    return pd.DataFrame(rows), pd.DataFrame(wrong)


def test_clean_labels_are_never_worse_than_a_heuristic(labelled):
    facts, _ = labelled
    scored = suspects.score_suspects(facts)
    assert (scored["gap"] <= 0).all()
    assert "heuristic" not in " ".join(scored["reasons"])


def test_the_worst_heuristic_planted_ranks_above_every_clean_label(labelled):
    facts, wrong = labelled
    noisy, planted = noise.plant(facts, wrong, "worst_heuristic", 0.25, seed=0)
    harm = planted & (noisy["loss"] > facts["loss"] + 1e-4)
    assert harm.sum() >= 2
    scored = suspects.score_suspects(noisy).loc[noisy.index]
    keep = ~planted | harm
    assert noise.auroc(scored["score"][keep], harm[keep]) >= 0.95
    assert scored.loc[harm, "suspect"].all()


def test_mixed_noise_ranks_above_clean_on_average(labelled):
    facts, wrong = labelled
    noisy, planted = noise.plant(facts, wrong, None, 0.5, seed=0)
    harm = planted & (noisy["loss"] > facts["loss"] + 1e-4)
    scored = suspects.score_suspects(noisy).loc[noisy.index]
    keep = ~planted | harm
    assert noise.auroc(scored["score"][keep], harm[keep]) >= 0.8
