"""`dvc repro` end to end in a temp copy of the repo (tiny profile, tiny random LLaVA).

Checks the incremental path: after new samples are appended to the raw dataset,
only they are searched, and the compressor and metrics are regenerated; and that
`dvc exp run -S ...` produces different metrics that `dvc metrics diff` shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from evocomp.data.synth import write_dataset
from tests.conftest import make_tiny_llava
from tests.dvc_helpers import BIN, copy_repo, git_workspace, sh

pytestmark = pytest.mark.slow


def append_samples(dataset: Path, n: int, seed: int) -> int:
    """Append n new images (another seed) to a LLaVA-format dataset folder."""
    extra = dataset.parent / f"extra-{seed}"
    write_dataset(extra, n, seed)
    records = json.loads((dataset / "dataset.json").read_text())
    new = json.loads((extra / "dataset.json").read_text())
    for rec in new:
        shutil.copy(extra / rec["image"], dataset / rec["image"])
    (dataset / "dataset.json").write_text(json.dumps(records + new))
    return len(new)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, repo_root):
    ws = tmp_path_factory.mktemp("ws")
    copy_repo(repo_root, ws, skip=("models/mllm/",))
    make_tiny_llava(ws / "models" / "tiny")
    write_dataset(ws / "userdata", 40, 5)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["prepare"]["source"] = "userdata"
    params["mllm"]["checkpoint"] = "models/tiny"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = git_workspace(ws)
    return ws, env


def labels_in_store(ws: Path) -> dict[str, tuple]:
    from sqlalchemy import create_engine

    eng = create_engine(f"sqlite:///{ws}/data/evocomp.db")
    with eng.connect() as c:
        rows = c.execute(
            text("select sample_id, id, updated_at from labels where status='done'")
        ).all()
    eng.dispose()
    return {r[0]: (r[1], str(r[2])) for r in rows}


def test_repro_then_incremental_then_experiment(workspace):
    ws, env = workspace
    sh([str(BIN / "dvc"), "repro", "evaluate"], ws, env)
    first = labels_in_store(ws)
    assert len(first) == json.loads((ws / "data/prepared/manifest.json").read_text())["samples"]
    eval1 = json.loads((ws / "metrics/eval.json").read_text())
    comp1 = json.loads((ws / "models/compressor/config.json").read_text())["extra"][
        "label_set_hash"
    ]
    assert set(eval1["ratios"]) == {"0.500", "0.333", "0.222", "0.111"}

    # a second repro is a no-op
    out = sh([str(BIN / "dvc"), "repro", "evaluate"], ws, env)
    assert "didn't change" in out or "up to date" in out.lower()

    # the dataset grows: only the new samples are searched
    added = append_samples(ws / "userdata", 10, 6)
    sh([str(BIN / "dvc"), "repro", "evaluate"], ws, env)
    second = labels_in_store(ws)
    assert len(second) == len(first) + added
    assert all(
        second[sid] == first[sid] for sid in first
    )  # old labels untouched: not searched again
    comp2 = json.loads((ws / "models/compressor/config.json").read_text())["extra"][
        "label_set_hash"
    ]
    assert comp2 != comp1  # retrained on the grown label set
    eval2 = json.loads((ws / "metrics/eval.json").read_text())
    assert eval2["samples"] >= eval1["samples"]

    # an experiment with other search settings: metrics differ and `dvc metrics diff` shows it
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "commit", "-qm", "grown"], ws, env)
    # (a key the tiny profile does not override: a profile's keys win over top-level ones)
    sh([str(BIN / "dvc"), "exp", "run", "-S", "label.seed=7", "evaluate"], ws, env)
    diff = sh([str(BIN / "dvc"), "metrics", "diff", "--json"], ws, env)
    changed = json.loads(diff)
    assert "metrics/labels.json" in changed and changed["metrics/labels.json"]
    params_diff = json.loads(sh([str(BIN / "dvc"), "params", "diff", "--json"], ws, env))
    assert params_diff["params.yaml"]["label.seed"]["new"] == 7
