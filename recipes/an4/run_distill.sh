#!/usr/bin/env bash
# Distillation on AN4 (the paper's §4, Table 1) with error bars: replicates of the baseline, a
# 10-model ensemble, its soft targets at each T, students (several seeds) trained on them, the
# baseline / ensemble / distilled table with bootstrap intervals; then the levers that move the
# share of the ensemble's gain a student keeps (speed-perturbed transfer set, cross-fitted
# teachers, student epochs), each against a baseline trained on the same data.
# Needs the main recipe's stages 0-6 (recipes/an4/run.sh): features, alignment, the baseline,
# the decoding graph.
#
#   recipes/an4/run_distill.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# Ensemble size, temperatures, top-k, seeds, the students and the loss weights: ensemble.* and
# distill.* in conf/config.yaml; the levers: levers.* (asrkd/experiments/distillation/levers.yaml) and perturb.*.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
base=(corpus=an4 data_dir=data exp_dir=exp)
args=("${base[@]}" ${overrides[@]+"${overrides[@]}"})
sp_args=("${base[@]}" 'features.sets=[${perturb.source}_sp]' ${overrides[@]+"${overrides[@]}"})

run_stage 0 "replicates of the baseline (distill.seeds.dense models, seed + 100 r)" \
  asrkd train-dnn "${base[@]}" 'train.seeds=${distill.seeds.dense}' ${overrides[@]+"${overrides[@]}"}
run_stage 1 "ensemble: members identical but for their init seed, trained one after another" asrkd train-ensemble "${args[@]}"
run_stage 2 "soft targets: the members' average softmax(z/T) per T (dense + top-k), and their logits" asrkd soft-targets "${args[@]}"
run_stage 3 "students: T^2 CE(soft targets) + 0.5 CE(pdf-ids) per T, form and seed; logit matching" asrkd train-student "${args[@]}"
run_stage 4 "decode the baseline's replicates, the ensemble (averaged posteriors) and every student" asrkd decode-distill "${args[@]}"
run_stage 5 "report: Table 1 with intervals, gain kept, differences, table over T, top-k cost, plots" asrkd report-distill "${args[@]}"
run_stage 6 "speed perturbation: data/train_sp (train + copies at 0.9 and 1.1)" asrkd speed-perturb "${args[@]}"
run_stage 7 "features and GMM alignment of train_sp" asrkd make-feats "${sp_args[@]}"
run_stage 7 "features and GMM alignment of train_sp" asrkd align "${sp_args[@]}"
run_stage 8 "levers: baseline and students on train_sp, cross-fitted teacher and its students, longer students" asrkd train-levers "${args[@]}"
run_stage 9 "decode every lever's students, baselines and teacher" asrkd decode-levers "${args[@]}"
run_stage 10 "report again, with the levers: gain kept per lever against its same-data baseline" asrkd report-distill "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
