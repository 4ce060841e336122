#!/usr/bin/env bash
# Does the search matter once the compressor early-stops on the val answer loss? (BENCHMARKS.md,
# scenes-vqa Compression.) A random candidate of each sample's search space at 1/3 and 2/9
# (make.py) stands in for the searched label; the per-ratio compressor is trained on it with
# the scenes profile (train.monitor answer_loss) on training seeds 0-2 and evaluated on the
# test split, beside the searched labels' runs of ../answer_monitor/.
#   bash metrics/scenes/trials/random_labels/run.sh
source "$(dirname "$0")/../lib.sh"
HERE=metrics/scenes/trials/random_labels
WORK=${WORK:-/tmp/random_labels}
mkdir -p "$WORK"
RATIOS=${RATIOS:-0.333 0.222}
SEEDS=${SEEDS:-0 1 2}
for s in $SEEDS; do
  trial_params "$WORK/params_$s.yaml" $s "monitor='answer_loss'" divprune,evocomp
done
for r in $RATIOS; do
  python $HERE/make.py $r "$WORK/random_$r.parquet"
  for s in $SEEDS; do
    train_eval "${r}_$s" "$WORK/random_$r.parquet" "$WORK/params_$s.yaml" $HERE "$WORK"
  done
done
python metrics/scenes/trials/summary.py $HERE $RATIOS --methods divprune,evocomp \
  --seeds "$(echo $SEEDS | tr ' ' ,)"
