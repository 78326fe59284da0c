#!/usr/bin/env bash
# Specialists with a generalist on AN4 (Hinton et al. 2015, §5): groups of confusable pdf-ids
# from the baseline's held-out predictions, one specialist per group started from the baseline,
# their combination with it (the distribution closest in KL to the generalist and the active
# specialists), and that combination distilled back into one network. Needs the main recipe
# (recipes/an4/run.sh): features, alignment, the baseline (the generalist), the decoding graph.
#
#   recipes/an4/run_specialists.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# The number of specialists, their group size, T, the combination: specialists.* in asrkd/experiments/specialists/specialists.yaml.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
args=(corpus=an4 data_dir=data exp_dir=exp ${overrides[@]+"${overrides[@]}"})

run_stage 0 "groups, specialists, their combination, its soft targets and the re-distilled student" asrkd train-specialists "${args[@]}"
run_stage 1 "decode the generalist, the combination, the re-distilled student and its control" asrkd decode-specialists "${args[@]}"
run_stage 2 "report: specialists.md, specialists.png, \"specialists\" in report.json" asrkd report-specialists "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
