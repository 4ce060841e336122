"""``make demo``: the whole pipeline on the built-in benchmark, then where to look.

    .venv/bin/python -m evocomp.demo

Runs ``dvc repro evaluate mllm_eval`` -- the shapes-vqa stage set; the scenes-vqa one
(``scenes_*``, tens of minutes) is its own command, README -- (stages run one at a time: DVC
holds a workspace lock), prints the evaluation table, and says how to open the dashboard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # `evocomp` and `dvc` from this venv
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run(cmd: list[str]) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    code = subprocess.call(cmd, env=_env())
    if code != 0:
        sys.exit(f"`{' '.join(cmd)}` failed with exit status {code}")


def main() -> None:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        sys.exit("run `make demo` from the repository root (no dvc.yaml here)")
    if not (root / ".git").exists():
        sys.exit("the DVC pipeline needs a git checkout (clone the repository)")
    t0 = time.time()
    run(["dvc", "repro", "evaluate", "mllm_eval"])
    print(f"\npipeline finished in {time.time() - t0:.0f} s\n", flush=True)
    # (`dvc metrics show` prints every nested key on one very wide line; the table reads better)
    ev = root / "metrics" / "eval.json"
    if ev.is_file():
        from evocomp.evaluation.report import print_table

        print("\n" + print_table(json.loads(ev.read_text())))
    print("""
results:
  metrics/eval.json     accuracy and retention per method and keep ratio (test split)
  metrics/labels.json   label-set quality (label loss vs full vs heuristics)
  metrics/mllm.json     the reference model's accuracy and oracle/random gaps
  data/labels/labels.parquet, models/compressor/   the versioned label set and compressor
  all metrics:  .venv/bin/dvc metrics show --json;  plots:  .venv/bin/dvc plots show (dvc_plots/index.html)
dashboard:
  make dashboard        then open http://127.0.0.1:8501
""")


if __name__ == "__main__":
    main()
