#!/usr/bin/env bash
# Sequential (lifelong) editing scored after_all at T checkpoints: the lifelong table (FT-L, FT-EWC,
# LoRA, GRACE, WISE-Merge, WISE-Retrieve, DEFER, one edit at a time) and the locate-then-edit methods
# (AlphaEdit and MEMIT in batches of 100, ROME one by one). Resumable: re-run to continue (the
# accumulated edit is checkpointed in runs/<name>/state; long runs can be done in pieces).
#   T=1000 benchmarks/sequential_tables.sh smollm2-135m              then: lmedit report runs/*-sequential-*
#   DATA=hallucination T=600 METHODS="grace wise" benchmarks/sequential_tables.sh
#   MARKS="1 10 100" T=1000 METHODS=defer benchmarks/sequential_tables.sh gemma3-270m
#   (MARKS: the scoring marks below T; T itself is always scored. This skips T = 600, which on Gemma-3's
#   262k-token vocabulary takes about an hour single-threaded.)
#   EVAL_ARGS="--hparam rehearse=8" METHODS=wise-retrieve ... gemma3-270m   (Gemma-3's keys are alike: WISE needs
#   more rehearsal there, see lmedit.methods.wise; the table's Gemma row ran as runs/gemma3-270m-zsre-wise-retrieve-rehearse8-*)
#   DTYPE=bfloat16 DATA=hallucination T=600 METHODS=wise-retrieve ...   (the model in bfloat16, runs named
#   runs/<model>-bf16-...: on a CPU with AVX-512 BF16 a training step is 2.1-2.6x faster; benchmarks/train_dtype.py)
set -euo pipefail
{ # bash reads the whole block before running it: editing this file under a running benchmark is safe
read -r -a extra <<< "${EVAL_ARGS:-}"  # e.g. EVAL_ARGS="--device cuda --dtype float32" (on a GPU)
models=${*:-smollm2-135m}
T=${T:-1000}
DATA=${DATA:-zsre}
METHODS=${METHODS:-ft-l ft-ewc lora grace wise wise-retrieve defer alphaedit memit rome}
tag=""
if [ -n "${DTYPE:-}" ]; then extra+=(--dtype "$DTYPE"); tag="-${DTYPE/bfloat16/bf16}"; fi
checkpoints=$(for t in ${MARKS:-1 10 100 600 1000 10000}; do if [ "$t" -le "$T" ]; then printf '%s,' "$t"; fi; done)
# passages: exact-match generation of a 100-token target says nothing (and costs most of the run);
# the lifelong literature scores them teacher-forced and by perplexity
gen=()
case $DATA in hallucination|temporal) gen=(--no-generation) ;; esac
for model in $models; do
  # the unedited model, scored the same way (and in the same dtype): the reference every row is read against
  [ -e "runs/$model$tag-$DATA-none/summary.json" ] ||
    lmedit eval --model "$model" --data "$DATA" --n "$T" --method none "${gen[@]}" --out "runs/$model$tag-$DATA-none" \
      --resume "${extra[@]}"
  for method in $METHODS; do
    args=(--method "$method")
    case $method in
      wise-retrieve) args=(--method wise --hparam mode=retrieve) ;;
      alphaedit|memit) args+=(--batch-size 100) ;;
    esac
    # WISE and DEFER learn to keep unrelated inputs out; they see the train split's locality inputs
    # (the WISE paper's setting), in the format of the locality probes but disjoint from them.
    case $DATA in
      zsre|hallucination|temporal)
        case $method in wise|wise-retrieve|defer) args+=(--hparam "corpus=$DATA-train") ;; esac ;;
    esac
    args+=("${gen[@]}")
    lmedit eval --model "$model" --data "$DATA" --n "$T" "${args[@]}" --protocol sequential --scoring after_all \
      --checkpoints "${checkpoints%,}" --out "runs/$model$tag-$DATA-$method-sequential-$T" --resume "${extra[@]}"
  done
done
lmedit report runs/*-sequential-*
exit; }
