"""Prefill and generate() time with the compressor attached vs the untouched model, side by side.

    .venv/bin/python bench/deploy_speed.py                 # CPU, float32 (~3 min on 2 cores)
    .venv/bin/python bench/deploy_speed.py --device cuda --dtype bfloat16
    .venv/bin/python bench/deploy_speed.py --family qwen2_5_vl  # Qwen2.5-VL-3B shape, bfloat16
    .venv/bin/python bench/deploy_speed.py --quick --tiny  # a smoke run on a tiny model

Unlike ``bench/speedup.py``, which times the stages by hand, this times what a user runs:
``model.generate(**processor(images=..., text=...), max_new_tokens=...)`` on a random model of
a released checkpoint's shape, untouched and with a compressor attached
(``evocomp.deploy.compress_model``). ``--family llava`` (the default): the model of
``bench/speedup.py`` (``speedup.build_model``; llava-interleave-qwen-0.5b, SigLIP-so400m +
Qwen2-0.5B, 729 visual tokens), float32, keep 1/3, 8 new tokens, the reference model's
word-level tokenizer; writes ``metrics/bench_deploy.json``. ``--family qwen2_5_vl``:
Qwen2.5-VL-3B-Instruct's shape (``bench/_deploy_models.py``; a 669M windowed ViT + Qwen2.5-3B,
3.75B parameters), a 448 x 448 image (256 visual tokens), bfloat16 (float32 weights alone
would take 15 GB), keep 1/3 and 1/9, 32 new tokens; writes ``metrics/bench_deploy_qwen.json``.
The compressor is a random ``TokenCompressor`` shaped like an LM layer (which tokens it keeps
does not change the time); the prompt is a short shapes-vqa question in the family's template.

Per pass, in an order rotated each pass: one ``generate()`` per variant, timing the whole call
(vision tower, compressor, prefill, decoding) and, through hooks, the language model's prefill
forward and the vision tower alone. Also recorded: the prefill length and the KV-cache length
after the call, and the vision tower's share of the untouched ``generate()``: it runs whatever
is kept, so no keep ratio can make ``generate()`` faster than 1 / share. Speedups are ratios
of medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import (  # noqa: E402
    REPO,
    begin,
    collect,
    command_line,
    describe_machine,
    finish,
    keep_ratios,
    summarize,
)
from _deploy_models import QWEN25_VOCAB, Subject, llava_subject, qwen_subject  # noqa: E402
from speedup import DTYPES  # noqa: E402

from evocomp.compress.model import CompressorConfig, TokenCompressor, save_compressor  # noqa: E402
from evocomp.deploy import compress_model  # noqa: E402
from evocomp.tokens import keep_count, ratio_key  # noqa: E402

ALL = "1.000"


@dataclass(frozen=True)
class Family:
    """A model family the benchmark times, with its defaults."""

    subject: Callable[..., Subject]  # (tiny, device, dtype, vocab) -> Subject
    ratios: str  # keep ratios, comma-separated
    new_tokens: int
    dtype: str
    out: str  # file under metrics/


FAMILIES = {
    "llava": Family(llava_subject, "0.333", 8, "float32", "bench_deploy.json"),
    # bfloat16: the 3B model's float32 weights alone take 15 GB
    "qwen2_5_vl": Family(qwen_subject, "0.333,0.111", 32, "bfloat16", "bench_deploy_qwen.json"),
}


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


class VisionClock:
    """Seconds of the vision tower in each ``generate()`` (all its forwards, one per image)."""

    def __init__(self, tower, device):
        self.device, self.seconds, self.calls = device, [], []
        self._t0 = 0.0
        tower.register_forward_pre_hook(self._start)
        tower.register_forward_hook(self._stop)

    def arm(self) -> None:
        self.seconds.append(0.0)
        self.calls.append(0)

    def _start(self, module, args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.seconds:
            self.seconds[-1] += time.perf_counter() - self._t0
            self.calls[-1] += 1


@torch.inference_mode()
def measure(subject: Subject, ratios: list[float], new_tokens: int, repeats: int, warmup: int):
    """Time ``generate()`` untouched and at each keep ratio, interleaved; see the module doc."""
    from PIL import Image

    model, processor, side = subject.model, subject.processor, subject.side
    device = model.device
    tcfg = model.config.text_config
    compressor = TokenCompressor(
        CompressorConfig(
            dim=tcfg.hidden_size, heads=tcfg.num_attention_heads, ffn=tcfg.intermediate_size,
            max_grid=subject.grid + 1,
        )
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="evocomp-bench-deploy-"))
    save_compressor(compressor, folder, {"model_id": None})
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    inputs = processor(images=image, text=subject.prompt, return_tensors="pt").to(device)
    clock = PrefillClock(model.model.language_model, device)
    vision = VisionClock(subject.vision, device)
    variants = {ALL: None, **{ratio_key(r): r for r in ratios}}
    keys, cache, prefill_len = list(variants), {}, {}

    def run(key: str) -> tuple[float, float, float]:
        ratio = variants[key]
        handle = compress_model(model, processor, folder, ratio) if ratio is not None else None
        try:
            clock.arm()
            vision.arm()
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
        if vision.calls[-1] != 1:  # the share below assumes the tower ran once for the image
            raise RuntimeError(f"the vision tower ran {vision.calls[-1]} times in one generate()")
        cache[key], prefill_len[key] = out.cache.get_seq_length(), clock.length[-1]
        return clock.seconds[-1], vision.seconds[-1], total

    def one_pass(i: int) -> dict[str, float]:
        r, t = i % len(keys), {}
        for key in keys[r:] + keys[:r]:
            t[f"prefill/{key}"], t[f"vision/{key}"], t[f"generate/{key}"] = run(key)
        return t

    try:
        s = collect(one_pass, repeats, warmup)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = statistics.median
    n = int(inputs["input_ids"].eq(model.config.image_token_id).sum())
    vision_share = med(s[f"vision/{ALL}"]) / med(s[f"generate/{ALL}"])
    return {
        "prefill_speedup": {k: med(s[f"prefill/{ALL}"]) / med(s[f"prefill/{k}"]) for k in keys[1:]},
        "generate_speedup": {
            k: med(s[f"generate/{ALL}"]) / med(s[f"generate/{k}"]) for k in keys[1:]
        },
        "vision_share": vision_share,  # of the untouched generate(), medians
        "generate_speedup_bound": 1 / vision_share,  # were all but the vision tower free
        "seconds": {
            "prefill": {k: summarize(s[f"prefill/{k}"]) for k in keys},
            "generate": {k: summarize(s[f"generate/{k}"]) for k in keys},
            "vision": {k: summarize(s[f"vision/{k}"]) for k in keys},
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
    if "vocab_note" in m:
        print(f"vocab {m['shape']['vocab']}: {m['vocab_note']}")
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
    v, g = sec["vision"][ALL]["median"], sec["generate"][ALL]["median"]
    print(f"vision tower: {v:.3f} s of the untouched generate()'s {g:.3f} s "
          f"({rep['vision_share']:.0%}); it runs whatever is kept, so no keep ratio makes "
          f"generate() more than {rep['generate_speedup_bound']:.2f}x faster")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="llava", help="model shape")
    p.add_argument("--device", default=os.environ.get("EVOCOMP_DEVICE", "cpu"))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the family's")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--ratios", help="keep ratios, comma-separated (default: the family's)")
    p.add_argument(
        "--new-tokens", type=int, help="tokens each generate() makes (default: the family's)"
    )
    p.add_argument("--quick", action="store_true", help="1 repeat: a smoke run, not a figure")
    p.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run")
    p.add_argument("--vocab", type=int, help=f"qwen2_5_vl's LM vocabulary (default {QWEN25_VOCAB})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="default: metrics/bench_deploy[_qwen].json")
    args = p.parse_args(argv)
    family = FAMILIES[args.family]
    args.dtype = args.dtype or family.dtype
    args.ratios = args.ratios if args.ratios is not None else family.ratios
    args.new_tokens = family.new_tokens if args.new_tokens is None else args.new_tokens
    args.out = args.out or REPO / "metrics" / family.out
    args.ratios = keep_ratios(p, args.ratios)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1:
        p.error("--repeats and --new-tokens must be >= 1, --warmup >= 0")
    if args.vocab is not None and (args.family != "qwen2_5_vl" or args.vocab < 1):
        p.error("--vocab: a positive vocabulary size, for --family qwen2_5_vl only")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns what was written."""
    args = parse_args(argv)
    start, machine = begin(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    subject = FAMILIES[args.family].subject(args.tiny, device, dtype, args.vocab)
    print(f"built {subject.info['params'] / 1e6:.4g}M-param timing model; timing...", flush=True)
    res = measure(subject, args.ratios, args.new_tokens, args.repeats, args.warmup)
    report = {
        **res,
        "model": subject.info,
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
