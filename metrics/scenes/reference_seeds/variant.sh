#!/usr/bin/env bash
# The scenes reference recipe with some of profiles.scenes.mllm's settings changed, on some
# seeds side by side: NAME (the folder beside this script its logs and evaluations go to)
# and KEY=VALUE overrides of profiles.scenes.mllm (YAML values). SEEDS (default "0 1 2")
# run side by side, THREADS (default 1) each; each writes seedS_train.log (with the wall
# time) and seedS.json, its model under $WORK (default /tmp/NAME).
#   SEEDS="2 0" bash metrics/scenes/reference_seeds/variant.sh heads8 lm_heads=8
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1
NAME=${1:?usage: variant.sh NAME KEY=VALUE ...}
shift
HERE=metrics/scenes/reference_seeds/$NAME
WORK=${WORK:-/tmp/$NAME}
mkdir -p "$WORK" "$HERE"
python - "$WORK/params.yaml" "${THREADS:-1}" "$@" <<'PY'
import sys
import yaml
out, threads, *pairs = sys.argv[1:]
d = yaml.safe_load(open("params.yaml"))
mllm = d["profiles"]["scenes"]["mllm"]
for pair in pairs:
    key, _, value = pair.partition("=")
    if key not in mllm and key not in ("threads",):
        print(f"note: {key} is not in profiles.scenes.mllm; the code default is overridden")
    mllm[key] = yaml.safe_load(value)
mllm["threads"] = int(threads)
yaml.safe_dump(d, open(out, "w"), sort_keys=False)
PY
for s in ${SEEDS:-0 1 2}; do
  (
    /usr/bin/time -f "wall %e s" evocomp --profile scenes mllm train --seed "$s" \
      --out "$WORK/seed$s" --params "$WORK/params.yaml" > "$HERE/seed${s}_train.log" 2>&1
    evocomp --profile scenes mllm eval --model "$WORK/seed$s" --out "$HERE/seed$s.json" \
      --params "$WORK/params.yaml" >> "$HERE/seed${s}_train.log" 2>&1
  ) &
done
wait
