"""Per-question-detail accuracy of a scenes reference model, all tokens: .venv/bin/python bench/scenes_errors.py MODEL_DIR N."""

"""Where the scenes reference model errs: full-token answers on a fresh set, by question detail."""
import collections
import sys
import tempfile

import torch

torch.set_num_threads(1)
from evocomp.data.readers import read_dataset
from evocomp.data.synth import write_dataset
from evocomp.evaluation.answers import is_correct
from evocomp.mllm.loader import load_mllm

model, n = sys.argv[1], int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    samples = read_dataset(write_dataset(tmp, n, 20000, benchmark="scenes", grid=12))
    mllm = load_mllm(model, "cpu", "float32")
    stats = collections.defaultdict(lambda: [0, 0])
    for st in range(0, len(samples), 128):
        ch = samples[st : st + 128]
        vis = mllm.visual_tokens([s.load_image() for s in ch])
        ans = mllm.generate([s.question for s in ch], list(vis), [None] * len(ch), max_new_tokens=4)
        for s, a in zip(ch, ans):
            q, t = s.question, s.meta.get("qtype")
            ok = is_correct(a, s.answer)
            keys = [t]
            if t in ("colour", "shape", "spatial"):
                keys.append(
                    t
                    + (
                        " +size"
                        if any(w in q.split() for w in ("small", "medium", "large"))
                        else " nosize"
                    )
                )
            if t == "count":
                keys.append(f"count ans={s.answer}")
            if t == "spatial":
                keys.append("spatial " + ("left" if "left" in q else "above") + " ans=" + s.answer)
            if t == "exists":
                keys.append("exists ans=" + s.answer)
            for k in keys:
                stats[k][0] += ok
                stats[k][1] += 1
    for k in sorted(stats):
        h, m = stats[k]
        print(f"{k:24s} {h / m:.3f}  ({m})")
