"""Smoke tests of bench/speedup.py and bench/deploy_speed.py on shrunk models, and their helpers
(no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

RATIOS = ["0.500", "0.333", "0.222", "0.111"]


@pytest.fixture
def bench(bench_module):
    """The benchmark modules."""
    return bench_module("speedup"), bench_module("_common")


def tiny_shape(speedup):
    return speedup.Shape(
        vision_hidden=32, vision_ffn=64, vision_layers=2, vision_heads=2, image_size=56,
        patch_size=14, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=1000,
    )  # fmt: skip


def _positive_stats(stats: dict) -> None:
    assert stats["min"] > 0 and stats["median"] >= stats["min"] and stats["repeats"] >= 1


def test_main_writes_every_key(bench, tmp_path, tiny_llava):
    speedup, _ = bench
    out = tmp_path / "bench_speedup.json"
    argv = ["--quick", "--warmup", "1", "--out", str(out), "--reference", str(tiny_llava)]
    report = speedup.main(argv, shape=tiny_shape(speedup))
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert not list(tmp_path.glob("*.tmp"))

    for name in ("prefill_speedup", "end_to_end_speedup"):
        assert sorted(data[name]) == sorted(RATIOS)
        assert all(math.isfinite(x) and x > 0 for x in data[name].values())
    sec = data["seconds"]
    for stage in ("vision", "text", "compressor"):
        _positive_stats(sec[stage])
    for part in ("prefill", "end_to_end", "assemble"):
        assert sorted(sec[part]) == sorted(["1.000", *RATIOS])
        for stats in sec[part].values():
            _positive_stats(stats)
    # 56 px / 14 px patches = 4 x 4 visual tokens; 1/3 keeps round(16 / 3) = 5 of them.
    assert data["tokens"]["1.000"] == {"visual": 16, "sequence": 16 + speedup.TEXT_TOKENS}
    assert data["tokens"]["0.333"]["visual"] == 5

    flops = data["flops_llava15_7b"]
    assert flops["1.000"]["ratio_to_full"] == 1.0
    fractions = [flops[k]["ratio_to_full"] for k in ["1.000", *RATIOS]]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] > 0

    ref = data["reference"]
    assert "skipped" not in ref and ref["tokens"]["1.000"]["visual"] == 36
    assert ref["prefill_speedup"]["0.333"] > 0 and ref["end_to_end_speedup"]["0.333"] > 0

    assert set(data["targets"]) == {"prefill_speedup", "end_to_end_speedup"}
    assert all(isinstance(t["pass"], bool) for t in data["targets"].values())
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["device_name"]
    assert data["command"].split()[1:3] == ["bench/speedup.py", "--quick"]


def test_reference_is_skipped_with_a_note_when_absent(bench, tmp_path):
    speedup, _ = bench
    ref = speedup.reference_figures(tmp_path / "nope", 1, 0, "cpu", None)
    assert "nope" in ref["skipped"]


def test_prefill_flops_of_llama2_7b(bench):
    speedup, _ = bench
    # LLaMA-2-7B has 6.74e9 parameters, of which 2 x 32000 x 4096 sit in embedding and head.
    per_token = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert abs(per_token - (6.738e9 - 2 * 32000 * 4096)) < 0.01e9
    one = speedup.prefill_flops(1, hidden=4096, layers=32, ffn=11008)
    assert one == 2 * per_token + 4 * 32 * 4096
    assert speedup.flops_llava15_7b([1 / 3])["0.333"]["visual_tokens"] == 192


@pytest.mark.parametrize("bad", ["0", "1.0", "0.5,x", ""])
def test_bad_ratios_are_refused(bench, bad):
    speedup, _ = bench
    with pytest.raises(SystemExit):
        speedup.parse_args(["--ratios", bad])


def test_time_interleaved_rotates_and_drops_warmup(bench):
    _, common = bench
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    samples = common.time_interleaved(fns, repeats=2, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a"]
    assert {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2, "c": 2}
    assert common.summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "repeats": 3}
    with pytest.raises(ValueError):
        common.summarize([])


def test_write_json_atomic_replaces_whole_file(bench, tmp_path):
    _, common = bench
    path = tmp_path / "m" / "bench_x.json"
    common.write_json_atomic(path, {"a": 1})
    common.write_json_atomic(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["bench_x.json"]


# ---- bench/deploy_speed.py's families ----------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "defaults"),
    [
        ("llava", ("float32", [0.333], 8, "bench_deploy.json")),
        ("qwen2_5_vl", ("bfloat16", [0.333, 0.111], 32, "bench_deploy_qwen.json")),
    ],
)
def test_deploy_speed_family_defaults(bench, family, defaults):
    import deploy_speed

    args = deploy_speed.parse_args(["--family", family])
    assert (args.dtype, args.ratios, args.new_tokens, args.out.name) == defaults
    args = deploy_speed.parse_args(["--family", family, "--dtype", "float16", "--ratios", "0.5"])
    assert (args.dtype, args.ratios) == ("float16", [0.5])


def test_deploy_speed_vocab_is_qwen_only(bench):
    import deploy_speed

    assert deploy_speed.parse_args(["--family", "qwen2_5_vl", "--vocab", "300"]).vocab == 300
    for argv in (["--vocab", "300"], ["--family", "qwen2_5_vl", "--vocab", "0"]):
        with pytest.raises(SystemExit):
            deploy_speed.parse_args(argv)


def test_qwen_timing_model_has_the_3b_checkpoints_shape(bench):
    """Built on the meta device (no memory): Qwen2.5-VL-3B-Instruct's 3.75B parameters."""
    import _deploy_models as models

    model, processor = models.build_qwen(models.QwenShape(), "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    vision = model.config.vision_config
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 2048)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (36, 2048, 2)
    grid = processor.image_processor(images=[Image.new("RGB", (448, 448))])["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 32]] and models.QwenShape().grid ** 2 == 256


def test_deploy_speed_qwen_smoke(bench, tmp_path):
    """``--family qwen2_5_vl --tiny --quick`` end to end: tokens and keys, no timings judged."""
    import deploy_speed

    out, new = tmp_path / "bench_deploy_qwen.json", 3
    argv = ["--family", "qwen2_5_vl", "--tiny", "--quick", "--warmup", "0"]
    report = deploy_speed.main([*argv, "--new-tokens", str(new), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report)) and not list(tmp_path.glob("*.tmp"))
    assert data["dtype"] == "bfloat16"
    assert data["model"]["weight_bytes"] == 2 * data["model"]["params"]
    keys = ["1.000", "0.333", "0.111"]
    tokens = data["tokens"]
    # 96 px / (8 px patches merged 2 x 2) = 6 x 6 = 36 visual tokens; 1/3 keeps 12, 1/9 keeps 4
    assert [tokens[k]["visual"] for k in keys] == [36, 12, 4]
    for k in keys:  # the dropped tokens are gone from the prefill and the cache
        assert tokens[k]["prefill"] == tokens["1.000"]["prefill"] - (36 - tokens[k]["visual"])
        assert tokens[k]["kv_cache_after"] == tokens[k]["prefill"] + new - 1
    for name in ("prefill_speedup", "generate_speedup"):
        assert sorted(data[name]) == sorted(keys[1:])
        assert all(math.isfinite(x) and x > 0 for x in data[name].values())
    for part in ("prefill", "generate", "vision"):
        assert sorted(data["seconds"][part]) == sorted(keys)
        for stats in data["seconds"][part].values():
            _positive_stats(stats)
    assert 0 < data["vision_share"] < 1
    assert data["generate_speedup_bound"] == pytest.approx(1 / data["vision_share"])
    assert data["command"].split()[1:5] == ["bench/deploy_speed.py", *argv[:3]]
