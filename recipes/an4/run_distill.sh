#!/usr/bin/env bash
# Distillation on AN4 (the paper's §4, Table 1): a 10-model ensemble, its soft targets at each
# T, students trained on them, and the baseline / ensemble / distilled table.
# Needs the main recipe's stages 0-6 (recipes/an4/run.sh): features, alignment, the baseline,
# the decoding graph.
#
#   recipes/an4/run_distill.sh [--stage N] [--stop-stage M] [-- hydra overrides...]  (see recipes/stages.sh)
#
# Ensemble size, temperatures, top-k, the students and the loss weights: ensemble.* and
# distill.* in conf/config.yaml.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
args=(corpus=an4 data_dir=data exp_dir=exp "results_dir=$root/results/an4" ${overrides[@]+"${overrides[@]}"})

run_stage 0 "ensemble: members identical but for their init seed, trained one after another" asrkd train-ensemble "${args[@]}"
run_stage 1 "soft targets: the members' average softmax(z/T) per T (dense + top-k), and their logits" asrkd soft-targets "${args[@]}"
run_stage 2 "students: T^2 CE(soft targets) + 0.5 CE(pdf-ids) per T and form; logit matching" asrkd train-student "${args[@]}"
run_stage 3 "decode the ensemble (averaged posteriors) and every student" asrkd decode-distill "${args[@]}"
run_stage 4 "report: Table 1, gain kept, table over T, top-k cost, plots" asrkd report-distill "${args[@]}"
echo "$(date '+%F %T') done"
