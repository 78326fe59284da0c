#!/usr/bin/env bash
# Distilling into a much smaller student on AN4: hard labels, direct KD, teacher assistants
# (TAKD), dense guidance (DGKD), model-ensemble KD and teacher switching, each at the T chosen
# on validation, with the accuracy of every model of each chain and the cost of each method.
# Needs the main recipe (recipes/an4/run.sh) and the teacher: the 10-model ensemble of
# recipes/an4/run_distill.sh (stage 1; its soft-target stores of stage 2 are reused).
#
#   recipes/an4/run_chains.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# The teacher, the sizes down the chain, the methods, temperatures and DGKD's teacher dropping:
# chains.* in asrkd/experiments/chains/chains.yaml.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
args=(corpus=an4 data_dir=data exp_dir=exp ${overrides[@]+"${overrides[@]}"})

run_stage 0 "the teacher's soft targets at each T (kept when run_distill.sh made them)" \
  asrkd soft-targets "${args[@]}" 'distill.teacher=${chains.teacher}' 'distill.temperatures=${chains.temperatures}' \
  distill.logit_matching=false
run_stage 1 "every model of every chain at every T (assistants top down, then the students)" asrkd train-chains "${args[@]}"
run_stage 2 "decode each method's student at its chosen T" asrkd decode-chains "${args[@]}"
run_stage 3 "report: chains.md, chains.png, \"chains\" in report.json" asrkd report-chains "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
