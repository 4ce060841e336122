"""Every dashboard page under Streamlit's AppTest: empty stores, a real labelled store, params.yaml.

The real store is labelled by the library on a tiny random LLaVA (as tests/test_stages.py does):
80 registered samples, 6 labelled (one run), 1 failure, 2 of them re-labelled by a deeper
two-seed run; its label set is exported and a compressor trained on it for one epoch. The app
is pointed at it through the EVOCOMP_* environment variables.
"""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest
import yaml
from conftest import REPO
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from streamlit.testing.v1 import AppTest

from evocomp.audit import suspects
from evocomp.config import AuditParams, SearchParams, TrainParams, parse_params
from evocomp.store import Elite, Generation, Label, LabelRun, SampleRow, get_engine, upgrade

APP = str(REPO / "dashboards" / "app.py")
PAGES = ["pages/overview.py", "pages/label_quality.py", "pages/sample.py", "pages/imbalance.py"]
SMALL = SearchParams(population=8, parents=4, generations=2)


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r} among {[m.label for m in at.metric]}"
    return values[0]


def table_with(at: AppTest, column: str) -> pd.DataFrame:
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a {column!r} column")


def point_at(monkeypatch, root, url: str) -> None:
    env = {
        "EVOCOMP_DB_URL": url,
        "EVOCOMP_PARAMS": root / "params.yaml",
        "EVOCOMP_METRICS_DIR": root / "metrics",
        "EVOCOMP_LABELS": root / "labels.parquet",
        "EVOCOMP_FEATURES_DIR": root / "features",
        "EVOCOMP_COMPRESSOR": root / "compressor",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


# ---- empty states -------------------------------------------------------------------------


@pytest.mark.parametrize("migrated", [False, True], ids=["no-store-file", "empty-store"])
@pytest.mark.parametrize("page", PAGES)
def test_page_on_an_empty_store(page, migrated, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    if migrated:
        upgrade(url)
    point_at(monkeypatch, tmp_path, url)
    at = open_page(page)
    infos = " ".join(i.value for i in at.info)
    if migrated:
        assert "no labels yet" in infos.lower() and "evocomp label" in infos
    else:
        assert "No label store yet" in infos and "evocomp label" in infos
        assert not (tmp_path / "store.db").exists()  # read-only: never creates the store
    if page.endswith("overview.py"):
        assert "No evaluation yet" in infos
    if page.endswith("imbalance.py"):  # no data, no recommendation
        assert "No compressor" in infos and "nothing to recommend" in infos
        assert not any("recommended" in df.value.columns for df in at.dataframe)


def test_overview_shows_the_anytime_bench(tmp_path, monkeypatch):
    """bench/anytime.py's JSON and curve (its ``plot`` path) become a table and a chart."""
    point_at(monkeypatch, tmp_path, f"sqlite:///{tmp_path / 'store.db'}")
    (tmp_path / "metrics").mkdir()
    curve = tmp_path / "anytime.csv"
    curve.write_text("setting,forwards,excess\nlabel,48,0.5\nlabel,408,0.1\nreference,48,0.5\n")
    stats = {
        "mean_forwards": 408.0,
        "mean_final_excess": 0.116,
        "median_final_excess": 0.0,
        "median_forwards_to_label_quality": 48.0,
        "reached_label_quality": 1.0,
        "reached_within_quarter_budget": 0.7,
    }
    bench = {
        "command": "bench/anytime.py --samples 40",
        "plot": str(curve),
        "settings": {"label": stats, "reference": {**stats, "mean_final_excess": 0.0}},
    }
    (tmp_path / "metrics" / "bench_anytime.json").write_text(json.dumps(bench))
    at = open_page(PAGES[0])
    table = table_with(at, "within 1/4 of the budget").set_index("setting")
    assert list(table.index) == ["label", "reference"]
    assert (
        table.loc["label", "excess (mean)"] == 0.116
        and table.loc["reference", "excess (mean)"] == 0
    )
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["name"] for t in chart["data"]} == {"label", "reference"}


# ---- a real store -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tiny_llava, shapes_data, tmp_path_factory):
    from evocomp.compress.training import train_compressor
    from evocomp.data.readers import read_dataset
    from evocomp.features.compute import ensure_features
    from evocomp.labeling.sample import label_and_store
    from evocomp.labeling.steps import register_samples
    from evocomp.labelset import label_set_hash
    from evocomp.mllm.hf_llava import HFLlava, checkpoint_info
    from evocomp.store import export_labels, finish_run, get_or_create_run, write_failure

    root = tmp_path_factory.mktemp("dash-real")
    samples = read_dataset(shapes_data)
    by_split = {sp: [s for s in samples if s.split == sp] for sp in ("train", "val", "test")}
    chosen = by_split["train"][:4] + by_split["val"][:1] + by_split["test"][:1]
    mllm = HFLlava(tiny_llava)
    fstore = ensure_features(mllm, chosen, root / "features", batch_size=16)
    url = f"sqlite:///{root / 'store.db'}"
    upgrade(url)
    engine = get_engine(url)
    register_samples(engine, "shapes", str(shapes_data), samples)
    first = get_or_create_run(engine, mllm.model_id, SMALL.model_dump(mode="json"), "test")
    for s in chosen:
        assert label_and_store(mllm, s, fstore.get(s.id), SMALL, engine, first) == "done"
    failed = next(s for s in samples if s not in chosen)
    write_failure(engine, first, failed.id, "ValueError: a planted failure")
    finish_run(engine, first, "done")
    deeper = SMALL.model_copy(update={"seeds": 2, "generations": 3, "objective": "distill"})
    second = get_or_create_run(engine, mllm.model_id, deeper.model_dump(mode="json"), "test")
    for s in chosen[:2]:
        label_and_store(mllm, s, fstore.get(s.id), deeper, engine, second)
    finish_run(engine, second, "done")
    export_labels(engine, root / "labels.parquet", model_id=mllm.model_id)
    train_compressor(
        root / "labels.parquet",
        root / "features",
        checkpoint_info(tiny_llava),
        TrainParams(epochs=1),
        root / "compressor",
    )
    (root / "metrics").mkdir()
    ratios = {"0.500": {"random": 0.6, "evocomp": 0.9}, "0.333": {"random": 0.5, "evocomp": 0.85}}
    retention = {
        r: {m: round(100 * a / 0.95, 2) for m, a in row.items()} for r, row in ratios.items()
    }
    (root / "metrics" / "eval.json").write_text(
        json.dumps({"full": 0.95, "ratios": ratios, "retention": retention})
    )
    (root / "metrics" / "train.json").write_text(
        json.dumps({"label_set_hash": label_set_hash(root / "labels.parquet")})
    )
    params = (REPO / "params.yaml").read_text()
    params = re.sub(r"(?m)^  checkpoint: .*$", f"  checkpoint: {tiny_llava}", params)
    (root / "params.yaml").write_text(params)
    return {
        "root": root,
        "url": url,
        "engine": engine,
        "chosen": chosen,
        "failed": failed,
        "runs": (first, second),
        "n_samples": len(samples),
    }


@pytest.fixture
def at_real(real, monkeypatch):
    point_at(monkeypatch, real["root"], real["url"])
    return real


def expected_suspects(engine, qtype: str | None = None) -> set[tuple[int, str]]:
    """The suspect rules recomputed in plain Python from the stored rows, independent of the
    SQL-to-pandas path the page takes (``evocomp.audit.facts``, ``score_suspects``)."""
    r = AuditParams()
    last = select(func.max(Generation.gen)).where(Generation.label_id == Label.id).scalar_subquery()
    stmt = (
        select(Label, SampleRow.qtype, last.label("last"))
        .join(SampleRow, SampleRow.id == Label.sample_id)
        .where(Label.status == "done")
    )
    if qtype is not None:
        stmt = stmt.where(SampleRow.qtype == qtype)

    def sev(depth: float) -> float:
        return 0.5 + 0.5 * min(max(depth, 0.0), 1.0)

    out = set()
    with Session(engine) as session:
        for lab, _, last_gen in session.execute(stmt):
            h = list(lab.heuristic_losses.values())
            scale = max((max(h) if h else lab.loss) - lab.full_loss, r.loss_floor)
            excess = (lab.loss - lab.full_loss) / scale
            score = 0.0
            if h and (gap := (lab.loss - min(h)) / scale) > r.max_heuristic_gap:
                score += 2.5 * sev((gap - r.max_heuristic_gap) / 0.25)
            if excess > r.max_excess:
                score += 0.5 * sev((excess - r.max_excess) / 0.5)
            if excess > r.min_room:
                if lab.margin / scale < r.min_margin:
                    score += 0.25 * sev((r.min_margin - lab.margin / scale) / r.min_margin)
                if lab.agreement is not None and lab.agreement < r.min_agreement:
                    score += 0.25 * sev((r.min_agreement - lab.agreement) / r.min_agreement)
                if last_gen and lab.converged_gen == last_gen:
                    score += 0.125
            if round(score, 4) >= r.flag_score:
                out.add((lab.run_id, lab.sample_id))
    return out


def test_overview_shows_the_runs(at_real):
    at = open_page(PAGES[0])
    engine = at_real["engine"]
    with engine.connect() as conn:
        done = conn.execute(select(func.count()).where(Label.status == "done")).scalar()
    assert int(metric(at, "Labels done")) == done == 8
    assert int(metric(at, "Failed")) == 1
    runs = table_with(at, "pending").set_index("run_id")
    first, second = at_real["runs"]
    assert runs.loc[first, "done"] == 6 and runs.loc[first, "failed"] == 1
    assert runs.loc[first, "pending"] == at_real["n_samples"] - 6
    assert runs.loc[second, "done"] == 2
    # what tells the runs apart: the second scores the distillation objective
    assert list(runs.loc[[first, second], "objective"]) == ["answer", "distill"]
    assert set(runs["mode"]) == {SMALL.mode} and runs["warm_start"].isna().all()
    assert runs.loc[first, "suspects"] == len(
        {k for k in expected_suspects(engine) if k[0] == first}
    )
    assert 0.0 <= runs.loc[first, "health"] <= 1.0
    versions = table_with(at, "what").set_index("what")["value"]
    assert versions["label set hash"] == versions["compressor trained on (metrics/train.json)"]
    assert versions["labels in it"] == "6"
    assert metric(at, "EvoComp retention at keep 1/3") == "89.5%"


def test_label_quality_counts_and_exports_the_suspects(at_real):
    at = open_page(PAGES[1])
    engine = at_real["engine"]
    expected = expected_suspects(engine)
    assert int(metric(at, "Suspect labels")) == len(expected)
    assert int(metric(at, "Labels in view")) == 8
    shown = table_with(at, "reasons")
    assert set(zip(shown["run_id"], shown["sample_id"], strict=True)) == expected
    assert list(shown["score"]) == sorted(shown["score"], reverse=True)
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Export CSV", "Export JSON"]
    if expected:
        preview = json.loads(at.code[0].value)
        assert set(preview) == {sid for _, sid in expected} and len(preview) == len(set(preview))
    # before / after: the two re-labelled samples
    assert int(metric(at, "Samples re-labelled")) == 2
    ba = table_with(at, "loss_before")
    assert set(ba["sample_id"]) == {s.id for s in at_real["chosen"][:2]}
    # a filter narrows the count to what the query gives for that question type
    qtype = at_real["chosen"][0].meta["qtype"]
    at.multiselect(key="f-qtype").set_value([qtype]).run()
    assert int(metric(at, "Suspect labels")) == len(expected_suspects(engine, qtype))


def test_label_quality_opens_a_suspect_in_the_drill_down(at_real):
    at = open_page(PAGES[1])
    at.toggle(key="only-suspects").set_value(False).run()
    if not at.get("selectbox") or not any(s.key == "open-suspect" for s in at.selectbox):
        pytest.skip("no suspect to open in this store")
    sid = at.selectbox(key="open-suspect").value
    at.button(key="open-drill").click().run()
    assert not at.exception
    assert at.selectbox(key="drill-pick").value == sid


def test_sample_drill_down_shows_the_search_and_answers(at_real):
    at = open_page(PAGES[2])
    sid = at.selectbox(key="drill-pick").value
    sample = next(s for s in at_real["chosen"] if s.id == sid)
    text = " ".join(m.value for m in at.markdown)
    assert sample.question in text and sample.answer in text
    assert len(at.get("image")) == 1  # the overlay
    with at_real["engine"].connect() as conn:
        latest = conn.execute(  # the page shows the sample's label of its latest run
            select(Label.id).where(Label.sample_id == sid).order_by(Label.run_id.desc()).limit(1)
        ).scalar()
        n_elite = conn.execute(
            select(func.count(Elite.id)).where(Elite.label_id == latest)
        ).scalar()
    elite = table_with(at, "jaccard_to_label")
    assert len(elite) == n_elite > 0
    assert (
        elite["rank"].tolist() == list(range(len(elite)))
        and elite["jaccard_to_label"].iloc[0] == 1.0
    )
    # the model's answers, computed on demand with the checkpoint of params mllm.checkpoint
    at.button(key="drill-answer").click().run(timeout=180)
    assert not at.exception, [e.value for e in at.exception]
    answers = table_with(at, "answer loss")
    heuristics = parse_params(
        yaml.safe_load((at_real["root"] / "params.yaml").read_text())
    ).label.heuristics
    assert list(answers["selection"]) == ["all tokens", "label", *heuristics]
    assert answers.set_index("selection").loc["all tokens", "tokens"] == 36
    assert answers["answer"].map(lambda a: isinstance(a, str)).all()


def test_sample_drill_down_without_checkpoint(at_real, monkeypatch, tmp_path):
    params = (at_real["root"] / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(
        re.sub(r"(?m)^  checkpoint: .*$", "  checkpoint: nowhere", params)
    )
    monkeypatch.setenv("EVOCOMP_PARAMS", str(tmp_path / "params.yaml"))
    at = open_page(PAGES[2])
    assert any("No model checkpoint at nowhere" in i.value for i in at.info)


def test_imbalance_shows_keep_ratio_and_ghm(at_real):
    at = open_page(PAGES[3])
    with at_real["engine"].connect() as conn:
        rows = conn.execute(
            select(Label.sample_id, Label.k, Label.n_tokens, LabelRun.created_at, Label.run_id)
            .join(LabelRun, LabelRun.id == Label.run_id)
            .where(Label.status == "done")
        ).all()
    latest = {}
    for sid, k, n, _created, _run in sorted(rows, key=lambda r: (r[3], r[4])):
        latest[sid] = (k, n)
    ratio = sum(k for k, _ in latest.values()) / sum(n for _, n in latest.values())
    assert metric(at, "Keep ratio (kept / all tokens)") == f"{ratio:.3f}"
    assert int(metric(at, "Labels")) == 6
    assert not at.warning, [w.value for w in at.warning]  # the compressor scored the label set
    rec = table_with(at, "recommended").set_index("parameter")
    assert set(rec.index) == {"train.ghm_bins", "train.ghm_momentum", "train.cos_alpha"}
    reasons = " ".join(m.value for m in at.markdown)
    assert "bins:" in reasons and "momentum:" in reasons and "cosine" in reasons


def test_imbalance_writes_params_as_shown(at_real, monkeypatch, tmp_path):
    path = tmp_path / "params.yaml"
    original = (at_real["root"] / "params.yaml").read_text()
    path.write_text(original)
    monkeypatch.setenv("EVOCOMP_PARAMS", str(path))
    at = open_page(PAGES[3])
    at.number_input(key="w-bins").set_value(30)
    at.number_input(key="w-momentum").set_value(0.75)
    at.number_input(key="w-alpha").set_value(0.3).run()
    diff = [c.value for c in at.code if c.language == "diff"]
    assert len(diff) == 1
    removed = [
        ln[1:] for ln in diff[0].splitlines() if ln.startswith("-") and not ln.startswith("---")
    ]
    added = [
        ln[1:] for ln in diff[0].splitlines() if ln.startswith("+") and not ln.startswith("+++")
    ]
    assert path.read_text() == original  # nothing written before the button
    at.button(key="w-write").click().run()
    assert not at.exception
    new = path.read_text()
    old_lines, new_lines = original.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    assert [o for o, n in zip(old_lines, new_lines, strict=True) if o != n] == removed
    assert [n for o, n in zip(old_lines, new_lines, strict=True) if o != n] == added
    train = parse_params(yaml.safe_load(new)).train
    assert (train.ghm_bins, train.ghm_momentum, train.cos_alpha) == (30, 0.75, 0.3)
    assert any("Wrote" in s.value for s in at.success)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("w-bins", 0, "train.ghm_bins"),
        ("w-momentum", 1.5, "train.ghm_momentum"),
        ("w-alpha", -1.0, "train.cos_alpha"),
    ],
)
def test_imbalance_refuses_invalid_values(at_real, monkeypatch, tmp_path, key, value, message):
    path = tmp_path / "params.yaml"
    original = (at_real["root"] / "params.yaml").read_text()
    path.write_text(original)
    monkeypatch.setenv("EVOCOMP_PARAMS", str(path))
    at = open_page(PAGES[3])
    at.number_input(key=key).set_value(value).run()
    assert any(message in e.value and "Refused" in e.value for e in at.error)
    assert not [b for b in at.button if b.key == "w-write"]  # nothing to click
    assert path.read_text() == original


