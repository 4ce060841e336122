"""How the scenes compressor fits its labels, epoch by epoch (BENCHMARKS.md, scenes-vqa
Compression, "What limits the compressor"): the committed recipe's training loop (as
evocomp.compress.fit, without early stopping) with train.* overrides, and after every epoch
the validation BCE and precision at k plus what selection is for: the reference model's
answer loss and exact match with the compressor's top 16 on the validation split.
Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`).
  .venv/bin/python metrics/scenes/trials/fit/study.py ghm_cos '{"epochs": 20}'
  .venv/bin/python metrics/scenes/trials/fit/study.py bce '{"epochs": 20, "loss": "bce"}'
(the logs here: their stdout; the first field names the run).
The loop is written out rather than calling evocomp.compress.fit.fit_compressor because the
probe needs the model after every epoch, which fit_compressor neither exposes nor keeps (it
restores its best epoch)."""
import json
import os
import sys

import torch
from evocomp.config import load_params
from evocomp.mllm.loader import load_mllm
from evocomp.features.cache import FeatureStore
from evocomp.labelset import load_label_set
from evocomp.compress.training import items_from_labels
from evocomp.compress import fit as F
from evocomp.compress.model import CompressorConfig, TokenCompressor, select_topk
from evocomp.losses import compressor_loss
from evocomp.evaluation.answers import is_correct
from evocomp.mllm.checkpoint import checkpoint_info

torch.set_num_threads(2)
name, overrides = sys.argv[1], json.loads(sys.argv[2])
split = sys.argv[3] if len(sys.argv) > 3 else "val"
os.environ["EVOCOMP_PROFILE"] = "scenes"
params = load_params("params.yaml")
tp = params.train.model_copy(update=overrides)
mllm = load_mllm("models/scenes/mllm")
info = checkpoint_info(mllm.path, None)
df = load_label_set("data/scenes/labels/labels.parquet")
fs = FeatureStore("data/scenes/features", info["model_id"])
items = items_from_labels(df, fs)
rows = df[df.split == split].reset_index(drop=True)
ev_items = items[split]
K = 16
prompts = [mllm.encode(q, a) for q, a in zip(rows.question, rows.answer)]

def val_metrics(model):
    model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for s in range(0, len(ev_items), 64):
            ch = ev_items[s:s+64]
            b = F.collate(ch, False)
            lg = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask).logits
            kept = [select_topk(lg[i, : it.visual.shape[0]], k=K) for i, it in enumerate(ch)]
            for j, (it, kp) in enumerate(zip(ch, kept)):
                losses.append(float(mllm.subset_loss(prompts[s+j], it.visual, kp[None])[0]))
            ans = mllm.generate(list(rows.question[s:s+64]), [it.visual for it in ch], kept)
            hits += [is_correct(a, e) for a, e in zip(ans, rows.answer[s:s+64])]
    return sum(losses)/len(losses), sum(hits)/len(hits)

train, val = items["train"], items["val"]
dim = train[0].visual.shape[1]
cfg = CompressorConfig(dim=dim, layers=tp.layers, heads=tp.heads or info.get("heads"), ffn=info.get("ffn"), max_grid=12, use_text=tp.use_text)
torch.manual_seed(tp.seed); gen = torch.Generator().manual_seed(tp.seed)
model = TokenCompressor(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
crit = F.classification_loss(tp)
out = []
for epoch in range(1, tp.epochs + 1):
    model.train(); tot = 0
    order = torch.randperm(len(train), generator=gen).tolist()
    for s in range(0, len(order), tp.batch_size):
        ch = [train[i] for i in order[s:s+tp.batch_size]]
        b = F.collate(ch, tp.soft_labels)
        o = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
        loss, parts = compressor_loss(o.logits, b.target, o.hidden, b.visual_mask, crit, tp.cos_alpha)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        tot += parts["cls"] * len(ch)
    vl, vp = F._evaluate(model, val, tp, "cpu")
    al, acc = val_metrics(model)
    row = dict(epoch=epoch, train_cls=tot/len(train), val_bce=vl, val_prec=vp, ans_loss=al, acc=acc)
    out.append(row); print(name, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)

