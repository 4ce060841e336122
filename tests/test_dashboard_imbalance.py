"""The Class imbalance page under AppTest on small hand-built stores whose answers are known.

Three 4-token (2 x 2) samples: A and B from the built-in benchmark (objects and answer cells in
their meta), C from a user's dataset (no meta). Run 1 labels A and B (2 tokens each), run 2
labels C (1 token); the page's default scope, the latest label per sample, holds all three.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from sqlalchemy import insert
from streamlit.testing.v1 import AppTest

from evocomp.store import (
    Label,
    LabelRecord,
    dispose_engines,
    ensure_dataset,
    get_engine,
    get_or_create_run,
    upgrade,
    upsert_samples,
    write_label,
)

APP = str(REPO / "dashboards" / "app.py")
PAGE = "pages/imbalance.py"
RUN = {"mode": "budget", "heuristics": ["fastv", "random"]}
SAMPLES = {  # id: (meta, kept, heuristic_kept, groups, group_words)
    "a": (
        {"grid": [2, 2], "objects": [{"patches": [0]}, {"patches": [1]}], "relevant": [0]},
        [0, 2],
        {"fastv": [2, 3], "random": [1, 3]},
        [0, 1, 1, 2],
        ["red", "sky", "grass"],
    ),
    "b": (
        {"grid": [2, 2], "objects": [{"patches": [3]}], "relevant": [3]},
        [0, 1],
        {"fastv": [1, 2], "random": [0, 3]},
        [0, 0, 1, 1],
        ["sky", "red"],
    ),
    "c": (None, [3], {"fastv": [0], "random": [1]}, [0, 0, 0, 0], ["sky"]),
}


def build(url: str, new_style: bool = True, revision: str = "head") -> None:
    """The store of the module docstring; old-style labels lack heuristic sets and words."""
    upgrade(url, revision)
    engine = get_engine(url)
    ds = ensure_dataset(engine, "shapes", "builtin")
    upsert_samples(
        engine,
        ds,
        [
            {"id": sid, "split": "train", "qtype": "count", "question": "q?", "answer": "one"}
            | {"image": f"{sid}.png", "meta": meta}
            for sid, (meta, *_) in SAMPLES.items()
        ],
    )
    runs = [get_or_create_run(engine, "m", RUN | {"seed": s}, "test") for s in (0, 1)]
    for sid, (_, kept, hk, groups, words) in SAMPLES.items():
        run = runs[sid == "c"]
        common = {"kept": kept, "k": len(kept), "n_tokens": 4, "groups": groups, "loss": 0.5}
        if revision != "head":  # a store before revision 0004: no such columns to write
            with engine.begin() as conn:
                conn.execute(
                    insert(Label.__table__).values(
                        run_id=run, sample_id=sid, status="done", heuristic_losses={}, **common
                    )
                )
            continue
        extra = {"heuristic_kept": hk, "group_words": words} if new_style else {}
        write_label(engine, run, sid, LabelRecord(**common, **extra))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Point the dashboard at an (empty) store under tmp_path; returns its URL."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for name, value in {
        "EVOCOMP_DB_URL": url,
        "EVOCOMP_PARAMS": tmp_path / "params.yaml",
        "EVOCOMP_METRICS_DIR": tmp_path / "metrics",
        "EVOCOMP_LABELS": tmp_path / "labels.parquet",
        "EVOCOMP_FEATURES_DIR": tmp_path / "features",
        "EVOCOMP_COMPRESSOR": tmp_path / "compressor",
    }.items():
        monkeypatch.setenv(name, str(value))
    yield url
    dispose_engines()


def open_page() -> AppTest:
    import streamlit as st

    st.cache_data.clear()  # every test has its own store, maybe at the same path
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def tables(at: AppTest, column: str) -> list[pd.DataFrame]:
    """The tables with this column (AppTest does not name a table by its key)."""
    return [df.value for df in at.dataframe if column in df.value.columns]


def chart(at: AppTest, key: str) -> dict:
    """The plotly figure (as JSON) of the chart with this key (the end of its element id)."""
    charts = [c for c in at.get("plotly_chart") if c.proto.id.endswith(f"-{key}")]
    assert len(charts) == 1, f"{len(charts)} charts with key {key!r}"
    return json.loads(charts[0].proto.spec)


def array(z: list | dict) -> np.ndarray:
    """A plotly array, as a list or as plotly's typed-array encoding ({dtype, bdata, shape})."""
    if isinstance(z, list):
        return np.asarray(z, dtype=float)
    shape = [int(n) for n in z["shape"].split(",")]
    return np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)


def charts(at: AppTest) -> str:
    return " ".join(c.proto.id for c in at.get("plotly_chart"))


def texts(at: AppTest) -> str:
    return " ".join(e.value for e in [*at.info, *at.caption])


