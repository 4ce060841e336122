# Shared by the scenes trial scripts (`source "$(dirname "$0")/../lib.sh"`): they run from
# the repository root with the project's tools first, on the scenes pipeline's outputs
# (`dvc repro scenes_evaluate`), and write their small JSON results beside themselves.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1

# trial_params OUT SEED UPDATES METHODS: params.yaml with train.seed SEED and the train.*
# UPDATES (a Python keyword list, e.g. "layers=2" or ""), evaluating only METHODS (commas)
trial_params() {
  python -c "
import yaml
d = yaml.safe_load(open('params.yaml'))
d['train'].update(seed=$2, $3)
d['evaluate']['methods'] = '$4'.split(',')
yaml.safe_dump(d, open('$1', 'w'), sort_keys=False)"
}

# labels_at R: the pipeline's label set searched at keep ratio R (scenes_label's at 1/9,
# scenes_label_budget@R's otherwise)
labels_at() {
  if [ "$1" = 0.111 ]; then echo data/scenes/labels/labels.parquet
  else echo "data/scenes/labels/labels_$1.parquet"; fi
}

# val_as_test DIR: the prepared validation split as a prepared set whose test split it is
val_as_test() {
  mkdir -p "$1"
  python -c "
import json, pandas as pd
d = pd.read_parquet('data/scenes/prepared/samples.parquet')
v = d[d.split == 'val'].assign(split='test')
v.to_parquet('$1/samples.parquet')
m = json.load(open('data/scenes/prepared/manifest.json'))
m.update(samples=len(v), splits={'test': len(v)})
json.dump(m, open('$1/manifest.json', 'w'))"
}

# train_eval NAME LABELS PARAMS OUT WORK [DATA:SUFFIX ...]: a compressor trained on LABELS
# with PARAMS (metrics OUT/train_NAME.json, the model under WORK), evaluated on each prepared
# DATA (OUT/eval_NAME<SUFFIX>.json; default: the test split, no suffix)
train_eval() {
  local name=$1 labels=$2 params=$3 out=$4 work=$5
  shift 5
  evocomp --profile scenes train --labels "$labels" --features data/scenes/features \
    --model models/scenes/mllm --out "$work/comp_$name" --curve "$work/curve_$name.csv" \
    --metrics "$out/train_$name.json" --params "$params"
  local target
  for target in "${@:-data/scenes/prepared:}"; do
    evocomp --profile scenes evaluate --data "${target%%:*}" --features data/scenes/features \
      --labels data/scenes/labels/labels.parquet --compressor "$work/comp_$name" \
      --model models/scenes/mllm --out "$out/eval_$name${target#*:}.json" \
      --plots "$work/ret_$name${target#*:}.csv" --params "$params"
  done
}

# lock_md5 COMMIT STAGE: the md5 of STAGE's labels.parquet output in COMMIT's dvc.lock
lock_md5() {
  git show "$1:dvc.lock" | python -c "
import sys, yaml
d = yaml.safe_load(sys.stdin)
print([o for o in d['stages']['$2']['outs'] if o['path'].endswith('labels.parquet')][0]['md5'])"
}

# override_trial HERE WORK KEY RUNS: for each VALUE:SEED of RUNS (spaces), a compressor trained
# with train.KEY VALUE (read as YAML) and train.seed SEED, evaluated on the validation split
# (as a test split of its own) and on the test split: train_VALUE_SEED.json and
# eval_VALUE_SEED_val.json / _test.json in HERE, the rest under WORK
override_trial() {
  local here=$1 work=$2 key=$3 run m s
  val_as_test "$work/val_as_test"
  for run in $4; do
    m=${run%:*} s=${run#*:}
    trial_params "$work/params_${m}_$s.yaml" "$s" "$key=yaml.safe_load('$m')" evocomp,evocomp_fill
    train_eval "${m}_$s" data/scenes/labels/labels.parquet "$work/params_${m}_$s.yaml" "$here" \
      "$work" "$work/val_as_test:_val" data/scenes/prepared:_test
  done
}
