"""Smoke runs of the CLI commands and their user-facing errors (exit status 2, one line)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evocomp.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_every_stage():
    out = invoke("--help").output
    for cmd in (
        "synth",
        "prepare",
        "mllm",
        "features",
        "label",
        "train",
        "evaluate",
        "db",
        "labels",
        "dashboard",
    ):
        assert cmd in out


def test_synth_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("synth", "--n", "6", "--seed", "2", "--out", "raw").exit_code == 0
    res = invoke("prepare", "--source", "raw", "--out", "prep")
    assert res.exit_code == 0 and "6 samples" in res.output
    assert (tmp_path / "prep" / "samples.parquet").is_file()
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["samples"] == 6


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("prepare", "--source", "nowhere/data.json"), "dataset not found"),
        (("train", "--labels", "none.parquet", "--model", "nomodel"), "no config.json"),
        (("mllm", "eval", "--model", "nomodel", "--n", "2"), "no config.json"),
        (
            ("labels", "export", "--url", "postgresql+psycopg://u:secret@127.0.0.1:1/x"),
            "cannot connect",
        ),
    ],
)
def test_user_errors_exit_2(tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, list(args))
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert "secret" not in res.output


def test_bad_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("label:\n  generations: -1\n")
    res = runner.invoke(app, ["synth", "--n", "1"])
    assert res.exit_code == 2 and "label.generations" in res.output


def test_mllm_eval_on_a_checkpoint(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("mllm", "eval", "--model", str(tiny_llava), "--n", "6", "--out", "m.json")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m["ratios"]) == {"0.500", "0.333", "0.222", "0.111"}
    assert {"oracle", "objects", "random", "anti"} <= set(m["ratios"]["0.333"]) and 0 <= m[
        "full"
    ] <= 1


def test_db_upgrade(tmp_path):
    res = invoke("db", "upgrade", "--url", f"sqlite:///{tmp_path}/s.db")
    assert res.exit_code == 0 and (tmp_path / "s.db").is_file()
