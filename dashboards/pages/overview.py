"""Overview: label runs and their health, label-set versions, losses, the search budget
(where bench/anytime.py has run), compressor retention."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from dashboards import artifacts, data, ui
from evocomp.audit import suspects

s = data.settings()
st.title("Overview")

HEALTH_HELP = (
    "Bad share of a run = (sum over its done labels of min(suspect score, 1) + failed labels) / "
    "(done + failed); health = max(0, 1 - bad share / audit.health_tolerance). 1.0: no suspect "
    "and no failure; 0: the evidence adds up to health_tolerance (params.yaml, default 0.25) of "
    "the labels being bad. A label worse than a heuristic costs 0.5-1, a failure 1. The suspect "
    "score is explained on the Label quality page."
)

# ---- label runs -----------------------------------------------------------------------------
st.header("Label runs")
facts = pd.DataFrame()
if ui.store_ready(s):
    runs = data.runs(s.db_url)
    if runs.empty:
        ui.no_labels()
    else:
        facts = data.label_facts(s.db_url)
        rules = artifacts.audit_rules(s)
        health = suspects.run_health(suspects.score_suspects(facts, rules), rules)
        table = runs.merge(
            health[["run_id", "suspects", "bad_share", "health"]], on="run_id", how="left"
        )
        latest = table.iloc[-1]
        c = st.columns(5)
        c[0].metric("Runs", len(table))
        c[1].metric("Labels done", int(table["done"].sum()))
        c[2].metric("Failed", int(table["failed"].sum()))
        c[3].metric(
            "Pending (latest run)", "-" if pd.isna(latest["pending"]) else int(latest["pending"])
        )
        c[4].metric(
            "Health (latest run)",
            f"{latest['health']:.3f}" if pd.notna(latest["health"]) else "-",
            help=HEALTH_HELP,
        )
        table["params_hash"] = table["params_hash"].str[:12]
        st.dataframe(
            table[
                [
                    "run_id",
                    "model_id",
                    "params_hash",
                    "mode",
                    "objective",
                    "warm_start",
                    "status",
                    "done",
                    "failed",
                    "pending",
                    "suspects",
                    "bad_share",
                    "health",
                    "created_at",
                    "finished_at",
                    "code_version",
                    "note",
                ]
            ],
            hide_index=True,
            key="runs-table",
            column_config={
                "health": st.column_config.ProgressColumn(
                    "health", min_value=0.0, max_value=1.0, format="%.3f"
                )
            },
        )
        st.caption(
            "pending = samples of the run's dataset(s) without a done label in that run "
            "(failed ones included: a re-run retries them)."
        )

        st.subheader("Health over time", help=HEALTH_HELP)
        fig = px.line(
            table,
            x="created_at",
            y="health",
            color="model_id",
            markers=True,
            hover_data=["run_id", "done", "failed", "suspects"],
            range_y=[0, 1.02],
        )
        st.plotly_chart(fig, key="health-chart")

        st.subheader("Label loss vs full-token loss vs best heuristic")
        done = facts[facts["status"] == "done"]
        means = done.groupby("run_id")[["loss", "full_loss", "best_heuristic_loss"]].mean()
        means = means.rename(
            columns={
                "loss": "label",
                "full_loss": "all tokens",
                "best_heuristic_loss": "best heuristic",
            }
        ).reset_index()
        long = means.melt(id_vars="run_id", var_name="selection", value_name="mean answer loss")
        long["run"] = "run " + long["run_id"].astype(str)
        st.plotly_chart(
            px.bar(long, x="run", y="mean answer loss", color="selection", barmode="group"),
            key="loss-chart",
        )
        beats = (done["loss"] <= done["best_heuristic_loss"] + 1e-9).mean() if len(done) else None
        if beats is not None and done["best_heuristic_loss"].notna().any():
            st.caption(f"{beats:.1%} of done labels are never worse than the best heuristic.")

# ---- label-set versions ---------------------------------------------------------------------
st.header("Label-set versions")
info = artifacts.label_set_info(str(s.labels), data.mtime(s.labels))
train = artifacts.metrics(s, "train.json") or {}
head = artifacts.git_head(str(Path.cwd()))
dvc_md5 = artifacts.dvc_lock_md5("dvc.lock", data.mtime(Path("dvc.lock")), str(s.labels))
rows = [
    {"what": "label set file", "value": str(s.labels) if info else f"{s.labels} (absent)"},
    {"what": "label set hash", "value": (info or {}).get("hash") or "-"},
    {"what": "labels in it", "value": str((info or {}).get("rows", "-"))},
    {
        "what": "runs in it (run: labels)",
        "value": ", ".join(f"{r}: {n}" for r, n in (info or {}).get("runs", {}).items()) or "-",
    },
    {
        "what": "compressor trained on (metrics/train.json)",
        "value": train.get("label_set_hash") or "-",
    },
    {"what": "DVC md5 (dvc.lock)", "value": dvc_md5 or "-"},
    {"what": "git HEAD", "value": head or "-"},
]
if info and "error" in info:
    st.warning(info["error"])
st.dataframe(pd.DataFrame(rows), hide_index=True, key="versions-table")
if info and train.get("label_set_hash") and info.get("hash") != train["label_set_hash"]:
    st.warning(
        "The compressor was trained on another version of the label set: `dvc repro` retrains it."
    )

labels_json = artifacts.metrics(s, "labels.json")
if labels_json:
    st.subheader("Label set (metrics/labels.json)")
    bars = {
        "label": labels_json.get("mean_label_loss"),
        "all tokens": labels_json.get("mean_full_loss"),
    }
    bars |= {
        f"heuristic: {m}": v for m, v in (labels_json.get("mean_heuristic_loss") or {}).items()
    }
    bars = {k: v for k, v in bars.items() if isinstance(v, int | float)}
    c = st.columns(3)
    c[0].metric("Samples", labels_json.get("samples", "-"))
    c[1].metric("Failed", labels_json.get("failed", "-"))
    never = labels_json.get("never_worse_than_best_heuristic")
    c[2].metric(
        "Never worse than best heuristic", f"{never:.1%}" if isinstance(never, float) else "-"
    )
    if bars:
        fig = px.bar(x=list(bars), y=list(bars.values()), labels={"x": "", "y": "mean answer loss"})
        st.plotly_chart(fig, key="labels-json-chart")

# ---- search budget (bench/anytime.py) ------------------------------------------------------
anytime = artifacts.metrics(s, "bench_anytime.json")
if anytime and isinstance(anytime.get("settings"), dict):
    st.subheader(
        "Search budget: best loss vs candidates scored (bench_anytime.json)",
        help="Each setting's mean excess loss over a search 5x the label budget, in loss scales "
        "(worst heuristic minus all tokens), after each number of candidates scored. "
        f"Measured by `{anytime.get('command', 'bench/anytime.py')}`.",
    )
    table = pd.DataFrame(
        [
            {
                "setting": name,
                "candidates": v.get("mean_forwards"),
                "excess (mean)": v.get("mean_final_excess"),
                "excess (median)": v.get("median_final_excess"),
                "candidates to the label's quality (median)": v.get(
                    "median_forwards_to_label_quality"
                ),
                "samples reaching it": v.get("reached_label_quality"),
                "within 1/4 of the budget": v.get("reached_within_quarter_budget"),
            }
            for name, v in anytime["settings"].items()
            if isinstance(v, dict)
        ]
    )
    st.dataframe(table.round(3), hide_index=True, key="anytime-table")
    curve = artifacts.plot_csv(anytime["plot"]) if anytime.get("plot") else None
    if curve is not None and {"setting", "forwards", "excess"} <= set(curve.columns):
        fig = px.line(curve, x="forwards", y="excess", color="setting", log_x=True)
        fig.update_layout(yaxis_title="mean excess over the 5x search (loss scales)")
        st.plotly_chart(fig, key="anytime-chart")

# ---- compressor retention -------------------------------------------------------------------
st.header("Compressor retention")
ev = artifacts.metrics(s, "eval.json")
if not ev or not isinstance(ev.get("ratios"), dict):
    st.info(
        f"No evaluation yet ({s.metrics / 'eval.json'} is absent): run `evocomp evaluate` "
        "(or `dvc repro`).",
        icon=":material/query_stats:",
    )
else:
    full = ev.get("full")
    retention = ev.get("retention") or {
        r: {m: 100 * a / full if full else 0.0 for m, a in accs.items()}
        for r, accs in ev["ratios"].items()
    }
    ret = pd.DataFrame(
        [
            {
                "keep ratio": float(r),
                "method": m,
                "retention %": v,
                "accuracy": ev["ratios"][r].get(m),
            }
            for r, row in retention.items()
            for m, v in row.items()
        ]
    )
    c = st.columns(2)
    c[0].metric("Full-token accuracy", f"{full:.3f}" if isinstance(full, int | float) else "-")
    if "0.333" in retention and "evocomp" in retention["0.333"]:
        c[1].metric("EvoComp retention at keep 1/3", f"{retention['0.333']['evocomp']:.1f}%")
    fig = px.line(
        ret.sort_values("keep ratio"),
        x="keep ratio",
        y="retention %",
        color="method",
        markers=True,
        log_x=True,
    )
    st.plotly_chart(fig, key="retention-chart")
    pivot = ret.pivot(index="method", columns="keep ratio", values="retention %")
    st.dataframe(pivot.sort_index(axis=1, ascending=False).round(1), key="retention-table")