def test_runs_name_a_warm_start_by_its_compressor_hash(tmp_path):
    """A warm-started run's key holds its compressor's content hash (``search.ga.run_spec``);
    the runs table shows its head, and an old run without the newer fields reads as the
    defaults."""
    import streamlit as st

    from dashboards import data
    from evocomp.compress.model import (
        CompressorConfig,
        TokenCompressor,
        compressor_id,
        save_compressor,
    )
    from evocomp.search.ga import run_spec
    from evocomp.store import get_or_create_run

    save_compressor(TokenCompressor(CompressorConfig(dim=64)), tmp_path / "c", {"model_id": "m"})
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    engine = get_engine(url)
    cold = SearchParams(mode="budget")
    warm_params = cold.model_copy(update={"warm_start": str(tmp_path / "c")})
    old = get_or_create_run(engine, "m", run_spec(cold), "test")
    warm = get_or_create_run(engine, "m", run_spec(warm_params), "test")
    st.cache_data.clear()
    runs = data.runs(url).set_index("run_id")
    assert pd.isna(runs.loc[old, "warm_start"])
    assert runs.loc[warm, "warm_start"] == compressor_id(tmp_path / "c")[:12]
    assert list(runs["objective"]) == ["answer", "answer"] and set(runs["mode"]) == {"budget"}


