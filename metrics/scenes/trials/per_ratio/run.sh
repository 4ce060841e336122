#!/usr/bin/env bash
# A compressor per keep ratio (BENCHMARKS.md, scenes-vqa Compression): trained on the labels
# searched at 2/9 and at 1/3 (scenes_label_budget@0.222 / @0.333, the oracle's sets) beside
# the pipeline's 1/9 set (scenes_label), each evaluated on the validation split (as a test
# split of its own) and on the test split. Needs the scenes pipeline's outputs (`dvc repro
# scenes_evaluate`); writes train_<ratio>_<seed>.json and eval_<ratio>_<seed>_{val,test}.json
# here, the compressors under $WORK (default /tmp/per_ratio). RATIOS (default "0.111 0.222
# 0.333") and SEEDS (default "0 1 2") choose the runs; the summary covers them. BENCHMARKS.md's
# table is both commands below (seeds 0-2 of every set, then 3-5 of the larger ones):
#   bash metrics/scenes/trials/per_ratio/run.sh
#   RATIOS="0.222 0.333" SEEDS="3 4 5" bash metrics/scenes/trials/per_ratio/run.sh
source "$(dirname "$0")/../lib.sh"
HERE=metrics/scenes/trials/per_ratio
WORK=${WORK:-/tmp/per_ratio}
mkdir -p "$WORK"
val_as_test "$WORK/val_as_test"
RATIOS=${RATIOS:-0.111 0.222 0.333}
SEEDS=${SEEDS:-0 1 2}
for s in $SEEDS; do
  trial_params "$WORK/params_$s.yaml" $s "" divprune,evocomp,evocomp_fill
done
for r in $RATIOS; do for s in $SEEDS; do
  labels=$(labels_at $r)
  train_eval "${r}_$s" "$labels" "$WORK/params_$s.yaml" $HERE \
    "$WORK" "$WORK/val_as_test:_val" data/scenes/prepared:_test
done; done
for suffix in _val _test; do
  python metrics/scenes/trials/summary.py $HERE $RATIOS --suffix $suffix \
    --methods divprune,evocomp,evocomp_fill --seeds "$(echo $SEEDS | tr ' ' ,)"
done
