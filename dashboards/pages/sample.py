"""Sample drill-down: kept tokens on the image, the search's history and elite, the model's answers."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from dashboards import artifacts, data, ui
from evocomp.audit import suspects
from evocomp.config import Params, load_params
from evocomp.errors import ParamsError

s = data.settings()
st.title("Sample drill-down")
facts = ui.labels_or_stop(s)

# ---- which sample ---------------------------------------------------------------------------
ranked = suspects.score_suspects(facts, artifacts.audit_rules(s))
ranked = ranked[ranked["status"] == "done"]
top = list(dict.fromkeys(ranked["sample_id"]))[:100]
wanted = st.session_state.pop("drill_sample", None) or st.query_params.get("sample")
if wanted and wanted not in top:
    top = [wanted, *top]
c = st.columns([3, 2])
picked = c[0].selectbox(
    "Sample (most suspect first)", top, index=top.index(wanted) if wanted else 0, key="drill-pick"
)
typed = c[1].text_input("or a sample id / prefix", key="drill-typed").strip()
sid = picked
if typed:
    matches = data.find_samples(s.db_url, typed)
    if not matches:
        st.warning(f"No sample id starts with {typed!r}.")
        st.stop()
    sid = (
        matches[0]
        if len(matches) == 1
        else st.selectbox("Matching samples", matches, key="drill-match")
    )
sample = data.sample(s.db_url, sid)
if sample is None:
    st.warning(f"Sample {sid} is not in the store.")
    st.stop()
labels = data.sample_labels(s.db_url, sid)
if labels.empty:
    st.info(f"Sample {sid} has no label yet.")
    st.stop()
names = [
    f"run {r.run_id} · {r.status} · {r.model_id[:24]} · {r.run_created}"
    for r in labels.itertuples()
]
choice = st.selectbox(
    "Label of run",
    range(len(labels)),
    index=len(labels) - 1,
    format_func=lambda i: names[i],
    key="drill-run",
)
lab = labels.iloc[choice]
if lab["status"] != "done":
    st.error(f"This sample failed in run {lab['run_id']}:\n\n{lab['error']}")
    st.stop()


def image_path(row: dict) -> Path | None:
    """The sample's image: as stored, else relative to its dataset's source or the cwd."""
    p = Path(row["image"])
    src = Path(row["source"] or ".")
    for cand in (p, src / p, src.parent / p, Path.cwd() / p):
        if cand.is_file():
            return cand
    return None


# ---- the label on the image -----------------------------------------------------------------
img = image_path(sample)
left, right = st.columns([3, 2])
with left:
    kept, groups = list(lab["kept"]), lab["groups"]
    cells = data.token_cells(s.features, str(lab["model_id"]), sid)
    n_tok = int(lab["n_tokens"])
    st.image(
        # >= 32 px per cell: a 24 x 24 scenes-vqa grid is drawn at 768 px
        ui.overlay(img, n_tok, kept, groups, size=max(384, 32 * round(n_tok**0.5)), cells=cells),
        width=420 if n_tok <= 256 else 720,  # a 24 x 24 grid gets more room
        caption=f"{len(kept)} of {lab['n_tokens']} tokens kept (outlined); colour = "
        "vocabulary group; dropped tokens darkened",
    )
    if img is None:
        st.caption(f"Image not found ({sample['image']}): the grid is drawn on a blank canvas.")
    if lab["soft"] is not None:
        fig = px.imshow(
            ui.soft_map(list(lab["soft"]), cells),
            zmin=0,
            zmax=1,
            color_continuous_scale="Viridis",
            height=300,
            labels={"color": "keep rate"},
            title="Soft label: how often the final elite keeps each token",
        )
        fig.update_layout(margin={"l": 0, "r": 0, "t": 40, "b": 0})
        st.plotly_chart(fig, key="drill-soft")
with right:
    st.markdown(
        f"**Question** ({sample['qtype'] or 'no type'}, {sample['split']}): {sample['question']}"
    )
    st.markdown(f"**Answer:** {sample['answer']}")
    st.caption(f"sample `{sid}` · dataset {sample['dataset']}")
    m = st.columns(3)
    m[0].metric("Label loss", f"{lab['loss']:.4f}" if pd.notna(lab["loss"]) else "-")
    m[1].metric("All tokens", f"{lab['full_loss']:.4f}" if pd.notna(lab["full_loss"]) else "-")
    m[2].metric("Margin", f"{lab['margin']:.4f}" if pd.notna(lab["margin"]) else "-")
    m = st.columns(3)
    m[0].metric("Groups", lab["n_groups"] if pd.notna(lab["n_groups"]) else "-")
    m[1].metric("Agreement", f"{lab['agreement']:.2f}" if pd.notna(lab["agreement"]) else "-")
    m[2].metric("Converged at gen", lab["converged_gen"] if pd.notna(lab["converged_gen"]) else "-")
    hl = lab["heuristic_losses"] or {}
    if hl:
        h = pd.DataFrame({"selection": ["label", *hl], "loss": [lab["loss"], *hl.values()]})
        st.dataframe(h.sort_values("loss"), hide_index=True, key="drill-heuristics")
# ---- the search -----------------------------------------------------------------------------
st.subheader("Fitness vs generation")
gens = data.generations(s.db_url, int(lab["label_id"]))
if gens.empty:
    st.info("No generation history stored for this label.")
else:
    fig = go.Figure()
    band = gens.dropna(subset=["avg", "std"])
    fig.add_trace(
        go.Scatter(
            x=list(band["gen"]) + list(band["gen"])[::-1],
            y=list(band["avg"] + band["std"]) + list(band["avg"] - band["std"])[::-1],
            fill="toself",
            line={"width": 0},
            name="avg ± std",
            opacity=0.2,
        )
    )
    for col in ("min", "avg", "max"):
        fig.add_trace(go.Scatter(x=gens["gen"], y=gens[col], mode="lines+markers", name=col))
    if pd.notna(lab["full_loss"]):
        fig.add_hline(y=lab["full_loss"], line_dash="dot", annotation_text="all tokens")
    if hl:
        fig.add_hline(y=min(hl.values()), line_dash="dash", annotation_text="best heuristic")
    fig.update_layout(xaxis_title="generation", yaxis_title="answer loss (lower is better)")
    st.plotly_chart(fig, key="drill-fitness")

st.subheader("Elite candidates")
elite = data.elites(s.db_url, int(lab["label_id"]))
if elite.empty:
    st.info("No elite stored for this label.")
else:
    label_set = set(kept)
    elite = elite.assign(
        k=elite["kept"].map(len),
        jaccard_to_label=elite["kept"].map(
            lambda e: len(label_set & set(e)) / max(1, len(label_set | set(e)))
        ),
        kept=elite["kept"].map(lambda e: " ".join(map(str, e))),
    )
    st.dataframe(
        elite[["rank", "loss", "k", "jaccard_to_label", "kept"]], hide_index=True, key="drill-elite"
    )

# ---- the model's answers --------------------------------------------------------------------
st.subheader("The model's answers")
try:
    # no params file (a store browsed outside its project): the defaults, as `evocomp` uses
    params = load_params(s.params) if Path(s.params).is_file() else Params()
except ParamsError as err:
    st.error(str(err))
    st.stop()
ckpt = Path(params.mllm.checkpoint)
if not (ckpt / "config.json").is_file():
    st.info(
        f"No model checkpoint at {ckpt} (params mllm.checkpoint): answers are skipped.",
        icon=":material/smart_toy:",
    )
    st.stop()
key = f"answers-{int(lab['label_id'])}"
if st.button("Compute answers (all tokens / label / each heuristic)", key="drill-answer"):
    from dashboards.answers import answers

    try:
        device = os.environ.get("EVOCOMP_DEVICE") or params.runtime.device
        stamp = data.mtime(ckpt / "config.json")
        mllm = artifacts.load_mllm(
            str(ckpt), device, params.runtime.dtype, stamp, params.mllm.prompt_template
        )
        st.session_state[key] = answers(mllm, sample, lab, img, s.features, params)
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        st.session_state[key] = {"error": f"{type(err).__name__}: {err}"}
result = st.session_state.get(key)
if result is None:
    st.caption("Loads the model once (cached) and decodes greedily with each selection.")
elif "error" in result:
    st.warning(f"Answers skipped: {result['error']}")
else:
    for note in result["notes"]:
        st.caption(note)
    st.dataframe(result["table"], hide_index=True, key="drill-answers")
