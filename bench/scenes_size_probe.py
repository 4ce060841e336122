"""How well the vision tower's tokens carry their object's size word: a linear probe fitted on
frozen tokens of 1500 training-like scenes, its per-object accuracy (mean logits over the
object's patches) on 500 fresh ones. argv: model dir | 'align:STEPS[:SIZEW]'."""

import random
import sys
import time

import torch
import torch.nn.functional as F

from evocomp.config import MLLMParams
from evocomp.data import scenes, scenes_qa
from evocomp.mllm import scenes_recipe, tiny_llava
from evocomp.mllm.recipe import pixels, visual

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
arg = sys.argv[1]


def scenes_of(seed, n):
    rng = random.Random(seed)
    out = [scenes.make_scene(rng, 12) for _ in range(n)]
    return [(scenes.render(s), s) for s in out]


if arg.startswith("align:"):
    parts = arg.split(":")
    steps = int(parts[1])
    vl = int(parts[2]) if len(parts) > 2 else 3
    params = MLLMParams(
        benchmark="scenes",
        grid=12,
        align_steps=steps,
        vision_layers=vl,
        vision_heads=4,
        lm_layers=3,
        lm_heads=4,
        align_batch_size=32,
    )
    tok = tiny_llava.build_tokenizer(scenes_qa.WORDS)
    model = tiny_llava.build_model(tok, 0, 192, 16, 4, 3, vl, 4)
    rng = random.Random(0)
    data = [(scenes.render(s), s) for s in (scenes.make_scene(rng, 12) for _ in range(4000))]
    t0 = time.time()
    scenes_recipe.align(model, tok, data, params, print)
    print(f"align {steps} steps: {time.time() - t0:.0f} s")
else:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(arg)
model.eval()


def feats(data):
    with torch.no_grad():
        return torch.cat(
            [
                visual(model, pixels([d[0] for d in data[i : i + 128]]))
                for i in range(0, len(data), 128)
            ]
        )


tr, te = scenes_of(30000, 1500), scenes_of(40000, 500)
ftr, fte = feats(tr), feats(te)
X, y = [], []
for (_, sc), f in zip(tr, ftr):
    for o in sc.objects:
        X.append(f[list(o.patches)])
        y += [scenes.SIZES.index(o.size)] * len(o.patches)
X, y = torch.cat(X), torch.tensor(y)
probe = torch.nn.Linear(X.shape[1], 3)
opt = torch.optim.LBFGS(probe.parameters(), max_iter=200)


def closure():
    opt.zero_grad()
    l = F.cross_entropy(probe(X), y)
    l.backward()
    return l


opt.step(closure)
hit_o = hit_p = n_o = n_p = 0
conf = torch.zeros(3, 3, dtype=torch.long)
with torch.no_grad():
    for (_, sc), f in zip(te, fte):
        for o in sc.objects:
            lg = probe(f[list(o.patches)])
            t = scenes.SIZES.index(o.size)
            hit_p += (lg.argmax(-1) == t).sum().item()
            n_p += len(o.patches)
            pred = lg.mean(0).argmax().item()
            hit_o += pred == t
            n_o += 1
            conf[t, pred] += 1
print(
    f"{arg}: size probe per-patch acc {hit_p / n_p:.3f}, per-object acc {hit_o / n_o:.3f} ({n_o} objects)"
)
print("confusion (rows truth small/medium/large):", conf.tolist())
