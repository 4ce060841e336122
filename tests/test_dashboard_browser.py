"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, every page.

    .venv/bin/python -m pytest tests/test_dashboard_browser.py -m browser

Starts ``streamlit run dashboards/app.py`` on 127.0.0.1 and a free port over a small synthetic
store (``bench/dashboard_load.py``'s generator), visits every page, asserts that no Streamlit
exception element is shown and saves a screenshot of each page under
``artifacts/screenshots/`` (kept by CI as artifacts). Never downloads a browser: skipped when
/usr/bin/chromium is absent (``apt-get install chromium``).

With ``EVOCOMP_BROWSER_DEMO=1`` the dashboard reads the repository's own outputs (after
``make demo``) instead, so the screenshots show the demo run (``docs/screenshots/``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
SHOTS = REPO / "artifacts" / "screenshots"
PAGES = {  # url path -> the page's title
    "": "Overview",
    "label_quality": "Label quality",
    "sample": "Sample drill-down",
    "imbalance": "Class imbalance",
}
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"streamlit did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _synthetic_outputs(root: Path) -> dict[str, str]:
    """A small synthetic store and metrics under ``root``; the dashboard's env pointing there."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from dashboard_load import make_store
    finally:
        sys.path.remove(str(REPO / "bench"))
    url = f"sqlite:///{root / 'store.db'}"
    make_store(url, 200, root)
    (root / "metrics").mkdir()
    ratios = {"0.333": {"random": 0.5, "fastv": 0.7, "evocomp": 0.9}}
    (root / "metrics" / "eval.json").write_text(json.dumps({"full": 0.95, "ratios": ratios}))
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return {
        "EVOCOMP_DB_URL": url,
        "EVOCOMP_PARAMS": str(root / "params.yaml"),
        "EVOCOMP_METRICS_DIR": str(root / "metrics"),
        "EVOCOMP_LABELS": str(root / "labels.parquet"),
        "EVOCOMP_COMPRESSOR": str(root / "compressor"),
        "EVOCOMP_FEATURES_DIR": str(root / "features"),
    }


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip(
            f"Debian chromium not found at {CHROMIUM}: `apt-get install chromium` "
            "(browser tests never download a browser)"
        )
    root = tmp_path_factory.mktemp("dash-browser")
    if os.environ.get("EVOCOMP_BROWSER_DEMO") == "1":
        if not (REPO / "data" / "evocomp.db").is_file():
            pytest.skip("EVOCOMP_BROWSER_DEMO=1 needs the demo's outputs: run `make demo`")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCOMP_")}
    else:
        env = os.environ | _synthetic_outputs(root)
    port = _free_port()
    log = root / "streamlit.log"
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "dashboards/app.py",
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _settle(page, title: str) -> None:
    """Wait until the page's title is shown and the script run has finished."""
    page.get_by_role("heading", name=title).first.wait_for(timeout=30_000)
    # While a script runs Streamlit shows a "Running..." status widget; wait for it to go.
    # and marks the elements of the previous run stale until the new run replaces them; a
    # widget whose code is still loading shows as a skeleton.
    page.wait_for_function(
        "() => !document.querySelector("
        '\'[data-testid="stStatusWidget"], [data-stale="true"], [data-testid="stSkeleton"]\')',
        timeout=30_000,
    )
    page.wait_for_timeout(1000)  # plotly draws after the script's last message


def test_every_page_renders_without_exception(dashboard):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            for path, title in PAGES.items():
                page.goto(f"{dashboard}/{path}")
                _settle(page, title)
                errors = page.locator('[data-testid="stException"]')
                name = path or "overview"
                page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
                assert errors.count() == 0, f"{title}: {errors.first.inner_text()}"
            # one interaction: open the top suspect in the drill-down from Label quality
            page.goto(f"{dashboard}/label_quality")
            _settle(page, "Label quality")
            page.get_by_role("button", name="Open in Sample drill-down").click()
            _settle(page, "Sample drill-down")
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.get_by_text("Fitness vs generation").count() == 1
            page.screenshot(path=str(SHOTS / "sample_from_suspect.png"), full_page=True)
        finally:
            browser.close()
