"""How well a scenes vision tower's tokens carry their object's size word: a linear probe
fitted (LBFGS) on frozen tokens of 1500 scenes, scored per object (mean logits over its
patches) on 500 fresh ones, with the confusion matrix.

    .venv/bin/python bench/scenes_size_probe.py models/scenes/mllm
    .venv/bin/python bench/scenes_size_probe.py align:1500:3   # align a fresh tower: steps, layers
"""

import random
import sys
import time

import torch
import torch.nn.functional as F

from evocomp.config import MLLMParams
from evocomp.data import scenes, scenes_qa
from evocomp.mllm import scenes_recipe, tiny_llava
from evocomp.mllm.recipe import pixels, visual


def scenes_of(seed: int, n: int):
    rng = random.Random(seed)
    return [(scenes.render(s), s) for s in (scenes.make_scene(rng, 12) for _ in range(n))]


def tower(arg: str):
    if not arg.startswith("align:"):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(arg)
    parts = arg.split(":")
    steps, layers = int(parts[1]), int(parts[2]) if len(parts) > 2 else 3
    params = MLLMParams(
        benchmark="scenes", grid=12, align_steps=steps, vision_layers=layers, vision_heads=4,
        lm_layers=3, lm_heads=4, align_batch_size=32,
    )  # fmt: skip
    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    model = tiny_llava.build_model(tok, 0, 192, 16, 4, 3, layers, 4)
    t0 = time.time()
    scenes_recipe.align(model, tok, scenes_of(0, 4000), params, print)
    print(f"align {steps} steps, {layers} layers: {time.time() - t0:.0f} s")
    return model


def main(arg: str) -> None:
    model = tower(arg).eval()

    def feats(data):
        with torch.no_grad():
            return torch.cat(
                [
                    visual(model, pixels([d[0] for d in data[i : i + 128]]))
                    for i in range(0, len(data), 128)
                ]
            )

    tr, te = scenes_of(30000, 1500), scenes_of(40000, 500)
    xs, ys = [], []
    for (_, sc), f in zip(tr, feats(tr), strict=True):
        for o in sc.objects:
            xs.append(f[list(o.patches)])
            ys += [scenes.SIZES.index(o.size)] * len(o.patches)
    x, y = torch.cat(xs), torch.tensor(ys)
    probe = torch.nn.Linear(x.shape[1], 3)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    hits = total = 0
    conf = torch.zeros(3, 3, dtype=torch.long)
    with torch.no_grad():
        for (_, sc), f in zip(te, feats(te), strict=True):
            for o in sc.objects:
                pred = probe(f[list(o.patches)]).mean(0).argmax().item()
                truth = scenes.SIZES.index(o.size)
                hits += pred == truth
                total += 1
                conf[truth, pred] += 1
    print(f"{arg}: size probe per-object accuracy {hits / total:.3f} ({total} objects)")
    print("confusion (rows: truth small / medium / large):", conf.tolist())


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1] if len(sys.argv) > 1 else "models/scenes/mllm")
