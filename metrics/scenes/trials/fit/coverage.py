"""Does the scenes compressor keep the tokens the answer needs? Per question type, on the
test split: the share of samples whose every needed object (one holding a patch of the
sample's recorded `relevant` patches) has its anchor (first patch) / any patch among the
compressor's top 16, DivPrune's 16 and the GA label's 16.
  .venv/bin/python metrics/scenes/trials/fit/coverage.py > coverage.log"""
import json, collections, torch, pandas as pd
from evocomp.compress.model import load_compressor, select_topk
from evocomp.features.cache import FeatureStore
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.baselines import select
torch.set_num_threads(1)
info = checkpoint_info("models/scenes/mllm", None)
fs = FeatureStore("data/scenes/features", info["model_id"])
comp, _ = load_compressor("models/scenes/compressor")
d = pd.read_parquet("data/scenes/prepared/samples.parquet"); d = d[d.split == "test"]
lab = pd.read_parquet("data/scenes/labels/labels.parquet").set_index("sample_id")
stats = collections.defaultdict(lambda: collections.Counter())
for r in d.itertuples():
    m = json.loads(r.meta); rel = set(m["relevant"])
    need = [o for o in m["objects"] if rel & set(o["patches"])]
    f = fs.get(r.id)
    with torch.no_grad():
        lg = comp(f.tokens[None], f.cells[None], None, f.text[None]).logits[0]
    sets = {"evocomp": set(select_topk(lg, k=16).tolist()),
            "label": set(lab.loc[r.id].kept.tolist())}
    sets["divprune"] = set(select("divprune", 16, tokens=f.tokens).tolist())
    q = m["qtype"]; stats[q]["n"] += 1
    for name, S in sets.items():
        stats[q][name + "_anchor"] += all(min(o["patches"]) in S for o in need)
        stats[q][name + "_any"] += all(S & set(o["patches"]) for o in need)
for q, c in sorted(stats.items()):
    n = c["n"]; print(q, n, " ".join(f"{k}:{v/n:.2f}" for k, v in sorted(c.items()) if k != "n"))
