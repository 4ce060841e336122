"""Labels of a random candidate of each sample's search space (no search) at keep ratio R,
for the same samples as the pipeline's label set at R: the ablation's `random_in_group`
variant on the pipeline's own data, so the per-ratio compressor can be trained on it.

  .venv/bin/python metrics/scenes/trials/random_labels/make.py 0.333 OUT.parquet

Each row is the pipeline's row with `kept` replaced by the random candidate (the same k,
within the same group quotas), `soft` by its 0/1 indicator and `loss` by its answer loss."""

import os
import random
import sys

os.environ.setdefault("EVOCOMP_PROFILE", "scenes")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from evocomp.config import load_params  # noqa: E402
from evocomp.data.samples import sample_seed  # noqa: E402
from evocomp.features.cache import FeatureStore  # noqa: E402
from evocomp.mllm.checkpoint import checkpoint_info  # noqa: E402
from evocomp.mllm.loader import load_mllm  # noqa: E402
from evocomp.search import SearchSpace  # noqa: E402
from evocomp.search.operators import repair  # noqa: E402

ratio, out = float(sys.argv[1]), sys.argv[2]
torch.set_num_threads(2)
params = load_params(None).label.search().model_copy(update={"keep_ratio": ratio})
mllm = load_mllm("models/scenes/mllm")
fs = FeatureStore("data/scenes/features", checkpoint_info("models/scenes/mllm")["model_id"])
df = pd.read_parquet(f"data/scenes/labels/labels_{ratio}.parquet")
kept, soft, loss = [], [], []
for r in df.itertuples(index=False):
    f = fs.get(r.sample_id)
    space = SearchSpace.build(f.nearest, None, params)
    cand = sorted(repair((), space, random.Random(sample_seed(params.seed, r.sample_id))))
    assert len(cand) == r.k, (r.sample_id, len(cand), r.k)
    prompt = mllm.encode(r.question, r.answer)
    lo = mllm.subset_loss(prompt, f.tokens, torch.tensor([cand]), f.layout, f.extra)
    kept.append(cand)
    soft.append([float(t in set(cand)) for t in range(int(r.n_tokens))])
    loss.append(round(float(lo[0]), 5))
df = df.assign(kept=kept, soft=soft, loss=loss)
df.to_parquet(out)
print(f"{out}: {len(df)} random candidates at {ratio}, mean loss {df['loss'].mean():.4f}")
