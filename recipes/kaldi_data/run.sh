#!/usr/bin/env bash
# Your own corpus: any Kaldi data dirs -> hybrid DNN -> frame accuracy and WER on every evaluation set.
#
#   recipes/kaldi_data/run.sh --corpus-dir DIR [--stage N] [--stop-stage M] [--redo] [-- hydra overrides...]
#
# DIR holds Kaldi data dirs (wav.scp, text, utt2spk, spk2utt), as a Kaldi recipe's data/ does:
# train, and every set of eval_sets (default: test; e.g. `-- eval_sets=[dev,test]`), and the LM
# weight's tuning set when it is a data dir (`decode.tuning_set=dev`; default: valid, speakers
# held out of train). DIR/local/dict, in Kaldi's layout (lexicon.txt, nonsilence_phones.txt,
# silence_phones.txt, optional_silence.txt), is the dictionary and its phone set; without it the
# dictionary is CMUdict. Name the corpus (`-- corpus=mine`); working dirs are recipes/kaldi_data/data
# and exp (the report: exp/report); `--publish -- results_dir=DIR` also merges the report into DIR
# (default results/kaldi_data); splitting over jobs: `jobs.nj=N` (null: one per core).
set -euo pipefail

corpus_dir=${KALDI_DATA_DIR:-}
. "$(dirname "$0")/../stages.sh"
[ -n "$corpus_dir" ] || { echo "$0: --corpus-dir DIR (or \$KALDI_DATA_DIR) must name your data dirs" >&2; exit 1; }
args=(corpus=kaldi_data "corpus_dir=$corpus_dir" data_dir=data exp_dir=exp 'decode.unseen_sentences=[]' ${overrides[@]+"${overrides[@]}"})

run_stage 0 "data dirs and dictionary (validated copies in data/)" python -m local.kaldi_data "${args[@]}"
run_stage 1 "lang dir (lexicon, phones, topology, L.fst)" asrkd prepare-lang "${args[@]}"
run_stage 2 "fbank + MFCC features of train and the evaluation sets" asrkd make-feats "${args[@]}"
run_stage 3 "GMM-HMM: monophone, triphone tree, forced alignment" asrkd train-gmm "${args[@]}"
run_stage 4 "baseline DNN (cross-entropy on pdf-ids)" asrkd train-dnn "${args[@]}"
run_stage 5 "decoding graph: LM on train transcripts, HCLG" asrkd make-graph "${args[@]}"
run_stage 6 "decode GMM and DNN on every evaluation set, LM weight tuned on decode.tuning_set" asrkd decode "${args[@]}"
run_stage 7 "report: frame accuracy and WER per evaluation set" asrkd evaluate "${args[@]}"
publish_to "$root/results/kaldi_data" "${args[@]}"
echo "$(date '+%F %T') done"
