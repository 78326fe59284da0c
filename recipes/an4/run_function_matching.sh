#!/usr/bin/env bash
# Distillation as function matching on AN4 (asrkd/experiments/function_matching/experiment.py; Beyer et al. 2022):
# students that see, on the fly, the teacher's outputs on their own augmented view of each batch,
# for 1x to 8x the baseline's epochs (to a validation plateau), each against a control trained on the same views, epochs and
# schedule with the pdf-ids; one student on the stored soft targets (the paper's setting) beside.
# Needs the main recipe's stages 0-4 (recipes/an4/run.sh): features, alignment, the baseline's config.
#
#   recipes/an4/run_function_matching.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# Views, schedules, seeds and T: function_matching.* in asrkd/experiments/function_matching/function_matching.yaml; the teacher: distill.teacher.
# Stage 2 runs for hours on 2 CPU cores; rerun it after any interruption: finished models are
# skipped, the interrupted one resumes from its last epoch. Stage 3 reports what is complete.
# The controls need no teacher: `--stage 2 --stop-stage 2 -- 'function_matching.train_kinds=[hard]'`
# trains them while stage 0 trains the ensemble (another process, another core).
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
args=(corpus=an4 data_dir=data exp_dir=exp ${overrides[@]+"${overrides[@]}"})

run_stage 0 "the teacher: the ensemble of run_distill.sh stage 1" asrkd train-ensemble "${args[@]}"
run_stage 1 "its soft targets (the precomputed student's)" asrkd soft-targets "${args[@]}"
run_stage 2 "controls and students: every view at 1x, the headline view at every schedule, its seeds, its other teachers (function_matching.teachers) and their students" asrkd train-function-matching "${args[@]}"
run_stage 3 "report: gain kept over each control (speaker intervals), fidelity, the patience curve" asrkd report-function-matching "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
