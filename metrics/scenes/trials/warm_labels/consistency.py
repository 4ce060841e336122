"""How close are the warm-started labels to the compressor's own pick? Over the 1200 scenes
samples: the share of the compressor's top 16 that the cold (committed) and the warm label
keep, their overlap, their mean answer losses, and how many warm labels are the pick itself.
Needs `bash metrics/scenes/trials/warm_labels/run.sh` first ($WORK, default /tmp/warm_labels).
  .venv/bin/python metrics/scenes/trials/warm_labels/consistency.py > consistency.log"""
import os
import pandas as pd, torch
from evocomp.compress.model import load_compressor, keep_logits, select_topk
from evocomp.features.cache import FeatureStore
from evocomp.mllm.checkpoint import checkpoint_info
a = pd.read_parquet("data/scenes/labels/labels.parquet").set_index("sample_id")
b = pd.read_parquet(os.environ.get("WORK", "/tmp/warm_labels") + "/labels_warm.parquet").set_index("sample_id")
fs = FeatureStore("data/scenes/features", checkpoint_info("models/scenes/mllm")["model_id"])
comp, _ = load_compressor("models/scenes/compressor")
same = {"cold": 0, "warm": 0}; ov = 0
for i in b.index:
    f = fs.get(i)
    pick = set(select_topk(keep_logits(comp, f.tokens, f.cells, f.text), k=16).tolist())
    for n, d in (("cold", a), ("warm", b)):
        same[n] += len(pick & set(d.kept[i])) / 16
    ov += len(set(a.kept[i]) & set(b.kept[i])) / 16
print({n: round(v / len(b), 3) for n, v in same.items()}, "cold-warm overlap", round(ov / len(b), 3),
      "loss cold/warm", round(a.loss.mean(), 4), round(b.loss.mean(), 4),
      "warm label == compressor pick:", sum(set(b.kept[i]) == set(select_topk(keep_logits(comp, fs.get(i).tokens, fs.get(i).cells, fs.get(i).text), k=16).tolist()) for i in b.index))
