"""Mean ± standard error over training seeds (default 0-2) of a scenes trial's evaluations,
per method and keep ratio (the trial scripts' last step; BENCHMARKS.md quotes these rows).

  python metrics/scenes/trials/summary.py DIR NAME... [--suffix _val] [--methods a,b]
      [--seeds 0,1,2]

reads DIR/eval_NAME_SEED<suffix>.json (and DIR/train_NAME_SEED.json for the best epochs).
"""

import argparse
import json
import statistics as st
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("dir", type=Path)
p.add_argument("names", nargs="+")
p.add_argument("--suffix", default="")
p.add_argument("--methods", default="evocomp,evocomp_fill")
p.add_argument("--seeds", default="0,1,2")
a = p.parse_args()
seeds = [int(s) for s in a.seeds.split(",")]
for name in a.names:
    train = [a.dir / f"train_{name}_{s}.json" for s in seeds]
    epochs = [json.loads(t.read_text())["best_epoch"] for t in train if t.is_file()]
    for method in a.methods.split(","):
        row = []
        for r in ("0.111", "0.222", "0.333"):
            xs = [
                json.loads((a.dir / f"eval_{name}_{s}{a.suffix}.json").read_text())["ratios"][r][
                    method
                ]
                for s in seeds
            ]
            row.append(f"{st.mean(xs):.3f} ± {st.stdev(xs) / len(xs) ** 0.5:.3f}")
        print(name + a.suffix, method, " | ".join(row), f"(best epochs {epochs})" * bool(epochs))
