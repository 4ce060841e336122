"""Prefill and generate() time with the compressor attached vs the untouched model, side by side.

    .venv/bin/python bench/deploy_speed.py                 # CPU, float32 (~3 min on 2 cores)
    .venv/bin/python bench/deploy_speed.py --device cuda --dtype bfloat16
    .venv/bin/python bench/deploy_speed.py --quick --tiny  # a smoke run on a tiny model

Unlike ``bench/speedup.py``, which times the stages by hand, this times what a user runs:
``model.generate(**processor(images=..., text=...), max_new_tokens=...)`` on the same
random model of llava-interleave-qwen-0.5b's shape (``speedup.build_model``; 729 visual
tokens, SigLIP-so400m + Qwen2-0.5B), untouched and with a compressor attached
(``evocomp.deploy.compress_model``). The compressor is a random ``TokenCompressor`` shaped
like an LM layer (which tokens it keeps does not change the time). The tokenizer is the
reference model's word-level one: a short shapes-vqa prompt around the image.

Per pass, in an order rotated each pass: one ``generate()`` per variant, timing the whole call
(vision tower, compressor, prefill, decoding) and, through hooks on the language model, its
prefill forward alone. Also recorded: the prefill length and the KV-cache length after the
call. Speedups are ratios of medians. Writes ``metrics/bench_deploy.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import REPO, begin, collect, command_line, describe_machine, finish, summarize  # noqa: E402
from speedup import DTYPES, Shape, build_model  # noqa: E402

from evocomp.compress.model import CompressorConfig, TokenCompressor, save_compressor  # noqa: E402
from evocomp.deploy import compress_model  # noqa: E402
from evocomp.mllm.sequence import DEFAULT_TEMPLATE  # noqa: E402
from evocomp.tokens import keep_count, ratio_key  # noqa: E402

ALL = "1.000"
QUESTION = "is there a red circle ? how many blue objects are there ? what colour is the cross ?"
TINY = Shape(
    vision_hidden=32, vision_ffn=64, vision_layers=2, vision_heads=2, image_size=96,
    patch_size=16, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=256,
)  # fmt: skip


def build(shape: Shape, device, dtype):
    """``(model, processor)``: the timing model, driven by the reference word-level tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from evocomp.mllm.reference import build_tokenizer

    tok = build_tokenizer()
    model = build_model(shape, device, dtype)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")  # within any vocab
    size = shape.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tok,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="full",  # as build_model: no CLS to drop
        num_additional_image_tokens=0,
    )
    return model, processor


class PrefillClock:
    """Seconds of the language model's first forward in each ``generate()`` (the prefill)."""

    def __init__(self, lm, device):
        self.device, self.seconds, self.length = device, [], []
        self._t0 = None
        lm.register_forward_pre_hook(self._start, with_kwargs=True)
        lm.register_forward_hook(self._stop)

    def arm(self) -> None:
        self._t0 = "armed"

    def _start(self, module, args, kwargs):
        if self._t0 == "armed":
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.length.append(kwargs["inputs_embeds"].shape[1])
            self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        if isinstance(self._t0, float):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds.append(time.perf_counter() - self._t0)
            self._t0 = None


