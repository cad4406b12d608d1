#!/usr/bin/env bash
# Mass editing: the first N CounterFact cases written in ONE batch by each method (MEMIT, EMMET),
# with the unedited baseline over the same N cases. Resumable: each request's v* is cached on disk
# ($LMEDIT_CACHE/values/), so a killed run continues with the requests not yet optimised, and EMMET
# reuses MEMIT's v* (as does a batch after single-edit runs of the same cases with the same settings).
#   benchmarks/mass_tables.sh gemma3-270m          then: lmedit report runs/*-counterfact-*-1000/
set -euo pipefail
{ # bash reads the whole block before running it: editing this file under a running benchmark is safe
read -r -a extra <<< "${EVAL_ARGS:-}"  # e.g. EVAL_ARGS="--device cuda --dtype float32" (on a GPU)
models=${*:-smollm2-135m}
N=${N:-1000}
DATA=${DATA:-counterfact}
METHODS=${METHODS:-memit emmet}
for model in $models; do
  [ -e "runs/$model-$DATA-none-$N/summary.json" ] ||
    lmedit eval --model "$model" --data "$DATA" --n "$N" --method none --no-generation \
      --out "runs/$model-$DATA-none-$N" --resume "${extra[@]}"
  for method in $METHODS; do
    lmedit eval --model "$model" --data "$DATA" --n "$N" --method "$method" --protocol batch --batch-size "$N" \
      --no-generation --out "runs/$model-$DATA-$method-batch-$N" --resume "${extra[@]}"
  done
done
lmedit report runs/*-"$DATA"-none-"$N"/ runs/*-"$DATA"-*-batch-"$N"/
exit; }
