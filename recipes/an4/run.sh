#!/usr/bin/env bash
# AN4 (CMU census, ~0.8 h of read speech): wav -> hybrid DNN -> frame accuracy and WER report.
#
#   recipes/an4/run.sh [--stage N] [--stop-stage M] [--corpus-dir DIR] [--redo] [-- hydra overrides...]
#
# A stage skips work whose outputs were made with the same config and inputs (stage.json in its
# output dir), refuses changed ones unless --redo; DNN training resumes from last.pt. Working dirs are
# recipes/an4/data and recipes/an4/exp; the report is merged into results/an4/.
# The corpus is read from --corpus-dir, else $AN4_DIR (either must hold AN4), else ../shared/corpora/an4
# beside the repository, else downloaded from CMU (prep.download_url).
set -euo pipefail

corpus_dir=${AN4_DIR:-}
. "$(dirname "$0")/../stages.sh"
# a --corpus-dir (or $AN4_DIR) given must hold AN4; without one, stage 0 looks beside the repository, then downloads
args=(corpus=an4 ${corpus_dir:+"corpus_dir=$corpus_dir"} data_dir=data exp_dir=exp ${overrides[@]+"${overrides[@]}"})

run_stage 0 "data prep (data/train, data/test, subsets of train)" python -m local.an4 "${args[@]}"
run_stage 1 "lang dir (lexicon, phones, topology, L.fst)" asrkd prepare-lang "${args[@]}"
run_stage 2 "fbank + MFCC features with per-speaker CMVN" asrkd make-feats "${args[@]}"
run_stage 3 "GMM-HMM: monophone, triphone tree, forced alignment" asrkd train-gmm "${args[@]}"
run_stage 4 "baseline DNN (cross-entropy on pdf-ids)" asrkd train-dnn "${args[@]}"
run_stage 5 "decoding graph: 3-gram LM on train transcripts, HCLG" asrkd make-graph "${args[@]}"
run_stage 6 "decode GMM and DNN, LM-weight sweep on validation speakers, WER" asrkd decode "${args[@]}"
run_stage 7 "report: frame accuracy and WER" asrkd evaluate "${args[@]}"
publish_to "$root/results/an4" "${args[@]}"
echo "$(date '+%F %T') done"
