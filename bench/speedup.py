"""Prefill and end-to-end speedup of visual-token compression, on a model of real shape.

    .venv/bin/python bench/speedup.py                    # CPU, float32 (~5 min on 2 cores)
    .venv/bin/python bench/speedup.py --device cuda --dtype bfloat16
    .venv/bin/python bench/speedup.py --quick            # 1 repeat: a smoke run

On the 1M-parameter reference model fixed overheads hide any gain, so the speed claim is measured
on a randomly initialised ``LlavaForConditionalGeneration`` with the dimensions of
llava-interleave-qwen-0.5b, built from configs (nothing is downloaded; weights do not matter for
timing): a SigLIP-so400m vision tower at 384 px, "full" features of the last layer, 27 x 27 = 729
visual tokens; a Qwen2-0.5B LM. A 40-token prompt surrounds the image (5 tokens before it, the
question and the assistant header after it).

One pass times, in order: the vision tower + projector; the text embedding; the compressor (one
``TokenCompressor`` layer shaped like an LM layer: width 896, 14 heads, ffn 4864); then, for all
tokens and for every keep ratio, in an order rotated each pass, assembling the LM input (top-k
gather + concat) and one LM prefill (``logits_to_keep=1``). The stages run one after the other
(on CUDA synchronised at each boundary), so each pass gives

    end_to_end(all) = vision + text + assemble(all) + prefill(all)
    end_to_end(r)   = vision + text + compressor + assemble(r) + prefill(r)

and one vision run feeds every variant, so a noisy neighbour hits them alike. Speedups are
ratios of medians over passes (ratios of minimums are recorded too). Also reported: analytic
prefill FLOPs of LLaVA-1.5-7B at each ratio, and the same timings on the reference model
(``models/mllm``) when it exists. Writes ``metrics/bench_speedup.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import (
    REPO,
    collect,
    command_line,
    describe_machine,
    finish,  # noqa: E402
    keep_ratios,
    machine_info,
    summarize,
    timed,
)
from torch import Tensor  # noqa: E402

from evocomp.compress.model import CompressorConfig, TokenCompressor, select_topk  # noqa: E402
from evocomp.tokens import keep_count, ratio_key  # noqa: E402

ALL = "1.000"  # the key of the uncompressed run
DEFAULT_RATIOS = "0.5,0.333,0.222,0.111"  # keep 1/2, 1/3, 1/4.5, 1/9 of the visual tokens
TARGET_RATIO, TARGETS = "0.333", {"prefill_speedup": 2.0, "end_to_end_speedup": 1.5}
TEXT_TOKENS, TEXT_BEFORE = 40, 5  # prompt length; tokens before the image ("<|im_start|>user\n")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QWEN2_VOCAB = 151936


@dataclass(frozen=True)
class Shape:
    """Dimensions of the timing model; the defaults are llava-interleave-qwen-0.5b's."""

    vision_hidden: int = 1152  # SigLIP-so400m
    vision_ffn: int = 4304
    vision_layers: int = 26  # 27 in so400m; LLaVA reads the last used layer, -1 of 26
    vision_heads: int = 16
    image_size: int = 384
    patch_size: int = 14  # 384 // 14 = 27 -> 27 x 27 = 729 visual tokens
    hidden: int = 896  # Qwen2-0.5B
    ffn: int = 4864
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    vocab: int = QWEN2_VOCAB


