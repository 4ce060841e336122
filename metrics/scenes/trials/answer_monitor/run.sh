#!/usr/bin/env bash
# Early stopping on the MLLM's validation answer loss (train.monitor: answer_loss) instead of
# the validation BCE, and what train.restarts 3 would keep (BENCHMARKS.md, scenes-vqa
# Compression): compressors trained on the labels searched at 1/9 (scenes_label), 2/9 and
# 1/3 (scenes_label_budget@R), one per training seed, each evaluated on the test split. The
# per-seed runs are what restarts fits: its pick among seeds 0-2 (and 3-5) is the run of
# lowest val_answer_loss in train_<ratio>_<seed>.json, summary.py --restarts 3 reads it off.
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); compressors under $WORK.
#   bash metrics/scenes/trials/answer_monitor/run.sh
source "$(dirname "$0")/../lib.sh"
HERE=metrics/scenes/trials/answer_monitor
WORK=${WORK:-/tmp/answer_monitor}
mkdir -p "$WORK"
RATIOS=${RATIOS:-0.111 0.222 0.333}
SEEDS=${SEEDS:-0 1 2 3 4 5}
for s in $SEEDS; do
  trial_params "$WORK/params_$s.yaml" $s "monitor='answer_loss'" divprune,evocomp,evocomp_fill
done
for r in $RATIOS; do for s in $SEEDS; do
  labels=$(labels_at $r)
  train_eval "${r}_$s" "$labels" "$WORK/params_$s.yaml" $HERE "$WORK"
done; done
python metrics/scenes/trials/summary.py $HERE $RATIOS --methods divprune,evocomp,evocomp_fill \
  --seeds "$(echo $SEEDS | tr ' ' ,)" --restarts 3
