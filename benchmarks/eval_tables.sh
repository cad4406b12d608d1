#!/usr/bin/env bash
# The evaluation tables of the evaluation-harness issue: unedited baselines and FT-M (single and
# sequential) on 500 CounterFact and 500 ZsRE cases, for the bundled models. Every run is resumable:
# re-running this script continues where it stopped. Results: runs/<name>/summary.md; all together:
#   lmedit report runs/*/
# usage: benchmarks/eval_tables.sh [smollm2-135m gemma3-270m]
set -euo pipefail
{ # bash reads the whole block before running it: editing this file under a running benchmark is safe
models=${*:-smollm2-135m gemma3-270m}
N=${N:-500}
for model in $models; do
  for data in counterfact zsre; do
    lmedit eval --model "$model" --data "$data" --n "$N" --method none --out "runs/$model-$data-none" --resume
  done
done
for model in $models; do
  for data in counterfact zsre; do
    lmedit eval --model "$model" --data "$data" --n "$N" --method ft-m --protocol single \
      --out "runs/$model-$data-ft-m-single" --resume
    lmedit eval --model "$model" --data "$data" --n 100 --method ft-m --protocol sequential --scoring after_all \
      --checkpoints 1,10,100 --out "runs/$model-$data-ft-m-sequential" --resume
  done
done
lmedit report runs/*/
exit; }
