#!/usr/bin/env bash
# The 3%-data experiment on AN4 (the paper's §6): hard vs soft targets on a small subset.
# Needs the main recipe's stages 0-6 (recipes/an4/run.sh): features, alignment, the baseline
# (the 100% model and soft-target teacher), the decoding graph.
#
#   recipes/an4/run_3pct.sh [--stage N] [--stop-stage M] [-- hydra overrides...]
#
# Fractions, temperature and epochs: three_percent.* in conf/config.yaml. With an ensemble's
# soft targets on disk (asrkd train-ensemble + soft-targets), its student is an extra row.
set -euo pipefail

stage=0
stop_stage=100
overrides=()
command_line="recipes/an4/run_3pct.sh $*"
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "usage: $0 [--stage N] [--stop-stage M] [-- hydra overrides]" >&2; exit 1 ;;
  esac
done

cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export ASRKD_RECIPE_COMMAND=${command_line% }
args=(corpus=an4 data_dir=data exp_dir=exp "results_dir=$root/results/an4" ${overrides[@]+"${overrides[@]}"})

run_stage() {  # run_stage N description command...
  local n=$1 what=$2; shift 2
  if [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; then
    echo "$(date '+%F %T') stage $n: $what"
    "$@"
  fi
}

run_stage 0 "soft targets of the 100% model; hard and soft runs on each subset" asrkd train-3pct "${args[@]}"
run_stage 1 "decode every row, LM weight chosen on the validation speakers" asrkd decode-3pct "${args[@]}"
run_stage 2 "report: the 3% table, gap closed, curve over fractions, over-fitting plot" asrkd report-3pct "${args[@]}"
echo "$(date '+%F %T') done"
