#!/usr/bin/env bash
# The paper's network on AN4 (Hinton et al. 2015, §4: 26 frames of 40 fbank in, 8 hidden layers
# of 2560 ReLUs): the baseline, the 10-model ensemble, its soft targets, the students and the
# 3%-data runs, decoded and reported into results/an4_paper/ beside the small model's
# results/an4/. Meant for a GPU (train.device=auto takes one; ensemble.fused=auto fuses there).
# Needs the main recipe's stages 0-3, 5 and 6 (recipes/an4/run.sh: data, lang, features, GMM
# alignment, graph, the GMM's decode): exp_paper/ links to those outputs of exp/ and holds the
# paper-size models, so neither size replaces the other's. The 3% stage's speed-perturbed rows
# also need run_3pct.sh's stages 0-1 (or three_percent.speed_perturbed=false).
#
#   recipes/an4/run_paper.sh [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# Each stage runs stages of the other recipes with the paper's overrides, e.g. stage 2 is
# `run_distill.sh --stop-stage 5 -- model=paper train.lr=1e-4 exp_dir=exp_paper results_dir=results/an4_paper`;
# overrides given here follow those (batch size, bf16 autocast, seeds).
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
# Adam at the small model's 1e-3 (and PyTorch's default init) starts the 8-layer stack slowly:
# bench/init_convergence.py, results/bench/init_convergence_cpu.json
paper=(model=paper train.lr=1e-4 exp_dir=exp_paper "results_dir=$root/results/an4_paper" ${overrides[@]+"${overrides[@]}"})

link_prepared() {  # exp_paper/{feats,tri,graph,decode/gmm} -> exp/: the outputs no model size changes
  local dir record
  for dir in feats tri graph decode/gmm; do
    record=exp/$dir/stage.json; [ "$dir" = feats ] && record=exp/feats/fbank/train/stage.json
    [ -f "$record" ] || { echo "$record is missing: run recipes/an4/run.sh --stop-stage 6 first" >&2; return 1; }
  done
  mkdir -p exp_paper/decode
  ln -sfn ../exp/feats exp_paper/feats
  ln -sfn ../exp/tri exp_paper/tri
  ln -sfn ../exp/graph exp_paper/graph
  ln -sfn ../../exp/decode/gmm exp_paper/decode/gmm
}

run_stage 0 "link the features, GMM, alignments, graph and the GMM's decode of exp/ into exp_paper/" link_prepared
run_stage 1 "baseline 8x2560, its decode and report (run.sh stages 4-7)" \
  "$recipe_dir/run.sh" --stage 4 --stop-stage 7 -- "${paper[@]}"
run_stage 2 "replicates, ensemble, soft targets, students, decode, Table 1 (run_distill.sh stages 0-5)" \
  "$recipe_dir/run_distill.sh" --stop-stage 5 -- "${paper[@]}"
run_stage 3 "the 3%-data runs, decode, report (run_3pct.sh stages 2-4)" \
  "$recipe_dir/run_3pct.sh" --stage 2 -- "${paper[@]}"
echo "$(date '+%F %T') done"
