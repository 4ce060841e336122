"""A fill that mixes relevance with a spread of the image (maximal marginal relevance)?
The committed scenes compressor keeps its top 16 (its labels' size), then fills to k one
token at a time by  lam * relevance + (1 - lam) * distance,  relevance = the token's
compressor-score rank scaled to [0, 1], distance = its cosine distance to the nearest kept
token (DivPrune's max-min criterion) scaled by the largest. lam = 0 is `evocomp_fill`
(DivPrune's fill), lam = 1 the compressor's top k. lam is chosen on the validation split
(117 samples) and reported on the test split (169), at keep 2/9 and 1/3, exact match of the
reference model's greedy answer, as `evocomp evaluate` scores it (prune layer 0).
  .venv/bin/python metrics/scenes/trials/mmr/probe.py > probe.log"""
import pandas as pd, torch
from evocomp.compress.model import keep_logits, load_compressor
from evocomp.evaluation.answers import is_correct
from evocomp.features.cache import FeatureStore
from evocomp.mllm.loader import load_mllm
from evocomp.tokens import keep_count

torch.set_num_threads(2)
mllm = load_mllm("models/scenes/mllm")
fs = FeatureStore("data/scenes/features", mllm.model_id)
comp, extra = load_compressor("models/scenes/compressor")
d = pd.read_parquet("data/scenes/prepared/samples.parquet")
LAMS = (0.0, 0.25, 0.5, 0.75, 1.0)


def mmr(logits, tokens, k, m, lam):
    n = logits.shape[0]
    order = logits.argsort(descending=True)
    rel = torch.empty(n)
    rel[order] = torch.linspace(1.0, 0.0, n)
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    dist = 1.0 - unit @ unit.T
    kept = order[:m].tolist()
    near = dist[:, kept].min(1).values
    while len(kept) < k:
        score = lam * rel + (1 - lam) * near / near.max().clamp_min(1e-12)
        score[kept] = -1e9
        t = int(score.argmax())
        kept.append(t)
        near = torch.minimum(near, dist[:, t])
    return torch.tensor(sorted(kept))


for split in ("val", "test"):
    rows = d[d.split == split]
    for ratio in ("0.222", "0.333"):
        acc = {}
        for lam in LAMS:
            qs, vis, kept, lays, exs, ans = [], [], [], [], [], []
            for r in rows.itertuples():
                f = fs.get(r.id)
                k = keep_count(float(ratio), f.tokens.shape[0])
                m = keep_count(extra["label_keep_ratio"], f.tokens.shape[0])
                lg = keep_logits(comp, f.tokens, f.cells, f.text)
                qs.append(r.question); vis.append(f.tokens); kept.append(mmr(lg, f.tokens, k, m, lam))
                lays.append(f.layout); exs.append(f.extra); ans.append(r.answer)
            out = []
            for i in range(0, len(qs), 32):
                out += mllm.generate(qs[i:i+32], vis[i:i+32], kept[i:i+32], max_new_tokens=8,
                                     layouts=lays[i:i+32], extras=exs[i:i+32])
            acc[lam] = sum(is_correct(o, a) for o, a in zip(out, ans)) / len(ans)
        print(split, ratio, {f"{lam:g}": round(a, 4) for lam, a in acc.items()}, flush=True)
