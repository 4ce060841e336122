"""`evocomp label` / `evocomp serve` without a Prefect server: user errors, id files, --in-process."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from evocomp.cli import app
from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset
from evocomp.errors import DatasetError
from evocomp.labeling.selection import parse_shard, read_ids

PARAMS = "label: {population: 8, parents: 4, generations: 2, splits: [test], max_samples: 4}\n"


@pytest.fixture
def workspace(shapes_data, tmp_path, monkeypatch):
    """A project folder with prepared samples and a small params.yaml, as the cwd."""
    raw = shutil.copytree(shapes_data, tmp_path / "raw")
    write_prepared(read_dataset(raw), tmp_path / "data" / "prepared", str(raw))
    (tmp_path / "params.yaml").write_text(PARAMS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", ["label", "serve"])
def test_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "2/2"], "0 <= i < n"),
        (["--shard", "x"], "expected i/n"),
        (["--split", "dev"], "--split 'dev'"),
        (["--task-runner", "mpi"], "expected thread or dask"),
        (["--population", "4"], "parents must be"),
        (["--keep-ratio", "1.5"], "label.keep_ratio: Input should be less than or equal to 1"),
        (["--mode", "greedy"], "label.mode: Input should be 'paper' or 'budget'"),
        (["--soft-target", "gain"], "label.soft_target: Input should be 'elite' or 'elimination'"),
        (["--objective", "kl"], "label.objective: Input should be 'answer' or 'distill'"),
        (["--warm-start", "nowhere"], "no compressor at"),
        (["--model", "nope"], "nope: not a model checkpoint"),
        (["--data", "missing"], "prepared samples not found"),
        (["--ids", "missing.json"], "cannot read the ids file"),
        (["--db-url", "mysql+nothing://x"], "store URL"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(workspace, tiny_llava, args, message):
    result = CliRunner().invoke(app, ["label", "--model", str(tiny_llava), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_unknown_ids_are_a_user_error(workspace, tiny_llava):
    (workspace / "ids.txt").write_text("not-a-sample\n")
    result = CliRunner().invoke(app, ["label", "--model", str(tiny_llava), "--ids", "ids.txt"])
    assert result.exit_code == 2 and "none of the 1 sample ids" in result.output


def test_serve_refuses_a_bad_cron():
    result = CliRunner().invoke(app, ["serve", "--cron", "every night"])
    assert result.exit_code == 2 and "not a valid cron expression" in result.output


@pytest.mark.parametrize(
    "name, text",
    [
        ("s.json", '["a", "b", "a"]'),
        ("s.json", '[{"sample_id": "a", "loss": 1}, {"sample_id": "b"}]'),
        ("s.csv", "sample_id,reason\na,low margin\nb,disagreement\n"),
        ("s.txt", "a\n\nb\n"),
    ],
)
def test_read_ids_formats(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_ids(tmp_path / name) == ["a", "b"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("s.json", "{", "not valid JSON"),
        ("s.json", '{"a": 1}', "expected a JSON list"),
        ("s.json", "[1, 2]", "not sample ids"),
        ("s.csv", "x,y\n1,2\n", "no sample_id column"),
        ("s.txt", "\n", "no sample ids"),
    ],
)
def test_read_ids_refuses_bad_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_ids(tmp_path / name)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)


def test_in_process_then_deeper_re_search_of_some_ids(workspace, tiny_llava):
    """--in-process labels without Prefect; --ids + a larger budget makes a superseding run."""
    base = ["label", "--in-process", "--model", str(tiny_llava)]
    first = CliRunner().invoke(app, [*base, "--fitness-plot", "plots/fitness.csv"])
    assert first.exit_code == 0, first.output
    assert "4/4 samples labelled (4 searched, 0 already labelled)" in first.output
    export = pd.read_parquet(workspace / "data/labels/labels.parquet").set_index("sample_id")
    assert len(export) == 4 and export["run_id"].nunique() == 1
    metrics = json.loads((workspace / "metrics/labels.json").read_text())
    assert metrics["samples"] == 4
    space = metrics["search_space_log10"]  # from each label's groups and k
    assert 0 < space["min"] <= space["median"] <= space["max"] <= math.log10(math.comb(36, 18))
    curve = pd.read_csv(workspace / "plots/fitness.csv")
    assert list(curve.columns) == ["gen", "min", "avg", "max", "samples"]
    assert curve["gen"].tolist() == [0, 1, 2] and (curve["samples"] == 4).all()
    assert curve["min"].is_monotonic_decreasing  # the mean best-so-far never gets worse

    suspects = sorted(export.index)[:2]
    (workspace / "suspects.json").write_text(json.dumps(suspects))
    deeper = CliRunner().invoke(app, [*base, "--ids", "suspects.json", "--generations", "3"])
    assert deeper.exit_code == 0, deeper.output
    assert "2/2 samples labelled (2 searched" in deeper.output
    after = pd.read_parquet(workspace / "data/labels/labels.parquet").set_index("sample_id")
    assert len(after) == 4
    new_run = after.loc[suspects, "run_id"]
    assert new_run.nunique() == 1 and new_run.iloc[0] != export["run_id"].iloc[0]
    others = sorted(set(after.index) - set(suspects))
    assert (after.loc[others, "run_id"] == export["run_id"].iloc[0]).all()
    assert {s.id for s in load_prepared("data/prepared", "test", 4)} == set(after.index)
