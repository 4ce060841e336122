#!/usr/bin/env bash
# A deeper compressor (BENCHMARKS.md, scenes-vqa Compression): train.layers 2 instead of the
# paper's 1, 3 training seeds, evaluated on the validation split (as a test split of its
# own) and on the test split; the 1-layer rows are ../monitor's loss runs (same settings).
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`); writes
# train_<layers>_<seed>.json, eval_<layers>_<seed>_<split>.json here, the rest under $WORK.
#   bash metrics/scenes/trials/depth/run.sh
source "$(dirname "$0")/../lib.sh"
override_trial metrics/scenes/trials/depth "${WORK:-/tmp/depth}" layers "${RUNS:-2:0 2:1 2:2}"
for split in _val _test; do python metrics/scenes/trials/summary.py metrics/scenes/trials/depth 2 --suffix $split; done
