#!/usr/bin/env bash
# The scenes reference recipe with the lookup term weighted WEIGHT (default 3) instead of 1
# (profiles.scenes.mllm.lookup_supervision; nothing else changed, no extra compute), on the
# seeds where 1.0 left the lookup term high and attribute answers low (BENCHMARKS.md,
# scenes-vqa Reference model). SEEDS (default "1 2") run side by side, THREADS (default 1)
# each; each writes seedS_train.log and seedS.json to lookup<WEIGHT>/ beside this script,
# its model under $WORK (default /tmp/lookup<WEIGHT>).
#   WEIGHT=3 SEEDS=2 bash metrics/scenes/reference_seeds/lookup_weight.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1
WEIGHT=${WEIGHT:-3}
HERE=metrics/scenes/reference_seeds/lookup$WEIGHT
WORK=${WORK:-/tmp/lookup$WEIGHT}
mkdir -p "$WORK" "$HERE"
python -c "
import yaml
d = yaml.safe_load(open('params.yaml'))
d['profiles']['scenes']['mllm'].update(lookup_supervision=float($WEIGHT), threads=${THREADS:-1})
yaml.safe_dump(d, open('$WORK/params.yaml', 'w'), sort_keys=False)"
for s in ${SEEDS:-1 2}; do
  (
    /usr/bin/time -f "wall %e s" evocomp --profile scenes mllm train --seed "$s" \
      --out "$WORK/seed$s" --params "$WORK/params.yaml" > "$HERE/seed${s}_train.log" 2>&1
    evocomp --profile scenes mllm eval --model "$WORK/seed$s" --out "$HERE/seed$s.json" \
      --params "$WORK/params.yaml" >> "$HERE/seed${s}_train.log" 2>&1
  ) &
done
wait