def test_keep_rates_of_a_known_store(store):
    build(store)
    at = open_page()
    assert "made before this version" not in texts(at)
    by_class = tables(at, "answer")[0].set_index("selection")
    assert list(by_class.index) == ["label", "fastv", "random"]
    assert list(by_class.columns) == ["answer", "object", "background"]
    # A: answer 0, object 1, background 2 3; B: answer 3, background 0 1 2; C has no classes
    assert by_class.loc["label"].tolist() == [0.5, 0.0, 0.6]
    assert by_class.loc["fastv"].tolist() == [0.0, 0.0, 0.8]
    assert by_class.loc["random"].tolist() == [0.5, 1.0, 0.4]
    # heatmaps: one facet per selection, over all three labels
    fig = chart(at, "imb-heatmap")
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert titles == ["label (3 labels)", "fastv (3 labels)", "random (3 labels)"]
    maps = [array(trace["z"]) for trace in fig["data"]]  # per selection: (rows, cols)
    np.testing.assert_allclose(maps[0], [[2 / 3, 1 / 3], [1 / 3, 1 / 3]])
    np.testing.assert_allclose(maps[1], [[1 / 3, 1 / 3], [2 / 3, 1 / 3]])
    np.testing.assert_allclose(maps[2], [[1 / 3, 2 / 3], [0.0, 2 / 3]])
    words = tables(at, "word")[0].set_index("word")
    assert list(words.index) == ["sky", "red", "grass"]
    assert words.loc["sky", ["labels", "tokens", "kept"]].tolist() == [3, 8, 4]
    assert words.loc["red", ["tokens", "kept"]].tolist() == [3, 1]
    # k / n varies (2/4 and 1/4): the per question type chart is informative
    assert "imb-qtype" in charts(at) and "same fraction" not in texts(at)


def test_a_fixed_keep_fraction_is_one_sentence_not_a_chart(store):
    build(store)
    at = open_page()
    at.selectbox(key="imb-scope").set_value(1).run()  # run 1: every label keeps 2 of 4
    assert not at.exception, [e.value for e in at.exception]
    assert "same fraction of its tokens (0.500)" in texts(at)
    assert "imb-qtype" not in charts(at) and "imb-kept-fraction" not in charts(at)
    assert "imb-heatmap" in charts(at)


@pytest.mark.parametrize("revision", ["head", "0003"], ids=["null-columns", "store-at-0003"])
def test_old_labels_show_what_they_can(store, revision):
    build(store, new_style=False, revision=revision)
    at = open_page()
    assert "3 of 3 labels were made before this version" in texts(at)
    assert "records its groups' vocabulary words" in texts(at) and not tables(at, "word")
    by_class = tables(at, "answer")[0].set_index("selection")
    assert list(by_class.index) == ["label"]  # no heuristic sets: the labels alone
    assert by_class.loc["label"].tolist() == [0.5, 0.0, 0.6]
    fig = chart(at, "imb-heatmap")
    assert [a["text"] for a in fig["layout"]["annotations"]] == ["label (3 labels)"]


def test_a_dataset_without_token_classes(store):
    build(store)
    with get_engine(store).begin() as conn:
        conn.exec_driver_sql("UPDATE samples SET meta = NULL")
    at = open_page()
    assert "classes are not recorded for this dataset" in texts(at)
    assert not tables(at, "answer")
    assert "imb-heatmap" in charts(at)  # the grid comes from the token count


def test_an_empty_store(store):
    upgrade(store)
    at = open_page()
    assert "nothing to recommend" in texts(at)
    assert "What the labels keep" not in [h.value for h in at.header]


@pytest.mark.postgres
def test_keep_details_agree_on_sqlite_and_postgres(postgres_url, tmp_path):
    """JSON on SQLite and JSONB on PostgreSQL give the page the same rows and keep rates."""
    import streamlit as st

    from dashboards import data
    from evocomp.audit import keep

    out = []
    for url in (f"sqlite:///{tmp_path / 'store.db'}", postgres_url):
        build(url)
        st.cache_data.clear()
        rows = data.keep_details(url, (1, 2, 3)).sort_values("label_id", ignore_index=True)
        assert list(rows["heuristic_kept"].map(sorted)) == [["fastv", "random"]] * 3
        out.append((keep.keep_by_class(rows), keep.keep_by_word(rows), keep.keep_heatmaps(rows)))
    (ca, wa, ha), (cb, wb, hb) = out
    pd.testing.assert_frame_equal(ca, cb)
    pd.testing.assert_frame_equal(wa, wb)
    assert list(ha.rates) == list(hb.rates)
    for name in ha.rates:
        np.testing.assert_array_equal(ha.rates[name], hb.rates[name])