def build_model(
    shape: Shape, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """A random ``LlavaForConditionalGeneration`` of the given shape, in eval mode."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_ffn,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, vision_use_head=False,
    )  # fmt: skip
    text = Qwen2Config(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab, tie_word_embeddings=True,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=shape.vocab - 1,
        image_seq_length=(shape.image_size // shape.patch_size) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    return model.to(dtype=dtype).eval()


def _assemble(before: Tensor, visual: Tensor, question: Tensor, keep: Tensor | None) -> Tensor:
    """LM input (1, T + k, D): prompt prefix, the kept visual tokens in original order, question."""
    if keep is not None:  # (1, k) indices
        visual = visual.gather(1, keep[..., None].expand(-1, -1, visual.shape[-1]))
    return torch.cat([before, visual, question], 1)


@torch.inference_mode()
def measure(
    model, ratios: list[float], repeats: int, warmup: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Time vision, compressor and LM prefill side by side, all tokens vs each keep ratio.

    Returns ``prefill_speedup`` and ``end_to_end_speedup`` ({ratio key: median ratio}),
    ``speedup_of_minimums``, ``seconds`` (min/median per stage and variant) and ``tokens``.
    """
    device, dtype = model.device, model.dtype
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    side = vcfg.image_size // vcfg.patch_size
    compressor = (
        TokenCompressor(
            CompressorConfig(
                dim=tcfg.hidden_size,
                layers=1,
                heads=tcfg.num_attention_heads,
                ffn=tcfg.intermediate_size,
                max_grid=side + 1,
                use_text=True,
            )
        )
        .to(device, dtype)
        .eval()
    )
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, vcfg.image_size, vcfg.image_size, generator=g).to(device, dtype)
    ids = torch.randint(0, tcfg.vocab_size, (1, TEXT_TOKENS), generator=g).to(device)
    embed = model.get_input_embeddings()
    variants = {ALL: None, **{ratio_key(r): r for r in ratios}}
    keys = list(variants)
    n_visual: list[int] = []

    def vision() -> Tensor:  # (1, N, D) after the projector
        return torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))

    def prefill(embeds: Tensor) -> Tensor:
        return model(inputs_embeds=embeds, logits_to_keep=1, use_cache=True).logits

    def one_pass(i: int) -> dict[str, float]:
        t: dict[str, float] = {}
        visual, t["vision"] = timed(vision, device)  # (1, N, D)
        text, t["text"] = timed(partial(embed, ids), device)  # (1, T, D)
        before, question = text[:, :TEXT_BEFORE], text[:, TEXT_BEFORE:]
        n = visual.shape[1]
        pos = torch.arange(n, device=device)
        grid_pos = torch.stack([pos // side, pos % side], -1)[None]  # (1, N, 2)
        out, t["compressor"] = timed(partial(compressor, visual, grid_pos, None, question), device)
        n_visual[:] = [n]
        r = i % len(keys)
        for key in keys[r:] + keys[:r]:  # rotated so no variant always runs right after vision
            ratio = variants[key]
            k = n if ratio is None else keep_count(ratio, n)
            keep = None if ratio is None else select_topk(out.logits, k=k)  # (1, k)
            embeds, t[f"assemble/{key}"] = timed(
                partial(_assemble, before, visual, question, keep), device
            )
            _, t[f"prefill/{key}"] = timed(partial(prefill, embeds), device)
        return t

    s = collect(one_pass, repeats, warmup)
    shared = [v + x for v, x in zip(s["vision"], s["text"], strict=True)]
    e2e = {
        key: [
            a + b + c + (0.0 if key == ALL else d)
            for a, b, c, d in zip(
                shared, s[f"assemble/{key}"], s[f"prefill/{key}"], s["compressor"], strict=True
            )
        ]
        for key in keys
    }
    med = statistics.median
    n = n_visual[0]
    return {
        "prefill_speedup": {k: med(s[f"prefill/{ALL}"]) / med(s[f"prefill/{k}"]) for k in keys[1:]},
        "end_to_end_speedup": {k: med(e2e[ALL]) / med(e2e[k]) for k in keys[1:]},
        "speedup_of_minimums": {
            "prefill": {k: min(s[f"prefill/{ALL}"]) / min(s[f"prefill/{k}"]) for k in keys[1:]},
            "end_to_end": {k: min(e2e[ALL]) / min(e2e[k]) for k in keys[1:]},
        },
        "seconds": {
            "vision": summarize(s["vision"]),
            "text": summarize(s["text"]),
            "compressor": summarize(s["compressor"]),
            "assemble": {k: summarize(s[f"assemble/{k}"]) for k in keys},
            "prefill": {k: summarize(s[f"prefill/{k}"]) for k in keys},
            "end_to_end": {k: summarize(e2e[k]) for k in keys},
        },
        "tokens": {
            k: {
                "visual": (kv := n if r is None else keep_count(r, n)),
                "sequence": kv + TEXT_TOKENS,
            }
            for k, r in variants.items()
        },
        "compressor_params": sum(p.numel() for p in compressor.parameters()),
    }


def prefill_flops(seq: int, hidden: int, layers: int, ffn: int) -> int:
    """2 * params-per-token * L + 4 * layers * hidden * L^2 (LLaMA layer, multi-head attention).

    params-per-token = layers * (4 h^2 [q, k, v, o] + 3 h ffn [gate, up, down]); the attention
    term counts QK^T and AV (2 L^2 h each per layer) without the causal halving. Embedding lookup
    and the LM head (last token only with ``logits_to_keep=1``: 2 h vocab) are left out.
    """
    per_token = layers * (4 * hidden**2 + 3 * hidden * ffn)
    return 2 * per_token * seq + 4 * layers * hidden * seq**2


def flops_llava15_7b(ratios: list[float], visual: int = 576, text: int = 40) -> dict[str, Any]:
    """Analytic prefill FLOPs of LLaVA-1.5-7B (LLaMA-2-7B LM) at each keep ratio."""
    full = prefill_flops(visual + text, hidden=4096, layers=32, ffn=11008)
    out = {}
    for r in [1.0, *ratios]:
        k = keep_count(r, visual)
        f = prefill_flops(k + text, hidden=4096, layers=32, ffn=11008)
        out[ratio_key(r)] = {"flops": f, "ratio_to_full": f / full, "visual_tokens": k}
    return out


def reference_figures(path: Path, repeats: int, warmup: int, device, dtype) -> dict[str, Any]:
    """The same measurement (all vs 1/3) on the tiny reference LLaVA, for honesty."""
    if not (path / "config.json").is_file():
        return {"skipped": f"no reference checkpoint at {path} (`evocomp mllm train` builds it)"}
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    res = measure(model, [1 / 3], repeats, warmup)
    res["path"], res["params"] = str(path), sum(p.numel() for p in model.parameters())
    return res


def check_targets(res: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "ratio": TARGET_RATIO,
            "target": target,
            "value": (v := res[name][TARGET_RATIO]),
            "pass": v >= target,
        }
        for name, target in TARGETS.items()
        if TARGET_RATIO in res[name]
    }


def print_report(rep: dict[str, Any]) -> None:
    sec, m = rep["seconds"], rep["model"]
    print(f"\nEvoComp speedup: {m['name']}, {m['params'] / 1e6:.4g}M params, {rep['dtype']}")
    print(f"machine: {describe_machine(rep['machine'])}")
    print(f"vocab {m['shape']['vocab']}: {m['vocab_note']}")
    print(f"{rep['repeats']} repeats after {rep['warmup']} warmup pass(es); seconds median (min)\n")
    print(f"{'keep':>6} {'visual':>6} {'seq':>5} {'prefill s':>16} {'end-to-end s':>16} "
          f"{'prefill x':>9} {'e2e x':>7} {'7B FLOPs':>9}")  # fmt: skip
    for key, tok in rep["tokens"].items():
        p, e = sec["prefill"][key], sec["end_to_end"][key]
        px = rep["prefill_speedup"].get(key, 1.0)
        ex = rep["end_to_end_speedup"].get(key, 1.0)
        fl = rep["flops_llava15_7b"].get(key, {}).get("ratio_to_full", float("nan"))
        print(f"{key:>6} {tok['visual']:>6} {tok['sequence']:>5} "
              f"{p['median']:>8.3f} ({p['min']:.3f}) {e['median']:>8.3f} ({e['min']:.3f}) "
              f"{px:>8.2f}x {ex:>6.2f}x {fl:>9.3f}")  # fmt: skip
    print(f"stages (median s): vision+projector {sec['vision']['median']:.3f}, text embedding "
          f"{sec['text']['median']:.4f}, compressor {sec['compressor']['median']:.3f}")  # fmt: skip
    for name, t in rep["targets"].items():
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"target {name} @ keep {t['ratio']} >= {t['target']}x: {t['value']:.2f}x {verdict}")
    ref = rep["reference"]
    if "skipped" in ref:
        print(f"reference model: skipped, {ref['skipped']}")
    else:
        k, rs = TARGET_RATIO, ref["seconds"]
        print(f"reference model ({ref['path']}, {ref['params'] / 1e6:.2f}M params, "
              f"{ref['tokens'][ALL]['visual']} visual tokens) keep {k}: prefill "
              f"{rs['prefill'][ALL]['median'] * 1e3:.2f} -> {rs['prefill'][k]['median'] * 1e3:.2f} ms "
              f"({ref['prefill_speedup'][k]:.2f}x), end-to-end "
              f"{rs['end_to_end'][ALL]['median'] * 1e3:.2f} -> {rs['end_to_end'][k]['median'] * 1e3:.2f}"
              f" ms ({ref['end_to_end_speedup'][k]:.2f}x)")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=os.environ.get("EVOCOMP_DEVICE", "cpu"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed passes (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="keep ratios, comma-separated")
    p.add_argument("--quick", action="store_true", help="1 repeat: a smoke run, not a figure")
    p.add_argument("--vocab", type=int, help=f"LM vocabulary (default {QWEN2_VOCAB}, Qwen2's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reference", type=Path, default=REPO / "models" / "mllm")
    p.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_speedup.json")
    args = p.parse_args(argv)
    args.ratios = keep_ratios(p, args.ratios)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch")
    return args


def main(argv: list[str] | None = None, shape: Shape = Shape()) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns what was written."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine = machine_info(device)
    print(f"machine: {describe_machine(machine)}", flush=True)
    shape = replace(shape, vocab=args.vocab) if args.vocab else shape
    model, build_s = timed(partial(build_model, shape, device, dtype), device)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e6:.4g}M-param timing model in {build_s:.0f} s; timing...", flush=True)
    res = measure(model, args.ratios, args.repeats, args.warmup)
    del model
    gc.collect()
    vocab_note = (
        "Qwen2's full vocabulary"
        if shape.vocab == QWEN2_VOCAB
        else f"shrunk from {QWEN2_VOCAB}: only the embedding / LM-head size changes, and the "
        "LM head runs on the last token only"
    )
    report = {
        "prefill_speedup": res.pop("prefill_speedup"),
        "end_to_end_speedup": res.pop("end_to_end_speedup"),
        **res,
        "flops_llava15_7b": flops_llava15_7b(args.ratios),
        "flops_formula": "2 * params_per_token * L + 4 * layers * hidden * L^2, "
        "params_per_token = layers * (4 * hidden^2 + 3 * hidden * ffn), "
        "L = 40 text + kept of 576 visual tokens; LLaMA-2-7B: hidden 4096, 32 layers, ffn 11008",
        "reference": reference_figures(args.reference, args.repeats, args.warmup, device, dtype),
        "model": {
            "name": (
                "llava-interleave-qwen-0.5b shapes (SigLIP-so400m + Qwen2-0.5B)"
                if replace(shape, vocab=QWEN2_VOCAB) == Shape()
                else "custom shape (not llava-interleave-qwen-0.5b)"
            )
            + ", random weights",
            "shape": asdict(shape),
            "params": params,
            "build_seconds": build_s,
            "vocab_note": vocab_note,
        },
        "machine": machine,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "text_tokens": TEXT_TOKENS,
        "command": command_line(argv, __file__),
    }
    report["targets"] = check_targets(report)
    finish(report, args.out, start, print_report)
    return report


if __name__ == "__main__":
    main()
