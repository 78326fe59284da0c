#!/usr/bin/env bash
# Self-distillation on AN4 ("Be Your Own Teacher"): the baseline's network with shallow exits
# trained jointly, each exit taught by the deepest; every exit decoded and costed against a
# plain model as deep trained alone. Needs the main recipe (recipes/an4/run.sh): features,
# alignment, the baseline (the full-depth plain model), the decoding graph.
#
#   recipes/an4/run_self_distill.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# The exits, T and the loss weights: self_distillation.* in asrkd/experiments/self_distillation/self_distillation.yaml.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
args=(corpus=an4 data_dir=data exp_dir=exp ${overrides[@]+"${overrides[@]}"})

run_stage 0 "the network with exits, each exit as a model of its own, plain models as deep as the exits" asrkd train-self-distill "${args[@]}"
run_stage 1 "decode every exit and every plain model" asrkd decode-self-distill "${args[@]}"
run_stage 2 "report: self_distillation.md, self_distillation.png, \"self_distillation\" in report.json" asrkd report-self-distill "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
