#!/usr/bin/env bash
# The paper's preliminary image experiment (Hinton et al. 2015, §3) on Fashion-MNIST (or MNIST):
# a big regularized net, a small net alone, the small net distilled at T = 20, a class left out
# of the transfer set and two classes kept alone (each with its bias correction), T against
# hidden width. The same losses and training loop as the speech recipes.
#
#   recipes/mnist/run.sh [--stage N] [--stop-stage M] [--corpus-dir DIR] [--redo] [-- hydra overrides...]  (see recipes/stages.sh)
#
# The IDX files are read from --corpus-dir, else $FASHION_MNIST_DIR, else ../shared/corpora/fashion-mnist
# beside the repository.
# MNIST instead (downloaded from its canonical source into corpus/mnist when missing):
#   recipes/mnist/run.sh --corpus-dir corpus/mnist -- images.dataset=mnist exp_dir=exp_mnist results_dir=$PWD/results/mnist
# Sizes, epochs, T, classes: images.* in asrkd/experiments/images/images.yaml.
set -euo pipefail

. "$(dirname "$0")/../stages.sh"
[ -n "$corpus_dir" ] || corpus_dir=${FASHION_MNIST_DIR:-$root/../shared/corpora/fashion-mnist}
args=(corpus=fashion_mnist "images.corpus_dir=$corpus_dir" exp_dir=exp ${overrides[@]+"${overrides[@]}"})

run_stage 0 "the IDX files (downloaded when missing), checked, into exp/images" asrkd prepare-images "${args[@]}"
run_stage 1 "the big regularized net and the small net alone" asrkd train-image-nets "${args[@]}"
run_stage 2 "students of the big net: T x width, a class left out, two classes only" asrkd train-image-students "${args[@]}"
run_stage 3 "report: report.md, report.json, errors.png, temperature_width.png" asrkd report-images "${args[@]}"
publish_to "$root/results/fashion_mnist" "${args[@]}"
echo "$(date '+%F %T') done"
