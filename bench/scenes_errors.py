"""Where a scenes reference model errs: all-token accuracy on a fresh set, by question detail
(size word in the phrase or not, the count, the relation and its answer).

    .venv/bin/python bench/scenes_errors.py models/scenes/mllm 1200
"""

import collections
import sys
import tempfile

from evocomp.data.readers import read_dataset
from evocomp.data.synth import write_dataset
from evocomp.evaluation.answers import is_correct
from evocomp.mllm.loader import load_mllm

SIZE_WORDS = ("small", "medium", "large")


def keys(question: str, qtype: str, answer: str) -> list[str]:
    out = [qtype]
    if qtype in ("colour", "shape", "spatial"):
        sized = any(w in question.split() for w in SIZE_WORDS)
        out.append(qtype + (" +size" if sized else " nosize"))
    if qtype == "count":
        out.append(f"count ans={answer}")
    if qtype == "spatial":
        out.append("spatial " + ("left" if "left" in question else "above") + " ans=" + answer)
    if qtype == "exists":
        out.append("exists ans=" + answer)
    return out


def main(model: str, n: int) -> None:
    stats = collections.defaultdict(lambda: [0, 0])
    with tempfile.TemporaryDirectory() as tmp:
        samples = read_dataset(write_dataset(tmp, n, 20000, benchmark="scenes", grid=12))
        mllm = load_mllm(model, "cpu", "float32")
        for st in range(0, len(samples), 128):
            chunk = samples[st : st + 128]
            vis = mllm.visual_tokens([s.load_image() for s in chunk])
            qs = [s.question for s in chunk]
            answers = mllm.generate(qs, list(vis), [None] * len(chunk), max_new_tokens=4)
            for s, a in zip(chunk, answers, strict=True):
                for k in keys(s.question, s.meta.get("qtype"), s.answer):
                    stats[k][0] += is_correct(a, s.answer)
                    stats[k][1] += 1
    for k in sorted(stats):
        hit, m = stats[k]
        print(f"{k:24s} {hit / m:.3f}  ({m})")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "models/scenes/mllm", int(args[1]) if len(args) > 1 else 1200)
