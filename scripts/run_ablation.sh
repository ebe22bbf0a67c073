#!/usr/bin/env bash
# Runs every row of the ablation (docs/ablation.md) as a DVC experiment, 3 seeds, both embedded
# sequences; `python scripts/ablation_table.py` then builds the table from `dvc exp show --json`.
# About 45 minutes on 2 cores (each backbone is pre-trained once per seed; DVC's run cache reuses it).
# With row names as arguments (e.g. `bash scripts/run_ablation.sh broader`) it runs only those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

# name -> the -S overrides of that row (the committed params.yaml is the last row, "moder")
declare -A ROWS=(
  [naive-context]="-S expert.kind=context -S retrieval.k=3 -S retrieval.temperature=0.05 -S train.negatives=none -S composition.calibrate=false"
  [lora]="-S retrieval.k=3 -S retrieval.temperature=0.05 -S train.negatives=none -S composition.calibrate=false"
  [lora-broad]="-S retrieval.k=8 -S retrieval.temperature=0.2 -S train.negatives=none -S composition.calibrate=false"
  [negatives-dataset]="-S retrieval.k=8 -S retrieval.temperature=0.2 -S composition.calibrate=false"
  [negatives-earlier-calibrated]="-S retrieval.k=8 -S retrieval.temperature=0.2 -S train.negatives=earlier"
  [calibrated-k8]="-S retrieval.k=8 -S retrieval.temperature=0.2"
  [moder]=""
)
# In MTIL every dataset is one task: negatives and calibration cannot act, so those rows run on Class-IL only.
MTIL_ROWS="naive-context lora lora-broad calibrated-k8 moder"
CLASSIL_ROWS="naive-context lora lora-broad negatives-dataset negatives-earlier-calibrated calibrated-k8 moder"
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
