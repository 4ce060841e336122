#!/usr/bin/env bash
# The scenes reference recipe with the lookup term weighted WEIGHT (default 3) instead of 1
# (profiles.scenes.mllm.lookup_supervision; nothing else changed, no extra compute), on the
# seeds where 1.0 left the lookup term high and attribute answers low (BENCHMARKS.md,
# scenes-vqa Reference model): variant.sh's run, named lookup<WEIGHT>. SEEDS (default
# "1 2") run side by side, THREADS (default 1) each; each writes seedS_train.log and
# seedS.json to lookup<WEIGHT>/ beside this script, its model under $WORK (default
# /tmp/lookup<WEIGHT>).
#   WEIGHT=3 SEEDS=2 bash metrics/scenes/reference_seeds/lookup_weight.sh
set -euo pipefail
WEIGHT=${WEIGHT:-3}
SEEDS=${SEEDS:-1 2} exec bash "$(dirname "$0")/variant.sh" "lookup$WEIGHT" \
  "lookup_supervision=$WEIGHT"
