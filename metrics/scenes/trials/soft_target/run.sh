#!/usr/bin/env bash
# The scenes compressor on 3 training seeds x 2 soft targets (BENCHMARKS.md, scenes-vqa
# Compression): the elite's keep frequency (label set c47b74e4f8538c6d, scenes_label before
# soft_target: elimination) and the worth rank (188a06fdffcff32b, the committed one).
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`) and the DVC cache entry
# of the elite label set; writes train_<target>_<seed>.json and eval_<target>_<seed>.json
# here, the compressors under $WORK (default /tmp/soft_target).
#   bash metrics/scenes/trials/soft_target/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1
HERE=metrics/scenes/trials/soft_target
WORK=${WORK:-/tmp/soft_target}
mkdir -p "$WORK"
ELITE=$(git show 746fef9:dvc.lock | python -c "
import sys, yaml
d = yaml.safe_load(sys.stdin)
print([o for o in d['stages']['scenes_label']['outs'] if o['path'].endswith('labels.parquet')][0]['md5'])")
cp ".dvc/cache/files/md5/${ELITE:0:2}/${ELITE:2}" "$WORK/labels_elite.parquet"
cp data/scenes/labels/labels.parquet "$WORK/labels_elimination.parquet"
for s in 0 1 2; do
  python -c "
import yaml
d = yaml.safe_load(open('params.yaml'))
d['train']['seed'] = $s
d['evaluate']['methods'] = ['divprune', 'evocomp', 'evocomp_fill']
yaml.safe_dump(d, open('$WORK/params_$s.yaml', 'w'), sort_keys=False)"
done
for t in elite elimination; do for s in 0 1 2; do
  evocomp --profile scenes train --labels "$WORK/labels_$t.parquet" --features data/scenes/features \
    --model models/scenes/mllm --out "$WORK/comp_${t}_$s" --curve "$WORK/curve_${t}_$s.csv" \
    --metrics "$HERE/train_${t}_$s.json" --params "$WORK/params_$s.yaml"
  evocomp --profile scenes evaluate --data data/scenes/prepared --features data/scenes/features \
    --labels data/scenes/labels/labels.parquet --compressor "$WORK/comp_${t}_$s" \
    --model models/scenes/mllm --out "$HERE/eval_${t}_$s.json" --plots "$WORK/ret_${t}_$s.csv" \
    --params "$WORK/params_$s.yaml"
done; done
python - <<'PY'
import json, statistics as st
for t in ("elite", "elimination"):
    for m in ("evocomp", "evocomp_fill"):
        row = []
        for r in ("0.111", "0.222", "0.333"):
            xs = [json.load(open(f"metrics/scenes/trials/soft_target/eval_{t}_{s}.json"))["ratios"][r][m] for s in range(3)]
            row.append(f"{st.mean(xs):.3f} ± {st.stdev(xs) / 3 ** 0.5:.3f}")
        print(t, m, " | ".join(row))
PY
