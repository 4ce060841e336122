"""Label quality: ranked suspect labels, filters, export for a deeper re-search, before/after."""

from __future__ import annotations

import json

import streamlit as st

from dashboards import artifacts, data, ui
from evocomp.audit.suspects import (
    EXPLAIN,
    REASONS,
    WEIGHTS,
    before_after,
    reason_counts,
    score_suspects,
)

PREVIEW = 100  # ids shown in the export preview

s = data.settings()
st.title("Label quality")
facts = ui.labels_or_stop(s)

with st.expander("Suspect rules", icon=":material/tune:"):
    d = artifacts.audit_rules(s)
    c = st.columns(4)
    rules = d.model_copy(
        update={
            "max_heuristic_gap": c[0].number_input(
                "Above the best heuristic by (scales)",
                0.0,
                None,
                d.max_heuristic_gap,
                0.01,
                key="max_heuristic_gap",
            ),
            "max_excess": c[1].number_input(
                "Above the full-token loss by (scales)",
                0.0,
                None,
                d.max_excess,
                0.1,
                key="max_excess",
            ),
            "min_margin": c[2].number_input(
                "Runner-up within (scales)",
                0.0,
                None,
                d.min_margin,
                0.005,
                format="%.3f",
                key="min_margin",
            ),
            "min_agreement": c[3].number_input(
                "Seed agreement below (Jaccard)",
                0.0,
                1.0,
                d.min_agreement,
                0.05,
                key="min_agreement",
            ),
        }
    )
    st.markdown(
        "Losses are in units of the sample's **loss scale**: the worst heuristic's answer loss "
        f"minus the full-token loss (at least {rules.loss_floor:g} nats), i.e. how much the "
        "choice of tokens matters for this question. The reasons, weighted in the score:\n"
        + "\n".join(f"- **{r}** ({WEIGHTS[r]:g}): {EXPLAIN[r]};" for r in REASONS)
        + f"\n\nmargin, agreement and not_converged count only where the label's loss is more "
        f"than {rules.min_room:g} scales above the full-token loss (room to improve). Each fired "
        "reason's severity is 0.5 at its threshold and grows to 1; the score is the weighted sum, "
        f"and a label scoring {rules.flag_score:g} or more is a suspect. Defaults: `audit:` in "
        "params.yaml."
    )

scored = score_suspects(facts, rules)
scored = scored[scored["status"] == "done"]

st.subheader("Filters")
view = scored
for label, col, key in (
    ("Question type", "qtype", "f-qtype"),
    ("Model", "model_id", "f-model"),
    ("Run", "run_id", "f-run"),
):
    view = ui.apply_filter(view, col, ui.filter_with_distribution(label, view[col], key))
only = st.toggle("Suspects only", value=True, key="only-suspects")
reasons_fired = reason_counts(view, suspects_only=only)  # of the labels listed below
left, right = st.columns([2, 3])
reasons = left.multiselect("Reason", list(REASONS), key="f-reason", placeholder="any")
right.plotly_chart(
    ui.counts_chart(reasons_fired), key="f-reason-dist", config={"displayModeBar": False}
)

suspects = view[view["suspect"]]
if reasons:
    suspects = suspects[suspects[[f"r_{r}" for r in reasons]].gt(0).any(axis=1)]
shown = suspects if only else view

c = st.columns(3)
c[0].metric("Suspect labels", len(suspects))
c[1].metric("Labels in view", len(view))
c[2].metric("Suspect share", f"{len(suspects) / len(view):.1%}" if len(view) else "-")

st.subheader("Ranked labels" if not only else "Ranked suspects")
cols = [
    "sample_id",
    "run_id",
    "model_id",
    "qtype",
    "score",
    "reasons",
    "margin",
    "agreement",
    "loss",
    "full_loss",
    "best_heuristic_loss",
    "scale",
    "gap",
    "excess",
    "converged_gen",
    "last_gen",
]
ui.paginate(
    shown[cols], "suspects", column_config={"score": st.column_config.NumberColumn(format="%.2f")}
)

ids = list(dict.fromkeys(suspects["sample_id"]))  # rank order, each sample once
export = suspects.drop_duplicates("sample_id")[
    ["sample_id", "score", "reasons", "run_id", "model_id", "qtype"]
]
c = st.columns([1, 1, 3])
c[0].download_button(
    "Export CSV",
    export.to_csv(index=False),
    "suspects.csv",
    "text/csv",
    key="export-csv",
    disabled=not ids,
)
c[1].download_button(
    "Export JSON",
    json.dumps(ids, indent=1),
    "suspects.json",
    "application/json",
    key="export-json",
    disabled=not ids,
)
c[2].caption(
    f"{len(ids)} sample ids. Re-search them deeper with `evocomp label --ids suspects.json` "
    "(or the CSV, its `sample_id` column) after raising `label.generations` / `label.population` "
    "or setting `label.seeds: 2`: the new run's labels supersede these in the exported label set, "
    "and the comparison appears below."
)
if ids:
    with st.expander(f"Preview the JSON export ({min(len(ids), PREVIEW)} of {len(ids)} ids)"):
        st.code(json.dumps(ids[:PREVIEW], indent=1), language="json")
    pick = st.selectbox("Open a suspect in the drill-down", ids[:200], key="open-suspect")
    if st.button("Open in Sample drill-down", icon=":material/image_search:", key="open-drill"):
        st.session_state["drill_sample"] = pick
        st.switch_page("pages/sample.py")

# ---- before / after -----------------------------------------------------------------------
st.header("Before / after re-labelling")
ba = before_after(facts[facts["sample_id"].isin(set(view["sample_id"]))])
if ba.empty:
    st.info(
        "No sample has labels in several runs yet. Export the suspects above and re-label "
        "them with a larger search budget to compare.",
        icon=":material/compare:",
    )
else:
    c = st.columns(3)
    c[0].metric("Samples re-labelled", len(ba))
    c[1].metric("Loss improved", int((ba["delta"] < 0).sum()))
    c[2].metric("Mean loss change", f"{ba['delta'].mean():+.4f}")
    ui.paginate(ba, "before-after")
    sid = st.selectbox("Compare the labels of", list(ba["sample_id"]), key="ba-sample")
    labels = data.sample_labels(s.db_url, sid)
    labels = labels[labels["status"] == "done"]
    kept = [set(k) for k in labels["kept"]]
    labels = labels.assign(
        jaccard_to_first=[len(kept[0] & k) / max(1, len(kept[0] | k)) for k in kept],
        kept=[" ".join(map(str, sorted(k))) for k in kept],
    )
    st.dataframe(
        labels[
            [
                "run_id",
                "model_id",
                "params_hash",
                "run_created",
                "k",
                "loss",
                "full_loss",
                "margin",
                "agreement",
                "converged_gen",
                "jaccard_to_first",
                "kept",
            ]
        ],
        hide_index=True,
        key="ba-labels",
    )
