#!/usr/bin/env bash
# How the scenes compressor's accuracy grows with its training labels (BENCHMARKS.md,
# scenes-vqa Compression): the committed label set's train split cut to 1/4 and 1/2
# (the first samples by sample_id; val and test untouched), 3 training seeds each; the full
# split's 3 seeds are metrics/scenes/trials/soft_target/eval_elite_S.json.
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes
# train_<frac>_<seed>.json and eval_<frac>_<seed>.json here, compressors under $WORK.
#   bash metrics/scenes/trials/data_size/run.sh
source "$(dirname "$0")/../lib.sh"
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
  trial_params "$WORK/params_$s.yaml" $s "" evocomp,evocomp_fill
done
for f in ${FRACS:-0.25 0.5}; do for s in 0 1 2; do
  train_eval "${f}_$s" "$WORK/labels_$f.parquet" "$WORK/params_$s.yaml" $HERE "$WORK"
done; done
# the 1/4 split's seed 0 (which kept its chance-level first epoch) early-stopped on
# validation precision instead
trial_params "$WORK/params_precision_0.yaml" 0 "monitor='precision'" evocomp,evocomp_fill
train_eval 0.25_precision_0 "$WORK/labels_0.25.parquet" "$WORK/params_precision_0.yaml" $HERE "$WORK"
python metrics/scenes/trials/summary.py metrics/scenes/trials/data_size 0.25 0.5
python metrics/scenes/trials/summary.py metrics/scenes/trials/soft_target elite  # all 914
