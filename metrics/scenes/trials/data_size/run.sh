#!/usr/bin/env bash
# How the scenes compressor's accuracy grows with its training labels (BENCHMARKS.md,
# scenes-vqa Compression): the committed label set's train split cut to 1/4 and 1/2
# (the first samples by sample_id; val and test untouched), 3 training seeds each; the full
# split's 3 seeds are metrics/scenes/trials/soft_target/eval_elite_S.json.
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes
# train_<frac>_<seed>.json and eval_<frac>_<seed>.json here, compressors under $WORK.
#   bash metrics/scenes/trials/data_size/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1
HERE=metrics/scenes/trials/data_size
WORK=${WORK:-/tmp/data_size}
mkdir -p "$WORK"
for f in 0.25 0.5; do
  python -c "
import pandas as pd
d = pd.read_parquet('data/scenes/labels/labels.parquet')
tr = d[d.split == 'train'].sort_values('sample_id')
keep = set(tr.sample_id[: round(len(tr) * $f)]) | set(d.sample_id[d.split != 'train'])
d[d.sample_id.isin(keep)].to_parquet('$WORK/labels_$f.parquet')"
done
for s in 0 1 2; do
  python -c "
import yaml
d = yaml.safe_load(open('params.yaml'))
d['train']['seed'] = $s
d['evaluate']['methods'] = ['evocomp', 'evocomp_fill']
yaml.safe_dump(d, open('$WORK/params_$s.yaml', 'w'), sort_keys=False)"
done
for f in ${FRACS:-0.25 0.5}; do for s in 0 1 2; do
  evocomp --profile scenes train --labels "$WORK/labels_$f.parquet" --features data/scenes/features \
    --model models/scenes/mllm --out "$WORK/comp_${f}_$s" --curve "$WORK/curve_${f}_$s.csv" \
    --metrics "$HERE/train_${f}_$s.json" --params "$WORK/params_$s.yaml"
  evocomp --profile scenes evaluate --data data/scenes/prepared --features data/scenes/features \
    --labels data/scenes/labels/labels.parquet --compressor "$WORK/comp_${f}_$s" \
    --model models/scenes/mllm --out "$HERE/eval_${f}_$s.json" --plots "$WORK/ret_${f}_$s.csv" \
    --params "$WORK/params_$s.yaml"
done; done
python - <<'PY'
import json, statistics as st
runs = {f: f"metrics/scenes/trials/data_size/eval_{f}_{{s}}.json" for f in ("0.25", "0.5")}
runs["1.0"] = "metrics/scenes/trials/soft_target/eval_elite_{s}.json"
for f, pat in runs.items():
    for m in ("evocomp", "evocomp_fill"):
        row = []
        for r in ("0.111", "0.222", "0.333"):
            xs = [json.load(open(pat.format(s=s)))["ratios"][r][m] for s in range(3)]
            row.append(f"{st.mean(xs):.3f} ± {st.stdev(xs) / 3 ** 0.5:.3f}")
        print(f, m, " | ".join(row))
PY
