"""The whole pipeline on a tiny checkpoint of every supported family, in one test each:
prepare -> features -> label -> train -> evaluate -> ``evocomp generate`` with the trained
compressor inside the model's own ``generate()``.

Half the images are resized to another shape: a family whose token count follows the image
(Qwen's aspect-ratio grids, LLaVA-NeXT / OneVision tiles) labels, trains, evaluates and
deploys on two N; a family that resizes every image (LLaVA-1.5, Gemma 3) on one.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.tokens import keep_count
from tests.conftest import make_tiny_gemma3, make_tiny_llava, make_tiny_qwen_vl
from tests.test_mllm_next import make_tiny_llava_next

# family -> (builder, the other image shape, whether N follows the image)
FAMILIES = {
    "llava": (make_tiny_llava, (96, 160), False),
    "qwen2_vl": (lambda p: make_tiny_qwen_vl(p, "qwen2_vl"), (160, 96), True),
    "qwen2_5_vl": (lambda p: make_tiny_qwen_vl(p, "qwen2_5_vl"), (160, 96), True),
    "qwen3_vl": (lambda p: make_tiny_qwen_vl(p, "qwen3_vl"), (160, 96), True),
    "gemma3": (lambda p: make_tiny_gemma3(p, seed=3), (96, 160), False),
    "llava_next": (lambda p: make_tiny_llava_next(p, "llava_next"), (96, 160), True),
    "llava_onevision": (
        lambda p: make_tiny_llava_next(p, "llava_onevision"),
        (96, 160),
        True,
    ),
}
PARAMS = (
    "label: {population: 8, parents: 4, generations: 2, max_samples: 4, mode: budget}\n"
    "train: {epochs: 2}\n"
    "evaluate: {max_samples: 2, ratios: [0.333], methods: [random, fastv, sparsevlm, visionzip, prumerge, evocomp]}\n"
)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_end_to_end(tmp_path, monkeypatch, shapes_data, family):
    build, other_shape, n_varies = FAMILIES[family]
    model = build(tmp_path / family)
    data = shutil.copytree(shapes_data, tmp_path / "raw")
    images = sorted((data / "images").glob("*.png"))
    for path in images[1::2]:
        Image.open(path).resize(other_shape).save(path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS)
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        res = runner.invoke(app, list(args), catch_exceptions=False)
        assert res.exit_code == code, res.output
        return res

    run("prepare", "--source", str(data), "--out", "data/prepared")
    run("features", "--model", str(model))
    assert "12/12 samples labelled" in run("label", "--in-process", "--model", str(model)).output
    labels = pd.read_parquet(tmp_path / "data" / "labels" / "labels.parquet")
    assert len(set(labels["n_tokens"])) == (2 if n_varies else 1)
    run("train", "--model", str(model))
    run("evaluate", "--model", str(model))
    result = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert result["model_id"] == checkpoint_info(model)["model_id"]
    assert set(result["ratios"]["0.333"]) == {
        "random", "fastv", "sparsevlm", "visionzip", "prumerge", "evocomp"
    }  # fmt: skip

    n_seen = set()
    for image in images[:2]:  # one of each shape
        args = ["generate", "--model", str(model), "--compressor", "models/compressor",
                "--image", str(image), "--question", "what colour is the square ?", "--json"]  # fmt: skip
        out = json.loads(run(*args).stdout.strip().splitlines()[-1])
        assert out["answer"] and out["model_id"] == result["model_id"]
        assert out["k"] == keep_count(0.333, out["n_tokens"]) == len(out["kept"])
        assert out["prompt_tokens"] - out["prefill_tokens"] == out["n_tokens"] - out["k"]
        n_seen.add(out["n_tokens"])
    assert len(n_seen) == (2 if n_varies else 1)
