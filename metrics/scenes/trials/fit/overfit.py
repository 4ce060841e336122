"""Can the scenes compressor fit its own training labels? Full-batch plain BCE on the first
N train samples of the committed label set (soft targets), no cosine term, 300 steps.
  .venv/bin/python metrics/scenes/trials/fit/overfit.py 64 0.001 > overfit_64.log
(SCALE=40 multiplies the visual and text features first: no faster, measured.)"""
import os, sys, json, torch
os.environ["EVOCOMP_PROFILE"] = "scenes"
from evocomp.config import load_params
from evocomp.features.cache import FeatureStore
from evocomp.labelset import load_label_set
from evocomp.compress.training import items_from_labels
from evocomp.compress import fit as F
from evocomp.compress.model import CompressorConfig, TokenCompressor
from evocomp.losses import compressor_loss
from evocomp.mllm.checkpoint import checkpoint_info
torch.set_num_threads(1)
info = checkpoint_info("models/scenes/mllm", None)
df = load_label_set("data/scenes/labels/labels.parquet")
items = items_from_labels(df, FeatureStore("data/scenes/features", info["model_id"]))
tr = items["train"][: int(sys.argv[1])]
lr = float(sys.argv[2]); width = int(sys.argv[3]) if len(sys.argv) > 3 else None
it = tr[0]; print("D", it.visual.shape, "vis norm", it.visual.norm(dim=-1).mean().item(), "text norm", it.text.norm(dim=-1).mean().item(), "heads", info.get("heads"), info.get("ffn"))
cfg = CompressorConfig(dim=it.visual.shape[1], width=width, heads=info.get("heads"), ffn=info.get("ffn") if width is None else None, max_grid=12)
torch.manual_seed(0)
m = TokenCompressor(cfg); print("params", sum(p.numel() for p in m.parameters()))
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
b = F.collate(tr, True); S = float(os.environ.get("SCALE", 1)); b = b._replace(visual=b.visual * S, text=b.text * S)
for step in range(301):
    o = m(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
    loss, parts = compressor_loss(o.logits, b.target, o.hidden, b.visual_mask, None, 0.0)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0: print(step, round(parts["cls"], 4), flush=True)
