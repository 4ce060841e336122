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
        (("labels", "export", "--paper", "--keep-ratio", "0.1"), "pass one budget"),
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


def _newer_store(url: str) -> None:
    from sqlalchemy import create_engine, text

    from evocomp.store import upgrade

    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
    engine.dispose()


@pytest.mark.parametrize(
    "args",
    [("db", "upgrade"), ("labels", "export", "--out", "l.parquet"), ("label", "--data", "d")],
)
def test_a_store_from_a_newer_evocomp_is_refused(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    _newer_store(url)
    monkeypatch.setenv("EVOCOMP_DB_URL", url)
    if args[0] == "label":
        invoke("synth", "--n", "4", "--out", "raw")
        invoke("prepare", "--source", "raw", "--out", "d")
        args = (*args, "--model", str(tiny_checkpoint(tmp_path)))
    res = runner.invoke(app, list(args))
    assert res.exit_code == 2, res.output
    assert "created by a newer evocomp (schema revision 0099_future" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "l.parquet").exists()


def tiny_checkpoint(tmp_path):
    """A folder that passes the checkpoint checks (config + a weights file), never loaded."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llava", "image_seq_length": 4}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    return ckpt


@pytest.mark.parametrize(
    ("config", "weights", "match"),
    [
        ({"model_type": "llava"}, False, "no weights"),
        (
            {"model_type": "idefics3"},
            True,
            "'idefics3' is not supported (supported families: llava",
        ),
        (
            {"model_type": "gemma3", "vision_config": {"model_type": "clip_vision_model"}},
            True,
            "Gemma 3 checkpoint with vision tower 'clip_vision_model' is not supported",
        ),
        (
            {"model_type": "llava", "vision_config": {"model_type": "pixtral"}},
            True,
            "vision tower 'pixtral' is not supported",
        ),
        ({"model_type": "qwen2_vl"}, True, "needs preprocessor_config.json"),
        (None, False, "no config.json"),
    ],
)
@pytest.mark.parametrize("command", ["label", "features", "train", "evaluate"])
def test_unusable_checkpoints_stop_before_any_work(
    tmp_path, monkeypatch, config, weights, match, command
):
    monkeypatch.chdir(tmp_path)
    invoke("synth", "--n", "4", "--out", "raw")
    invoke("prepare", "--source", "raw", "--out", "data/prepared")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if config is not None:
        (ckpt / "config.json").write_text(json.dumps(config))
    if weights:
        (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    res = runner.invoke(app, [command, "--model", str(ckpt)])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "data" / "evocomp.db").exists()  # no store rows, no failed labels
    assert not (tmp_path / "data" / "labels").exists() and not (tmp_path / "metrics").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("synth", "--n", "2", "--out", "blocker/raw"),
        ("prepare", "--source", "raw", "--out", "blocker/prepared"),
        ("labels", "export", "--out", "blocker/labels.parquet"),
        ("label", "--data", "prepared", "--metrics", "blocker/labels.json"),
        ("train", "--metrics", "blocker/train.json"),
        ("evaluate", "--out", "blocker/eval.json"),
    ],
)
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    invoke("synth", "--n", "2", "--out", "raw")
    invoke("prepare", "--source", "raw", "--out", "prepared")
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, list(args))
    assert res.exit_code == 2, res.output
    assert "cannot write blocker/" in res.output and "is a file, not a folder" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_an_empty_dataset_is_an_error_at_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.json").write_text("[]")
    res = runner.invoke(app, ["prepare", "--source", "empty.json", "--out", "prepared"])
    assert res.exit_code == 2 and "no samples in the dataset" in res.output
    assert not (tmp_path / "prepared").exists()


def test_a_named_params_file_that_is_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["synth", "--n", "1", "--params", "parms.yaml", "--out", "raw"])
    assert res.exit_code == 2 and "parms.yaml: params file not found" in res.output
    assert not (tmp_path / "raw").exists()


def test_a_named_speed_file_that_is_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["evaluate", "--speed", "speedup.json"])
    assert res.exit_code == 2 and "--speed speedup.json: file not found" in res.output


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "not a readable evaluation result"), ("{}", "has no compressor_for_ratio")],
)
def test_an_unreadable_route_is_an_error_before_anything_loads(
    tmp_path, monkeypatch, content, match
):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "eval.json").write_text(content)
    res = runner.invoke(app, ["evaluate", "--route", "eval.json", "--out", "out.json"])
    assert res.exit_code == 2 and match in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out.json").exists()
