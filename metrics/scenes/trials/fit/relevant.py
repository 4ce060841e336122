"""How much of the answer's recorded `relevant` patches does each larger selection hold? On
the validation and test splits (samples with relevant patches), per question type, the mean
share of them among the compressor's top k, its top 16 + DivPrune fill (`evocomp_fill`) and
DivPrune's k, at k = 32 and 48 (keep 2/9 and 1/3).
  .venv/bin/python metrics/scenes/trials/fit/relevant.py > relevant.log"""
import json, collections, torch, pandas as pd
from evocomp.compress.model import load_compressor, select_topk, select_topk_filled
from evocomp.features.cache import FeatureStore
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.baselines import select
torch.set_num_threads(1)
info = checkpoint_info("models/scenes/mllm", None)
fs = FeatureStore("data/scenes/features", info["model_id"])
comp, _ = load_compressor("models/scenes/compressor")
d = pd.read_parquet("data/scenes/prepared/samples.parquet"); d = d[d.split != "train"]
st = collections.defaultdict(collections.Counter)
for r in d.itertuples():
    m = json.loads(r.meta); rel = set(m["relevant"]); q = m["qtype"]
    f = fs.get(r.id)
    with torch.no_grad():
        lg = comp(f.tokens[None], f.cells[None], None, f.text[None]).logits[0]
    if not rel: continue
    st[q]["n"] += 1
    for k in (32, 48):
        sets = {"top": select_topk(lg, k=k), "fill": select_topk_filled(lg, f.tokens, k, 1/9), "div": select("divprune", k, tokens=f.tokens)}
        for name, S in sets.items():
            S = set(S.tolist())
            st[q][f"{name}{k}"] += len(S & rel) / len(rel)
print({q: {k: round(v / c["n"], 3) for k, v in c.items() if k != "n"} | {"n": c["n"]} for q, c in sorted(st.items())})
