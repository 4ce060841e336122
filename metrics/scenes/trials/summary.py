"""Mean ± standard error over training seeds (default 0-2) of a scenes trial's evaluations,
per method and keep ratio (the trial scripts' last step; BENCHMARKS.md quotes these rows).

  python metrics/scenes/trials/summary.py DIR NAME... [--suffix _val] [--methods a,b]
      [--seeds 0,1,2] [--restarts N]

reads DIR/eval_NAME_SEED<suffix>.json (and DIR/train_NAME_SEED.json for the best epochs).
--restarts N: also what train.restarts N keeps from each N consecutive seeds (the one of
lowest val_answer_loss in its train JSON, the lower seed on ties) and that run's accuracies.
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
p.add_argument("--restarts", type=int, default=0)
a = p.parse_args()
seeds = [int(s) for s in a.seeds.split(",")]
RATIOS = ("0.111", "0.222", "0.333")


def acc(name, seed, ratio, method):
    path = a.dir / f"eval_{name}_{seed}{a.suffix}.json"
    return json.loads(path.read_text())["ratios"][ratio][method]


for name in a.names:
    train = {s: a.dir / f"train_{name}_{s}.json" for s in seeds}
    runs = {s: json.loads(t.read_text()) for s, t in train.items() if t.is_file()}
    epochs = [r["best_epoch"] for r in runs.values()]
    for method in a.methods.split(","):
        row = []
        for r in RATIOS:
            xs = [acc(name, s, r, method) for s in seeds]
            row.append(f"{st.mean(xs):.3f} ± {st.stdev(xs) / len(xs) ** 0.5:.3f}")
        print(name + a.suffix, method, " | ".join(row), f"(best epochs {epochs})" * bool(epochs))
    if a.restarts:
        for g in range(0, len(seeds) - a.restarts + 1, a.restarts):
            group = seeds[g : g + a.restarts]
            pick = min(group, key=lambda s: (runs[s]["val_answer_loss"], s))
            losses = {s: runs[s]["val_answer_loss"] for s in group}
            for method in a.methods.split(","):
                accs = " | ".join(f"{acc(name, pick, r, method):.3f}" for r in RATIOS)
                print(
                    f"{name}{a.suffix} restarts {group} -> seed {pick} {method} {accs}",
                    f"(val answer losses {losses})",
                )
