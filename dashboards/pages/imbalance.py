"""Class imbalance: what the labels keep (by token class, grid cell and vocabulary word, beside
each heuristic at the same size), the compressor's GHM gradient-norm histogram, and a
recommended GHM / cosine setting that can be written into params.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from dashboards import artifacts, data, ui
from evocomp.audit import ghm, keep, params_edit, suspects
from evocomp.config import Params, load_params
from evocomp.errors import ParamsError

s = data.settings()
st.title("Class imbalance")

# ---- keep / drop balance of the labels ------------------------------------------------------
scope = pd.DataFrame()
if ui.store_ready(s):
    facts = data.label_facts(s.db_url)
    if facts.empty:
        ui.no_labels()
    else:
        run_ids = sorted(facts["run_id"].unique())
        options = ["latest", *run_ids]
        which = st.selectbox(
            "Labels",
            options,
            key="imb-scope",
            format_func=lambda o: (
                "the label set: latest done label per sample (as exported)"
                if o == "latest"
                else f"run {o}"
            ),
        )
        scope = (
            suspects.latest_per_sample(facts)
            if which == "latest"
            else facts[(facts["run_id"] == which) & (facts["status"] == "done")]
        )
        if scope.empty:
            st.info("No done labels here: every label of this run failed.")
if not scope.empty:
    stats = keep.keep_stats(scope)
    c = st.columns(3)
    c[0].metric("Labels", stats["labels"])
    c[1].metric("Keep ratio (kept / all tokens)", f"{stats['keep_ratio']:.3f}")
    c[2].metric(
        "Drop : keep",
        f"{(1 - stats['keep_ratio']) / stats['keep_ratio']:.1f} : 1"
        if stats["keep_ratio"]
        else "-",
    )
    fixed = keep.fixed_keep_fraction(scope)
    if fixed is not None:
        st.caption(
            f"Every label keeps the same fraction of its tokens ({fixed:.3f}): the search "
            "setting fixes it (budget mode: `label.keep_ratio`), so its breakdown by question "
            "type or image would be one flat bar."
        )
    else:
        c = st.columns(2)
        fig = px.bar(
            stats["by_qtype"],
            x="qtype",
            y="keep_ratio",
            hover_data=["labels", "kept", "tokens"],
            title="Keep ratio per question type",
        )
        c[0].plotly_chart(fig, key="imb-qtype")
        fig = px.histogram(
            stats["kept_fraction"],
            x="kept_fraction",
            nbins=30,
            title="Distribution of the labels' kept fraction",
        )
        c[1].plotly_chart(fig, key="imb-kept-fraction")

    # ---- what the labels keep, beside the heuristics ------------------------------------------
    st.header("What the labels keep")
    ids = tuple(sorted(int(i) for i in scope["label_id"])[: data.MAX_GROUP_LABELS])
    rows = data.keep_details(s.db_url, ids)
    if len(ids) < len(scope):
        st.caption(f"From the first {len(ids)} of these {len(scope)} labels (by label id).")
    old = int(rows["heuristic_kept"].isna().sum())
    if old:
        st.info(
            f"{old} of {len(rows)} labels were made before this version of evocomp: they record "
            "neither the heuristics' kept tokens nor their groups' vocabulary words, so the "
            "heuristics' bars and maps and the word table leave them out. Labels made from now "
            "on record them (`evocomp label` does not redo samples its run has labelled).",
            icon=":material/history:",
        )

    st.subheader("Keep rate by token class")
    by_class = keep.keep_by_class(rows)
    if by_class.empty:
        st.info(
            "The classes are not recorded for this dataset: its samples do not say which "
            "patches hold objects and which the answer needs (sample meta `objects` and "
            "`relevant`, as the built-in shapes-vqa benchmark records)."
        )
    else:
        fig = px.bar(
            by_class,
            x="class",
            y="keep_rate",
            color="selection",
            barmode="group",
            hover_data=["labels", "tokens", "kept"],
            title="Kept tokens of a class / tokens of that class",
        )
        st.plotly_chart(fig, key="imb-class")
        table = by_class.pivot(index="selection", columns="class", values="keep_rate")
        table = table.rename_axis(columns=None)
        st.dataframe(
            table.loc[by_class["selection"].unique(), list(keep.CLASSES)].reset_index(),
            hide_index=True,
            key="imb-class-table",
        )

    st.subheader("Keep rate per grid cell")
    heat = keep.keep_heatmaps(rows)
    names = list(heat.rates)
    fig = px.imshow(
        np.stack([heat.rates[n] for n in names]),
        facet_col=0,
        facet_col_wrap=4,
        zmin=0.0,
        color_continuous_scale="Viridis",
        labels={"color": "keep rate"},
        title=f"How often each cell of the {heat.grid[0]} x {heat.grid[1]} grid is kept",
        height=100 + 250 * -(-len(names) // 4),  # 250 px per row of 4 maps
    )
    titles = [f"{n} ({heat.labels[n]} labels)" for n in names]
    fig.for_each_annotation(lambda a: a.update(text=titles[int(a.text.split("=")[-1])]))
    st.plotly_chart(fig, key="imb-heatmap")
    if heat.skipped:
        st.caption(f"{heat.skipped} labels of another token grid are left out.")

    st.subheader("Keep rate per vocabulary word")
    words = keep.keep_by_word(rows)
    if words.empty:
        st.info(
            "No label here records its groups' vocabulary words: all were made before this "
            "version of evocomp."
        )
    else:
        c = st.columns(2)
        fig = px.bar(
            words,
            x="word",
            y="keep_rate",
            hover_data=["labels", "tokens", "kept"],
            title=f"The labels' keep rate, {len(words)} most frequent words",
        )
        c[0].plotly_chart(fig, key="imb-words")
        c[1].dataframe(words, hide_index=True, key="imb-words-table")

# ---- GHM: the compressor's gradient norms ---------------------------------------------------
st.header("Difficulty imbalance: GHM gradient norms")
try:
    # no params file (a store browsed outside its project): the defaults, as `evocomp` uses
    params = load_params(s.params) if Path(s.params).is_file() else Params()
except ParamsError as err:
    st.error(str(err))
    st.stop()
current = params.train
g, overlap = None, None
mean_tokens = float(scope["n_tokens"].mean()) if not scope.empty else 0.0
n_train = int((scope["split"] == "train").sum()) if not scope.empty else 0
if not (s.compressor / "model.safetensors").is_file():
    st.info(
        f"No compressor at {s.compressor}: train one (`evocomp train` or `dvc repro`) to see "
        "its gradient-norm histogram.",
        icon=":material/model_training:",
    )
else:
    stamp = (data.mtime(s.compressor / "model.safetensors"), data.mtime(s.labels))
    device = os.environ.get("EVOCOMP_DEVICE") or params.runtime.device
    gs = artifacts.grad_stats(str(s.compressor), str(s.labels), str(s.features), device, stamp)
    if "error" in gs:
        st.warning(f"Cannot score the label set with the compressor: {gs['error']}")
    else:
        g, overlap = gs["g"], gs["overlap"]
        mean_tokens, n_train = gs["mean_tokens"], gs["n_train"]
        counts, edges = np.histogram(np.clip(g, 0, 1), bins=ghm.FINE_BINS, range=(0, 1))
        hist = pd.DataFrame({"g": (edges[:-1] + edges[1:]) / 2, "tokens": counts})
        fig = px.bar(
            hist,
            x="g",
            y="tokens",
            log_y=True,
            title=f"g = |sigmoid(logit) - y| over {len(g)} tokens of {gs['items']} labels",
        )
        for b in range(1, current.ghm_bins):
            fig.add_vline(x=b / current.ghm_bins, line_dash="dot", line_color="grey")
        st.plotly_chart(fig, key="imb-ghm-hist")
        st.caption(
            f"Dotted lines: the {current.ghm_bins} GHM-C regions of train.ghm_bins. "
            f"Kept vs dropped hidden-state cosine: {overlap:.3f}."
        )

st.subheader("Recommended setting")
if g is None and scope.empty:
    st.info(
        "No labels yet: nothing to recommend. Label samples (`evocomp label` or `dvc repro`) "
        "and train a compressor; the recommendation reads their gradient norms and batch sizes.",
        icon=":material/info:",
    )
    st.stop()
rec = ghm.recommend_ghm(g, overlap, current, mean_tokens, n_train)
st.dataframe(
    pd.DataFrame(
        {
            "parameter": ["train.ghm_bins", "train.ghm_momentum", "train.cos_alpha"],
            "current": [
                str(v) for v in (current.ghm_bins, current.ghm_momentum, current.cos_alpha)
            ],
            "recommended": [str(v) for v in (rec.ghm_bins, rec.ghm_momentum, rec.cos_alpha)],
        }
    ),
    hide_index=True,
    key="imb-rec",
)
st.markdown("\n".join(f"- {r}" for r in rec.reasons))

# ---- write it into params.yaml --------------------------------------------------------------
st.subheader("Write to params.yaml")
if not s.params.is_file():
    st.info(f"No params file at {s.params} (EVOCOMP_PARAMS): nothing to update.")
    st.stop()
c = st.columns(3)
values = {
    "ghm_bins": c[0].number_input("ghm_bins", value=int(rec.ghm_bins), step=1, key="w-bins"),
    "ghm_momentum": c[1].number_input(
        "ghm_momentum", value=float(rec.ghm_momentum), step=0.05, key="w-momentum"
    ),
    "cos_alpha": c[2].number_input(
        "cos_alpha", value=float(rec.cos_alpha), step=0.05, key="w-alpha"
    ),
}
flash = st.session_state.pop("params-written", None)
if flash:
    st.success(flash)
try:
    update = params_edit.propose_train_update(s.params.read_text(), values, str(s.params))
except ParamsError as err:
    st.error(f"Refused: {err}")
    st.stop()
if not update.diff:
    st.info(f"{s.params} already has these values.")
    st.stop()
st.code(update.diff, language="diff")
if st.button("Write to params.yaml", type="primary", key="w-write"):
    try:
        params_edit.write_params(s.params, update)
    except (ParamsError, OSError) as err:
        st.error(f"Not written: {err}")
    else:
        st.session_state["params-written"] = (
            f"Wrote {s.params}; the next `dvc repro` retrains the compressor with it."
        )
        st.rerun()
