"""Widgets the pages share: the store gate, filters with their distribution, pagination, and the
kept-token overlay on the patch grid."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st
from PIL import Image, ImageDraw

from dashboards import data
from evocomp.tokens import grid_shape

PAGE_SIZE = 25


def store_ready(s: data.Settings) -> bool:
    """True when the store can be read; else an empty state that says what to do."""
    problem = data.store_problem(s.db_url)
    if problem:
        st.info(f"**No label store yet.** {problem}.", icon=":material/database:")
        return False
    return True


def no_labels() -> None:
    st.info(
        "**The store has no labels yet.** Label a dataset with `evocomp label` (or `dvc repro`), "
        "then reload this page.",
        icon=":material/label_off:",
    )


def labels_or_stop(s: data.Settings):
    """The label facts table, or an empty state and ``st.stop()`` when the store has none."""
    if not store_ready(s):
        st.stop()
    facts = data.label_facts(s.db_url)
    if facts.empty:
        no_labels()
        st.stop()
    return facts


def filter_with_distribution(label: str, values: pd.Series, key: str) -> list:
    """A multiselect over ``values``' distinct values, with their counts charted beside it.

    An empty selection means all values.
    """
    counts = values.fillna("(none)").astype(str).value_counts().sort_index()
    left, right = st.columns([2, 3])
    chosen = left.multiselect(label, list(counts.index), key=key, placeholder="all")
    right.plotly_chart(counts_chart(counts), key=f"{key}-dist", config={"displayModeBar": False})
    return chosen


def counts_chart(counts: pd.Series):
    """A compact horizontal bar chart of counts per (categorical) value."""
    fig = px.bar(
        x=counts.values,
        y=[str(i) for i in counts.index],
        orientation="h",
        labels={"x": "labels", "y": ""},
        height=max(100, 50 + 22 * len(counts)),
    )
    fig.update_yaxes(type="category")
    fig.update_xaxes(title=None)
    fig.update_layout(margin={"l": 0, "r": 0, "t": 0, "b": 0})
    return fig


def apply_filter(df: pd.DataFrame, col: str, chosen: Sequence) -> pd.DataFrame:
    if not chosen:
        return df
    return df[df[col].fillna("(none)").astype(str).isin([str(c) for c in chosen])]


def paginate(df: pd.DataFrame, key: str, page_size: int = PAGE_SIZE, **kwargs) -> None:
    """Show one page of ``df`` at a time (a list view never renders thousands of rows)."""
    pages = max(1, math.ceil(len(df) / page_size))
    page = 1
    if pages > 1:
        page = int(st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"{key}-page"))
    lo = (page - 1) * page_size
    st.dataframe(df.iloc[lo : lo + page_size], hide_index=True, key=f"{key}-table", **kwargs)
    st.caption(f"rows {lo + 1 if len(df) else 0}-{min(lo + page_size, len(df))} of {len(df)}")


def group_colours(n: int) -> list[tuple[int, int, int]]:
    """n well-separated colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def token_boxes(n_tokens: int, cells: Sequence[Sequence[int]] | None) -> tuple[int, int, list]:
    """``(rows, cols, [(row, col) per token])``: the tokens' cells on their bounding grid
    (the feature cache's ``cells``), else the square-or-one-row rule of ``grid_shape``."""
    if cells is None or len(cells) != n_tokens:
        rows, cols = grid_shape(n_tokens)
        return rows, cols, [divmod(t, cols) for t in range(n_tokens)]
    at = [(int(r), int(c)) for r, c in cells]
    return 1 + max(r for r, _ in at), 1 + max(c for _, c in at), at


def soft_map(soft: Sequence[float], cells: Sequence[Sequence[int]] | None) -> list[list]:
    """The soft label on the token grid (rows of keep rates; None where no token sits, the
    highest rate where several do)."""
    rows, cols, at = token_boxes(len(soft), cells)
    grid: list[list] = [[None] * cols for _ in range(rows)]
    for (r, c), v in zip(at, soft, strict=True):
        grid[r][c] = v if grid[r][c] is None else max(grid[r][c], v)
    return grid


def overlay(
    image_path: str | Path | None,
    n_tokens: int,
    kept: Sequence[int],
    groups: Sequence[int] | None,
    size: int = 384,
    cells: Sequence[Sequence[int]] | None = None,
) -> Image.Image:
    """The image with its patch grid: every cell tinted by its group, kept cells outlined in
    their group's colour and left bright, dropped cells darkened. ``cells``: each token's
    (row, col) when the image's tokens are not one square grid (a Qwen aspect ratio,
    LLaVA-NeXT's base + tiles, where a base token shares its cell with tile tokens)."""
    rows, cols, at = token_boxes(n_tokens, cells)
    try:
        base = Image.open(image_path).convert("RGB") if image_path else None
    except OSError:
        base = None
    if base is None:
        base = Image.new("RGB", (size, size * rows // cols or size), (235, 235, 235))
    base = base.resize((size, max(1, size * rows // cols)))
    w, h = base.size
    ids = list(groups) if groups is not None else [0] * n_tokens
    palette = group_colours(max(ids, default=0) + 1)
    keep = set(int(k) for k in kept)
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    boxes = []
    for t in range(n_tokens):
        r, c = at[t]
        box = (c * w / cols, r * h / rows, (c + 1) * w / cols - 1, (r + 1) * h / rows - 1)
        boxes.append(box)
        colour = palette[ids[t]] if groups is not None else (128, 128, 128)
        if t in keep:
            draw.rectangle(box, fill=(*colour, 60))
        else:  # darkened, with a hint of the group's colour
            draw.rectangle(box, fill=(*(c // 4 for c in colour), 150))
    out = Image.alpha_composite(base.convert("RGBA"), tint)
    draw = ImageDraw.Draw(out)
    for t in sorted(keep):
        colour = palette[ids[t]] if groups is not None else (255, 215, 0)
        draw.rectangle(boxes[t], outline=(*colour, 255), width=max(2, w // 128))
    return out.convert("RGB")
