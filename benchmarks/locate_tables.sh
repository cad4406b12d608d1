#!/usr/bin/env bash
# Single-edit tables of the locate-then-edit methods (and FT-M for reference) on the first N
# CounterFact / ZsRE cases. Resumable: re-running continues every run where it stopped.
#   N=100 benchmarks/locate_tables.sh smollm2-135m        then: lmedit report runs/*/
set -euo pipefail
{ # bash reads the whole block before running it: editing this file under a running benchmark is safe
read -r -a extra <<< "${EVAL_ARGS:-}"  # e.g. EVAL_ARGS="--device cuda --dtype float32" (on a GPU)
models=${*:-smollm2-135m}
N=${N:-100}
DATA=${DATA:-counterfact zsre}
METHODS=${METHODS:-rome memit emmet alphaedit pmet ft-m}
for model in $models; do
  for data in $DATA; do
    # the unedited baseline (one per model and data set; its first N cases are the reference)
    [ -e "runs/$model-$data-none/summary.json" ] ||
      lmedit eval --model "$model" --data "$data" --n "$N" --method none --out "runs/$model-$data-none" --resume "${extra[@]}"
    for method in $METHODS; do
      lmedit eval --model "$model" --data "$data" --n "$N" --method "$method" --protocol single \
        --out "runs/$model-$data-$method-single-$N" --resume "${extra[@]}"
    done
  done
done
lmedit report runs/*/
exit; }
