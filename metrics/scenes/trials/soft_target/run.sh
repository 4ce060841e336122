#!/usr/bin/env bash
# The scenes compressor on 3 training seeds x 2 soft targets (BENCHMARKS.md, scenes-vqa
# Compression): the elite's keep frequency (label set c47b74e4f8538c6d, scenes_label before
# soft_target: elimination) and the worth rank (188a06fdffcff32b, the committed one).
# Needs the scenes pipeline's outputs (`dvc repro scenes_evaluate`) and the DVC cache entry
# of both label sets; writes train_<target>_<seed>.json and eval_<target>_<seed>.json
# here, the compressors under $WORK (default /tmp/soft_target).
#   bash metrics/scenes/trials/soft_target/run.sh
source "$(dirname "$0")/../lib.sh"
HERE=metrics/scenes/trials/soft_target
WORK=${WORK:-/tmp/soft_target}
mkdir -p "$WORK"
# the two label sets, from the DVC cache: the elite one as 746fef9 committed it, the worth-
# ranked one as c4a4ad7 did (the pipeline's labels.parquet is the elite set again since)
for t in elite:746fef9 elimination:c4a4ad7; do
  md5=$(lock_md5 "${t#*:}" scenes_label)
  cp ".dvc/cache/files/md5/${md5:0:2}/${md5:2}" "$WORK/labels_${t%%:*}.parquet"
done
for s in 0 1 2; do
  trial_params "$WORK/params_$s.yaml" $s "" divprune,evocomp,evocomp_fill
done
for t in elite elimination; do for s in 0 1 2; do
  train_eval "${t}_$s" "$WORK/labels_$t.parquet" "$WORK/params_$s.yaml" $HERE "$WORK"
done; done
python metrics/scenes/trials/summary.py metrics/scenes/trials/soft_target elite elimination
