"""What the reference model makes of the tokens kept beside the needed ones, on the
validation and test samples of three question types: exact match with all tokens, the
compressor's top 16, the needed objects' anchors plus 14 random background tokens, the
anchors plus the needed objects' other patches then background (16), the anchors alone,
and the GA label.
  .venv/bin/python metrics/scenes/trials/fit/filler.py > filler.log"""
import json, random, torch, pandas as pd
from evocomp.compress.model import load_compressor, select_topk
from evocomp.features.cache import FeatureStore
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.mllm.loader import load_mllm
from evocomp.evaluation.answers import is_correct
torch.set_num_threads(1)
mllm = load_mllm("models/scenes/mllm")
info = checkpoint_info("models/scenes/mllm", None)
fs = FeatureStore("data/scenes/features", info["model_id"])
comp, _ = load_compressor("models/scenes/compressor")
d = pd.read_parquet("data/scenes/prepared/samples.parquet")
d = d[(d.split != "train")]
lab = pd.read_parquet("data/scenes/labels/labels.parquet").set_index("sample_id")
rng = random.Random(0)
for qt in ("spatial", "exists", "count"):
    s = d[d.meta.str.contains(f'"qtype": "{qt}"')]
    res = {}
    rows = {k: [] for k in ("all", "evocomp16", "anchors+bg14", "anchors+objects", "anchors_only", "label")}
    for r in s.itertuples():
        m = json.loads(r.meta); rel = set(m["relevant"])
        need = [o for o in m["objects"] if rel & set(o["patches"])]
        anchors = sorted({min(o["patches"]) for o in need})
        objp = {p for o in m["objects"] for p in o["patches"]}
        f = fs.get(r.id)
        with torch.no_grad():
            lg = comp(f.tokens[None], f.cells[None], None, f.text[None]).logits[0]
        ev = select_topk(lg, k=16)
        bg = [p for p in range(144) if p not in objp]
        fill = rng.sample(bg, max(0, 16 - len(anchors)))
        others = [p for o in need for p in sorted(o["patches"]) if p not in anchors]
        ao = (anchors + others + [p for p in bg])[:max(16, len(anchors))]
        sets = {"all": None, "evocomp16": ev, "anchors+bg14": torch.tensor(sorted(anchors + fill)),
                "anchors+objects": torch.tensor(sorted(ao)), "anchors_only": torch.tensor(anchors) if anchors else torch.tensor([0]),
                "label": torch.tensor(sorted(lab.loc[r.id].kept.tolist()))}
        for k, kept in sets.items():
            a = mllm.generate([r.question], [f.tokens], [kept])[0]
            rows[k].append(is_correct(a, r.answer))
    print(qt, len(s), " ".join(f"{k}:{sum(v)/len(v):.2f}" for k, v in rows.items()), flush=True)
