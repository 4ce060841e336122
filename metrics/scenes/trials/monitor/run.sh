#!/usr/bin/env bash
# Which epoch early stopping keeps (BENCHMARKS.md, scenes-vqa Compression): the scenes
# compressor trained with train.monitor loss (validation BCE against the soft targets) and
# precision (validation top-k precision at the label's k), 3 training seeds each, evaluated
# on the validation split (as a test split of its own) and on the test split.
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes
# train_<monitor>_<seed>.json, eval_<monitor>_<seed>_<split>.json here, the rest under $WORK.
#   bash metrics/scenes/trials/monitor/run.sh
source "$(dirname "$0")/../lib.sh"
override_trial metrics/scenes/trials/monitor "${WORK:-/tmp/monitor}" monitor "${RUNS:-loss:0 loss:1 loss:2 precision:0 precision:1 precision:2}"
for split in _val _test; do python metrics/scenes/trials/summary.py metrics/scenes/trials/monitor loss precision --suffix $split; done
