#!/usr/bin/env bash
# The scenes label objective (BENCHMARKS.md, scenes-vqa Compression): the 1200 samples
# labelled again with `label.objective: distill` (KL divergence from the all-token answer
# distribution, the paper's search otherwise unchanged: budget 16 of 144, 48 / 12 / 10),
# then the compressor trained on them with 3 training seeds and evaluated on the validation
# split (as a test split of its own) and on the test split. The answer objective's rows are
# the committed label set's, from the monitor trial (`monitor: loss`, the same recipe).
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes labels_distill.json,
# train_distill_<seed>.json and eval_distill_<seed>_<split>.json here, the rest under $WORK
# (default /tmp/objective).
#   bash metrics/scenes/trials/objective/run.sh
source "$(dirname "$0")/../lib.sh"
HERE=metrics/scenes/trials/objective
WORK=${WORK:-/tmp/objective}
mkdir -p "$WORK"
evocomp --profile scenes label --objective distill --data data/scenes/prepared \
  --features data/scenes/features --db-url "sqlite:///$WORK/store.db" \
  --out "$WORK/labels_distill.parquet" --metrics "$HERE/labels_distill.json"
val_as_test "$WORK/val_as_test"
for s in ${SEEDS:-0 1 2}; do
  trial_params "$WORK/params_$s.yaml" "$s" "" divprune,evocomp,evocomp_fill
  train_eval "distill_$s" "$WORK/labels_distill.parquet" "$WORK/params_$s.yaml" $HERE "$WORK" \
    "$WORK/val_as_test:_val" data/scenes/prepared:_test
done