# ---- PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.postgres
def test_queries_agree_on_sqlite_and_postgres(postgres_url, tmp_path, bench_module):
    """The same synthetic store gives the same facts and run counts on both backends."""
    import streamlit as st

    from dashboards import data

    make_store = bench_module("dashboard_load").make_store

    sqlite_url = f"sqlite:///{tmp_path / 'store.db'}"
    out = {}
    for url in (sqlite_url, postgres_url):
        make_store(url, 60, tmp_path / url.split(":")[0])
        st.cache_data.clear()
        facts = data.label_facts(url).sort_values(["run_id", "sample_id"]).reset_index(drop=True)
        out[url] = (facts, data.runs(url))
        assert data.store_problem(url) is None
    (fa, ra), (fb, rb) = out.values()
    cols = [
        "run_id",
        "sample_id",
        "status",
        "k",
        "loss",
        "margin",
        "agreement",
        "last_gen",
        "h_fastv",
        "best_heuristic_loss",
        "best_heuristic",
    ]
    pd.testing.assert_frame_equal(fa[cols], fb[cols], check_dtype=False)
    assert ra[["done", "failed", "pending"]].equals(rb[["done", "failed", "pending"]])
    sa, sb = suspects.score_suspects(fa), suspects.score_suspects(fb)
    assert sa["suspect"].sum() == sb["suspect"].sum() > 0


