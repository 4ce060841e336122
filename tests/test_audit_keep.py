"""What the labels keep (evocomp.audit.keep): token classes, grid heatmaps, words, fixed fractions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evocomp.audit import keep

COLUMNS = ["n_tokens", "kept", "groups", "heuristic_kept", "group_words", "meta"]

# a 2 x 2 image: an object at cell 0 that answers the question, another object at cell 1
META = {"grid": [2, 2], "objects": [{"patches": [0]}, {"patches": [1]}], "relevant": [0]}


def rows(*items: dict) -> pd.DataFrame:
    base = {"n_tokens": 4, "groups": None, "heuristic_kept": None, "group_words": None}
    return pd.DataFrame([base | {"meta": META} | i for i in items], columns=COLUMNS)


@pytest.mark.parametrize(
    ("meta", "n", "expected"),
    [
        (META, 4, ["answer", "object", "background", "background"]),
        ({**META, "relevant": []}, 4, ["object", "object", "background", "background"]),
        ({**META, "objects": []}, 4, ["answer", "background", "background", "background"]),
        (None, 4, None),  # a user's dataset: no meta
        ({"grid": [2, 2]}, 4, None),  # a grid, but no objects
        ({**META, "relevant": [7]}, 4, None),  # cells out of range
        (META, 16, None),  # a 2 x 2 layout, a model of 4 x 4 tokens
        (
            {k: v for k, v in META.items() if k != "grid"},
            4,
            ["answer", "object", "background", "background"],
        ),
    ],
    ids=[
        "benchmark",
        "no-answer-cell",
        "no-objects",
        "no-meta",
        "grid-only",
        "bad-cell",
        "other-grid",
        "no-grid",
    ],
)
def test_token_classes(meta, n, expected):
    got = keep.token_classes(meta, n)
    assert (None if got is None else [keep.CLASSES[c] for c in got]) == expected


def test_keep_by_class_counts_label_and_heuristics_over_what_they_record():
    df = rows(
        {"kept": [0, 2], "heuristic_kept": {"random": [1, 3], "fastv": [2, 3]}},
        {"kept": [0, 1]},  # an older label: no heuristic sets
        {"kept": [3], "meta": None},  # no classes: skipped
    )
    out = keep.keep_by_class(df).set_index(["selection", "class"])
    assert list(out.index.get_level_values(0).unique()) == ["label", "fastv", "random"]  # by name
    assert out.loc[("label", "answer"), ["labels", "tokens", "kept", "keep_rate"]].tolist() == [
        2,
        2,
        2,
        1.0,
    ]
    assert out.loc[("label", "object"), "keep_rate"] == 0.5  # 1 of 2
    assert out.loc[("label", "background"), "keep_rate"] == 0.25  # 1 of 4
    assert out.loc[("fastv", "answer"), "keep_rate"] == 0.0
    assert out.loc[("fastv", "background"), ["tokens", "kept"]].tolist() == [2, 2]
    assert out.loc[("random", "object"), "keep_rate"] == 1.0
    assert out.loc[("random", "background"), "labels"] == 1


def test_keep_by_class_without_classes_is_empty():
    assert keep.keep_by_class(rows({"kept": [0], "meta": None})).empty
    assert keep.keep_by_class(rows()).empty  # no labels at all


def test_a_class_without_tokens_has_no_rate():
    out = keep.keep_by_class(rows({"kept": [0], "meta": {**META, "relevant": []}}))
    assert np.isnan(out.set_index("class").loc["answer", "keep_rate"])


def test_heatmaps_average_over_the_most_common_grid():
    df = rows(
        {"kept": [0, 1], "heuristic_kept": {"pooling": [0, 3]}},
        {"kept": [0, 2], "heuristic_kept": {"pooling": [0, 3], "dart": [1, 2]}},
        {"kept": [0], "n_tokens": 9, "meta": None},  # another grid (3 x 3): skipped
    )
    h = keep.keep_heatmaps(df)
    assert h.grid == (2, 2) and h.skipped == 1
    assert list(h.rates) == ["label", "dart", "pooling"]
    assert h.labels == {"label": 2, "pooling": 2, "dart": 1}
    np.testing.assert_array_equal(h.rates["label"], [[1.0, 0.5], [0.5, 0.0]])
    np.testing.assert_array_equal(h.rates["pooling"], [[1.0, 0.0], [0.0, 1.0]])


def test_heatmap_grid_falls_back_to_the_token_count():
    df = rows({"kept": [5], "n_tokens": 9, "meta": None}, {"kept": [1], "n_tokens": 3, "meta": {}})
    h = keep.keep_heatmaps(df)  # a tie: the first grid seen
    assert h.grid == (3, 3) and h.skipped == 1
    assert h.rates["label"][1, 2] == 1.0 and h.rates["label"].sum() == 1.0
    assert keep.token_grid({"grid": [1, 3]}, 3) == (1, 3)
    assert keep.token_grid({"grid": [2, 2]}, 6) == (1, 6)  # meta of another grid: ignored


def test_heatmaps_of_no_labels():
    assert keep.keep_heatmaps(rows()) == keep.Heatmaps(None, {}, {}, 0)


def test_keep_by_word_counts_tokens_of_each_groups_word():
    df = rows(
        {"kept": [0, 3], "groups": [0, 1, 1, 2], "group_words": ["red", "sky", "grass"]},
        {"kept": [1], "groups": [0, 0, 1, 1], "group_words": ["sky", "red"]},
        {"kept": [0], "groups": [0, 0, 0, 0]},  # an older label: no words
    )
    out = keep.keep_by_word(df).set_index("word")
    assert list(out.index) == ["sky", "red", "grass"]  # by tokens, then by word
    assert out.loc["sky"].tolist() == [2, 4, 1, 0.25]
    assert out.loc["red"].tolist() == [2, 3, 1, 1 / 3]
    assert out.loc["grass"].tolist() == [1, 1, 1, 1.0]
    assert list(keep.keep_by_word(df, top=1)["word"]) == ["sky"]
    assert keep.keep_by_word(rows({"kept": [0]})).empty


@pytest.mark.parametrize(
    ("k", "n", "status", "expected"),
    [
        ([4, 4, 8], [36, 36, 72], ["done"] * 3, 4 / 36),  # budget mode: one fraction
        ([4, 5], [36, 36], ["done"] * 2, None),  # paper mode: k = groups varies
        ([4, 0], [36, 0], ["done", "failed"], 4 / 36),  # failures do not count
        ([], [], [], None),
    ],
    ids=["budget", "paper", "with-failure", "empty"],
)
def test_fixed_keep_fraction(k, n, status, expected):
    df = pd.DataFrame({"k": k, "n_tokens": n, "status": status})
    assert keep.fixed_keep_fraction(df) == expected


# ---- keep / drop balance ------------------------------------------------------------------


def _label(sample: str, k: int, qtype: str = "colour", status: str = "done") -> dict:
    return {"sample_id": sample, "status": status, "k": k, "n_tokens": 36, "qtype": qtype}


def test_keep_stats():
    rows = pd.DataFrame(
        [
            _label("a", 6),
            _label("b", 12, "count"),
            _label("c", 0, status="failed") | {"n_tokens": 0},
        ]
    )
    stats = keep.keep_stats(rows)
    assert stats["labels"] == 2
    assert stats["keep_ratio"] == pytest.approx(18 / 72)
    by_q = stats["by_qtype"].set_index("qtype")["keep_ratio"]
    assert by_q["colour"] == pytest.approx(6 / 36) and by_q["count"] == pytest.approx(12 / 36)
    assert list(stats["kept_fraction"]) == pytest.approx([6 / 36, 12 / 36])


def test_keep_stats_empty():
    stats = keep.keep_stats(pd.DataFrame(columns=["sample_id", "status", "k", "n_tokens", "qtype"]))
    assert stats["labels"] == 0 and stats["keep_ratio"] is None
