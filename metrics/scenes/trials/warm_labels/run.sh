#!/usr/bin/env bash
# One round of self-training (BENCHMARKS.md, scenes-vqa Compression): the 1200 samples
# labelled again with the search warm-started from the committed compressor
# (`label.warm_start`: its top 16 join each sample's first generation; everything else as
# the pipeline's labels), then a compressor trained on those labels with 3 training seeds
# and evaluated on the validation split (as a test split of its own) and on the test split.
# The cold rows are the committed label set's, from the monitor trial (`monitor: loss`).
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes labels_warm.json,
# train_warm_<seed>.json and eval_warm_<seed>_<split>.json here, the rest under $WORK
# (default /tmp/warm_labels).
#   bash metrics/scenes/trials/warm_labels/run.sh
source "$(dirname "$0")/../lib.sh"
HERE=metrics/scenes/trials/warm_labels
WORK=${WORK:-/tmp/warm_labels}
mkdir -p "$WORK"
evocomp --profile scenes label --warm-start models/scenes/compressor --data data/scenes/prepared \
  --features data/scenes/features --db-url "sqlite:///$WORK/store.db" \
  --out "$WORK/labels_warm.parquet" --metrics "$HERE/labels_warm.json"
val_as_test "$WORK/val_as_test"
for s in ${SEEDS:-0 1 2}; do
  trial_params "$WORK/params_$s.yaml" "$s" "" evocomp,evocomp_fill
  train_eval "warm_$s" "$WORK/labels_warm.parquet" "$WORK/params_$s.yaml" $HERE "$WORK" \
    "$WORK/val_as_test:_val" data/scenes/prepared:_test
done
