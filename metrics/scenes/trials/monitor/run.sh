#!/usr/bin/env bash
# Which epoch early stopping keeps (BENCHMARKS.md, scenes-vqa Compression): the scenes
# compressor trained with train.monitor loss (validation BCE against the soft targets) and
# precision (validation top-k precision at the label's k), 3 training seeds each, evaluated
# on the validation split (as a test split of its own) and on the test split.
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes
# train_<monitor>_<seed>.json, eval_<monitor>_<seed>_<split>.json here, the rest under $WORK.
#   bash metrics/scenes/trials/monitor/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1
HERE=metrics/scenes/trials/monitor
WORK=${WORK:-/tmp/monitor}
mkdir -p "$WORK/val_as_test"
python -c "
import json, pandas as pd
d = pd.read_parquet('data/scenes/prepared/samples.parquet')
v = d[d.split == 'val'].assign(split='test')
v.to_parquet('$WORK/val_as_test/samples.parquet')
m = json.load(open('data/scenes/prepared/manifest.json'))
m.update(samples=len(v), splits={'test': len(v)})
json.dump(m, open('$WORK/val_as_test/manifest.json', 'w'))"
for run in ${RUNS:-loss:0 loss:1 loss:2 precision:0 precision:1 precision:2}; do
  m=${run%:*} s=${run#*:}
  python -c "
import yaml
d = yaml.safe_load(open('params.yaml'))
d['train'].update(seed=$s, monitor='$m')
d['profiles']['scenes'].setdefault('train', {}).pop('monitor', None)
d['evaluate']['methods'] = ['evocomp', 'evocomp_fill']
yaml.safe_dump(d, open('$WORK/params_${m}_$s.yaml', 'w'), sort_keys=False)"
  evocomp --profile scenes train --labels data/scenes/labels/labels.parquet --features data/scenes/features \
    --model models/scenes/mllm --out "$WORK/comp_${m}_$s" --curve "$WORK/curve_${m}_$s.csv" \
    --metrics "$HERE/train_${m}_$s.json" --params "$WORK/params_${m}_$s.yaml"
  for split in val test; do
    data=data/scenes/prepared; [ $split = val ] && data=$WORK/val_as_test
    evocomp --profile scenes evaluate --data $data --features data/scenes/features \
      --labels data/scenes/labels/labels.parquet --compressor "$WORK/comp_${m}_$s" \
      --model models/scenes/mllm --out "$HERE/eval_${m}_${s}_$split.json" \
      --plots "$WORK/ret_${m}_${s}_$split.csv" --params "$WORK/params_${m}_$s.yaml"
  done
done
python - <<'PY'
import json, statistics as st
H = "metrics/scenes/trials/monitor"
for m in ("loss", "precision"):
    ep = [json.load(open(f"{H}/train_{m}_{s}.json"))["best_epoch"] for s in range(3)]
    for split in ("val", "test"):
        for meth in ("evocomp", "evocomp_fill"):
            row = []
            for r in ("0.111", "0.222", "0.333"):
                xs = [json.load(open(f"{H}/eval_{m}_{s}_{split}.json"))["ratios"][r][meth] for s in range(3)]
                row.append(f"{st.mean(xs):.3f} ± {st.stdev(xs) / 3 ** 0.5:.3f}")
            print(m, "best epochs", ep, split, meth, " | ".join(row))
PY
