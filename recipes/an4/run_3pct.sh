#!/usr/bin/env bash
# The 3%-data experiment on AN4 (the paper's §6): hard vs soft targets on a small subset, with
# bootstrap intervals, on the subset alone and on its speed-perturbed copies.
# Needs the main recipe's stages 0-6 (recipes/an4/run.sh): features, alignment, the baseline
# (the 100% model and soft-target teacher), the decoding graph.
#
#   recipes/an4/run_3pct.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# Fractions, temperature and epochs: three_percent.* in asrkd/experiments/three_percent/three_percent.yaml. With an ensemble's
# soft targets on disk (recipes/an4/run_distill.sh), its student is an extra row. Stages 0-1
# are run_distill.sh's stages 6-7 (skipped when that recipe made them).
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
base=(corpus=an4 data_dir=data exp_dir=exp)
args=("${base[@]}" ${overrides[@]+"${overrides[@]}"})
sp_args=("${base[@]}" 'features.sets=[${perturb.source}_sp]' ${overrides[@]+"${overrides[@]}"})

run_stage 0 "speed perturbation: data/train_sp and the subsets' copies (train_<pct>pct_sp)" asrkd speed-perturb "${args[@]}"
run_stage 1 "features and GMM alignment of train_sp" asrkd make-feats "${sp_args[@]}"
run_stage 1 "features and GMM alignment of train_sp" asrkd align "${sp_args[@]}"
run_stage 2 "soft targets of the 100% model; hard and soft runs on each subset (and its _sp copies)" asrkd train-3pct "${args[@]}"
run_stage 3 "decode every row, LM weight chosen on the validation speakers" asrkd decode-3pct "${args[@]}"
run_stage 4 "report: the 3% table with intervals, gap closed, curve over fractions, over-fitting plot" asrkd report-3pct "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
