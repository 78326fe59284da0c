#!/usr/bin/env bash
# The 3%-data experiment on AN4 (the paper's §6): hard vs soft targets on a small subset.
# Needs the main recipe's stages 0-6 (recipes/an4/run.sh): features, alignment, the baseline
# (the 100% model and soft-target teacher), the decoding graph.
#
#   recipes/an4/run_3pct.sh [--stage N] [--stop-stage M] [-- hydra overrides...]  (see recipes/stages.sh)
#
# Fractions, temperature and epochs: three_percent.* in conf/config.yaml. With an ensemble's
# soft targets on disk (asrkd train-ensemble + soft-targets), its student is an extra row.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
args=(corpus=an4 data_dir=data exp_dir=exp "results_dir=$root/results/an4" ${overrides[@]+"${overrides[@]}"})

run_stage 0 "soft targets of the 100% model; hard and soft runs on each subset" asrkd train-3pct "${args[@]}"
run_stage 1 "decode every row, LM weight chosen on the validation speakers" asrkd decode-3pct "${args[@]}"
run_stage 2 "report: the 3% table, gap closed, curve over fractions, over-fitting plot" asrkd report-3pct "${args[@]}"
echo "$(date '+%F %T') done"
