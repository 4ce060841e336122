"""EvoComp audit dashboard: label runs, label quality, one sample's search, class imbalance.

    streamlit run dashboards/app.py --server.headless true --server.address 127.0.0.1
    evocomp dashboard            # the same (make dashboard)

Reads the label store (``EVOCOMP_DB_URL``, default ``data/evocomp.db``), ``params.yaml``
(``EVOCOMP_PARAMS``), ``metrics/`` (``EVOCOMP_METRICS_DIR``), the label set, the features and
the compressor (see ``dashboards/data.py``), relative to the working directory. It never writes
the store; its one write is the explicit "write to params.yaml" action on Class imbalance.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts only dashboards/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboards import data  # noqa: E402
from evocomp.store import mask_url  # noqa: E402

st.set_page_config(page_title="EvoComp audit", page_icon=":material/fact_check:", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page(
        "pages/label_quality.py",
        title="Label quality",
        icon=":material/rule:",
        url_path="label_quality",
    ),
    st.Page(
        "pages/sample.py",
        title="Sample drill-down",
        icon=":material/image_search:",
        url_path="sample",
    ),
    st.Page(
        "pages/imbalance.py",
        title="Class imbalance",
        icon=":material/balance:",
        url_path="imbalance",
    ),
]

page = st.navigation(PAGES)
s = data.settings()
with st.sidebar:
    st.caption(f"Store: `{mask_url(s.db_url)}`")
    st.caption(f"Params: `{s.params}` · metrics: `{s.metrics}/`")
    if st.button("Reload data", icon=":material/refresh:", help="Clear the cached queries"):
        st.cache_data.clear()
page.run()
