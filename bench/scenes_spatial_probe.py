"""Do the scenes-vqa reference model's visual tokens hold what a spatial answer needs?

    .venv/bin/python bench/scenes_spatial_probe.py      # the committed model, ~1 min

A linear probe, not the LM: for each of the model's own training (and held-out) images, a
pair of objects of which one lies strictly left of (above) the other, in random order; the
features are the mean visual token of the first object and the mean token of the second (the
oracle pools each object's patches, which the LM would have to find by its description);
the target is "is the first left of (above) the second". A logistic regression on the
training images, scored on the held-out ones, per relation. Near 100%: the tokens carry the
answer and a model at chance on spatial questions fails at finding the two objects, not at
reading them (BENCHMARKS.md, scenes-vqa reference model). Tokens are cached as
``bench/scenes_lm_trials.py`` caches them (the same file).
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import REPO, begin, command_line, finish  # noqa: E402
from scenes_lm_trials import cached_tokens, check_model_and_cache  # noqa: E402

RELATIONS = {"left of": 0, "above": 1}  # footprint axis: 0 columns, 1 rows


def pairs(images, feats: torch.Tensor, rng: random.Random, axis: int):
    """(features (M, 2D), targets (M,)): one ordered pair per image that has one."""
    x, y = [], []
    for i, sc in enumerate(images):
        ordered = [
            (a, b)
            for a in sc.objects
            for b in sc.objects
            if a.footprint[axis] + a.footprint[axis + 2] <= b.footprint[axis]
        ]
        if not ordered:
            continue
        a, b = rng.choice(ordered)
        first, second, target = (a, b, 1.0) if rng.random() < 0.5 else (b, a, 0.0)
        x.append(torch.cat([feats[i, list(o.patches)].mean(0) for o in (first, second)]))
        y.append(target)
    return torch.stack(x), torch.tensor(y)


def probe(x, y, xv, yv, steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mu) / sd, (xv - mu) / sd
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(lin(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = {
            name: ((lin(a).squeeze(-1) > 0).float() == b).float().mean().item()
            for name, a, b in (("train", x, y), ("held_out", xv, yv))
        }
    return acc | {"train_pairs": len(y), "held_out_pairs": len(yv)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "scenes" / "mllm")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--cache", type=Path, help="token cache (default: .bench/, per model id)")
    p.add_argument("--out", type=Path, default=REPO / "metrics/scenes/lm_trials/spatial_probe.json")
    args = p.parse_args(argv)
    check_model_and_cache(p, args)
    start, machine = begin(args)
    from transformers import LlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(args.model)
    feats, val_feats, train, val = cached_tokens(ref, args.cache)
    rng = random.Random(args.seed)
    result = {}
    for relation, axis in RELATIONS.items():
        x, y = pairs(train, feats, rng, axis)
        xv, yv = pairs(val, val_feats, rng, axis)
        result[relation] = probe(x, y, xv, yv, args.steps, args.seed)
    report = {
        "relations": result,
        "model": str(args.model),
        "machine": machine,
        "command": command_line(argv, __file__),
    }

    def show(rep):
        for relation, r in rep["relations"].items():
            print(
                f"{relation}: held-out {r['held_out']:.3f} ({r['held_out_pairs']} pairs), "
                f"training {r['train']:.3f} ({r['train_pairs']} pairs)"
            )

    return finish(report, args.out, start, show)


if __name__ == "__main__":
    main()