# ---- the overlay --------------------------------------------------------------------------


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "blank-canvas"])
def test_overlay_keeps_kept_cells_bright(tmp_path, with_image):
    from PIL import Image

    from dashboards.ui import overlay

    path = None
    if with_image:
        path = tmp_path / "img.png"
        Image.new("RGB", (96, 96), (200, 200, 200)).save(path)
    groups = [0] * 36
    groups[7] = 1
    img = overlay(path, 36, kept=[7, 20], groups=groups, size=96)
    assert img.size == (96, 96)

    def brightness(token: int) -> float:
        r, c = divmod(token, 6)
        return sum(img.getpixel((c * 16 + 8, r * 16 + 8))) / 3

    assert brightness(7) > 1.5 * brightness(8) and brightness(20) > 1.5 * brightness(21)


def test_overlay_places_tokens_at_their_cells():
    """A 3 x 5 image grid (a Qwen aspect ratio, N = 15 is no square): with the cells from the
    feature cache the kept token is drawn at its cell, the soft map has the image's shape."""
    from dashboards.ui import overlay, soft_map

    cells = [[r, c] for r in range(3) for c in range(5)]
    img = overlay(None, 15, kept=[7], groups=None, size=100, cells=cells)  # (1, 2) is token 7
    assert img.size == (100, 60)

    def brightness(r: int, c: int) -> float:
        return sum(img.getpixel((c * 20 + 10, r * 20 + 10))) / 3

    assert brightness(1, 2) > 1.5 * brightness(0, 2) and brightness(1, 2) > 1.5 * brightness(1, 3)
    soft = soft_map([t / 15 for t in range(15)], cells)
    assert len(soft) == 3 and len(soft[0]) == 5 and soft[1][2] == 7 / 15
    # two tokens on one cell (LLaVA-NeXT: a base token over tile tokens): the higher rate
    assert soft_map([0.2, 0.9, 0.4], [[0, 0], [0, 0], [0, 1]]) == [[0.9, 0.4]]


def test_bench_dashboard_load_smoke(tmp_path, bench_module):
    """bench/dashboard_load.py end to end on a tiny store (no timing assertions)."""
    dashboard_load = bench_module("dashboard_load")

    before = {k: v for k, v in os.environ.items() if k.startswith("EVOCOMP_")}
    out = tmp_path / "bench.json"
    result = dashboard_load.main(["--samples", "40", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["samples"] == 40 and set(saved["pages"]) == set(dashboard_load.PAGES)
    assert saved["max_page_seconds"] == result["max_page_seconds"] > 0
    assert "bench/dashboard_load.py --samples 40" in saved["command"]
    assert {k: v for k, v in os.environ.items() if k.startswith("EVOCOMP_")} == before
