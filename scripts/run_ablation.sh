#!/usr/bin/env bash
# Runs every row of the ablation (docs/ablation.md) as a DVC experiment, 3 seeds, both embedded
# sequences; `python scripts/ablation_table.py` then builds the table from `dvc exp show --json`.
# About 45 minutes on 2 cores (each backbone is pre-trained once per seed; DVC's run cache reuses it).
# With row names as arguments (e.g. `bash scripts/run_ablation.sh broader`) it runs only those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

# name -> the -S overrides of that row. Every row but the last pins the settings of the defaults these rows
# were written against (rank-4 LoRA on every layer, future-name negatives, no anchors, no smoothing) so that
# it keeps its meaning; "moder" is the committed params.yaml.
OLD="-S expert.lora.rank=4 -S expert.lora.layers=null -S train.negatives=dataset -S train.anchor_earlier=0 -S composition.alpha=1.0 -S composition.alpha_unseen=1.0"
declare -A ROWS=(
  [naive-context]="$OLD -S expert.kind=context -S retrieval.k=3 -S retrieval.temperature=0.05 -S train.negatives=none -S composition.calibrate=none"
  [lora]="$OLD -S retrieval.k=3 -S retrieval.temperature=0.05 -S train.negatives=none -S composition.calibrate=none"
  [lora-broad]="$OLD -S retrieval.k=8 -S retrieval.temperature=0.2 -S train.negatives=none -S composition.calibrate=none"
  [negatives-dataset]="$OLD -S retrieval.k=8 -S retrieval.temperature=0.2 -S composition.calibrate=none"
  [negatives-earlier-calibrated]="$OLD -S retrieval.k=8 -S retrieval.temperature=0.2 -S train.negatives=earlier"
  [calibrated-k8]="$OLD -S retrieval.k=8 -S retrieval.temperature=0.2"
  [previous-defaults]="$OLD"
  [moder]=""
)
# In MTIL every dataset is one task: negatives and calibration cannot act, so those rows run on Class-IL only.
MTIL_ROWS="naive-context lora lora-broad calibrated-k8 previous-defaults moder"
CLASSIL_ROWS="naive-context lora lora-broad negatives-dataset negatives-earlier-calibrated calibrated-k8 previous-defaults moder"
if [ $# -gt 0 ]; then
  only=" $* "
  MTIL_ROWS=$(for row in $MTIL_ROWS; do if [[ $only == *" $row "* ]]; then echo "$row"; fi; done)
  CLASSIL_ROWS=$(for row in $CLASSIL_ROWS; do if [[ $only == *" $row "* ]]; then echo "$row"; fi; done)
fi

run_rows() {
  local sequence=$1 rows=$2
  for seed in 0 1 2; do
    for row in $rows; do
      # each experiment starts from the committed params (an applied experiment leaves its own behind)
      git checkout -- params.yaml
      python -m stages.use_benchmark "$sequence" > /dev/null
      # shellcheck disable=SC2086
      dvc exp run -q -n "${sequence}-${row}-s${seed}" -S seed=$seed ${ROWS[$row]}
    done
  done
}

run_rows embedded-mtil "$MTIL_ROWS"
run_rows embedded-classil "$CLASSIL_ROWS"
git checkout -- params.yaml dvc.lock metrics.json reports/