@torch.inference_mode()
def measure(model, processor, ratios: list[float], new_tokens: int, repeats: int, warmup: int):
    """Time ``generate()`` untouched and at each keep ratio, interleaved; see the module doc."""
    from PIL import Image

    device = model.device
    tcfg, side = model.config.text_config, model.config.vision_config.image_size
    grid = side // model.config.vision_config.patch_size
    compressor = TokenCompressor(
        CompressorConfig(
            dim=tcfg.hidden_size, heads=tcfg.num_attention_heads, ffn=tcfg.intermediate_size,
            max_grid=grid + 1,
        )
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="evocomp-bench-deploy-"))
    save_compressor(compressor, folder, {"model_id": None})
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    prompt = DEFAULT_TEMPLATE.replace("{question}", QUESTION)
    inputs = processor(images=Image.fromarray(pixels), text=prompt, return_tensors="pt").to(device)
    clock = PrefillClock(model.model.language_model, device)
    variants = {ALL: None, **{ratio_key(r): r for r in ratios}}
    keys, cache, prefill_len = list(variants), {}, {}

    def run(key: str) -> tuple[float, float]:
        ratio = variants[key]
        handle = compress_model(model, processor, folder, ratio) if ratio is not None else None
        try:
            clock.arm()
            t0 = time.perf_counter()
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, return_dict_in_generate=True,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - t0
        finally:
            if handle is not None:
                handle.detach()
        cache[key], prefill_len[key] = out.cache.get_seq_length(), clock.length[-1]
        return clock.seconds[-1], total

    def one_pass(i: int) -> dict[str, float]:
        r, t = i % len(keys), {}
        for key in keys[r:] + keys[:r]:
            t[f"prefill/{key}"], t[f"generate/{key}"] = run(key)
        return t

    try:
        s = collect(one_pass, repeats, warmup)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = statistics.median
    n = int(inputs["input_ids"].eq(model.config.image_token_id).sum())
    return {
        "prefill_speedup": {k: med(s[f"prefill/{ALL}"]) / med(s[f"prefill/{k}"]) for k in keys[1:]},
        "generate_speedup": {
            k: med(s[f"generate/{ALL}"]) / med(s[f"generate/{k}"]) for k in keys[1:]
        },
        "seconds": {
            "prefill": {k: summarize(s[f"prefill/{k}"]) for k in keys},
            "generate": {k: summarize(s[f"generate/{k}"]) for k in keys},
        },
        "tokens": {
            k: {
                "visual": n if r is None else keep_count(r, n),
                "prefill": prefill_len[k],
                "kv_cache_after": cache[k],
            }
            for k, r in variants.items()
        },
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "compressor_params": sum(p.numel() for p in compressor.parameters()),
    }


def print_report(rep: dict[str, Any]) -> None:
    sec, m = rep["seconds"], rep["model"]
    print(f"\nEvoComp deployment: {m['name']}, {m['params'] / 1e6:.4g}M params, {rep['dtype']}")
    print(f"machine: {describe_machine(rep['machine'])}")
    print(f"{rep['repeats']} repeats after {rep['warmup']} warmup pass(es); generate() of "
          f"{rep['new_tokens']} new tokens; seconds median (min)\n")  # fmt: skip
    print(f"{'keep':>6} {'visual':>6} {'prefill':>7} {'kv':>5} {'LM prefill s':>17} "
          f"{'generate() s':>17} {'prefill x':>9} {'gen x':>6}")  # fmt: skip
    for key, tok in rep["tokens"].items():
        p, g = sec["prefill"][key], sec["generate"][key]
        px, gx = rep["prefill_speedup"].get(key, 1.0), rep["generate_speedup"].get(key, 1.0)
        print(f"{key:>6} {tok['visual']:>6} {tok['prefill']:>7} {tok['kv_cache_after']:>5} "
              f"{p['median']:>8.3f} ({p['min']:.3f}) {g['median']:>8.3f} ({g['min']:.3f}) "
              f"{px:>8.2f}x {gx:>5.2f}x")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=os.environ.get("EVOCOMP_DEVICE", "cpu"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--ratios", default="0.333", help="keep ratios, comma-separated")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens each generate() makes")
    p.add_argument("--quick", action="store_true", help="1 repeat: a smoke run, not a figure")
    p.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_deploy.json")
    args = p.parse_args(argv)
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios: expected comma-separated numbers, got {args.ratios!r}")
    if not args.ratios or not all(0.0 < r < 1.0 for r in args.ratios):
        p.error(f"--ratios: every keep ratio must lie in (0, 1), got {args.ratios}")
    if args.quick:
        args.repeats = 1
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1:
        p.error("--repeats and --new-tokens must be >= 1, --warmup >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns what was written."""
    args = parse_args(argv)
    start, machine = begin(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = TINY if args.tiny else Shape()
    model, processor = build(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e6:.4g}M-param timing model; timing...", flush=True)
    res = measure(model, processor, args.ratios, args.new_tokens, args.repeats, args.warmup)
    report = {
        **res,
        "model": {
            "name": (
                "tiny smoke-run shape"
                if args.tiny
                else "llava-interleave-qwen-0.5b shapes (SigLIP-so400m + Qwen2-0.5B)"
            )
            + ", random weights",
            "shape": asdict(shape),
            "params": params,
        },  # fmt: skip
        "machine": machine,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "command": command_line(argv, __file__),
    }
    finish(report, args.out, start, print_report)
    return report


if __name__ == "__main__":
    main()
