#!/usr/bin/env python3
"""Decoding speed on CPU: real-time factor of the Kaldi WFST decoder and how it grows with the beam.

    python bench/bench_decode.py [--exp-dir recipes/an4/exp] [--data-dir recipes/an4/data]
                                 [--system baseline] [--beams 8 10 13 16] [hydra overrides]

Needs a finished recipe (graph, GMM, the DNN). Acoustic scores are computed once; each beam
then decodes the whole test set from them, so the RTF is the decoder's alone (scoring is
reported separately). WER at the system's chosen LM weight shows what a narrower beam costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd.kaldi import decode  # noqa: E402
from asrkd.cli import load_config  # noqa: E402
from asrkd.data import DataDir  # noqa: E402
from asrkd.stores import FeatureStore  # noqa: E402
from asrkd.kaldi.gmm import GmmModel  # noqa: E402
from asrkd.kaldi.lang import read_symbol_table  # noqa: E402
from asrkd.nnet.model import SplicedFrames  # noqa: E402
from asrkd.nnet.decode import dnn_loglikes  # noqa: E402
from asrkd.nnet.train import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exp-dir", type=Path, default=Path("recipes/an4/exp"))
    parser.add_argument("--data-dir", type=Path, default=Path("recipes/an4/data"))
    parser.add_argument("--system", default="baseline")
    parser.add_argument("--beams", type=float, nargs="+", default=[8.0, 10.0, 13.0, 16.0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    torch.set_num_threads(int(cfg.train.num_threads))
    exp = args.exp_dir
    hclg = decode.kaldifst.StdVectorFst.read(str(exp / "graph" / "HCLG.fst"))
    id2word = {i: w for w, i in read_symbol_table(exp / "graph" / "words.txt").items()}
    gmm = GmmModel.load(exp / "tri")
    chosen = json.loads((exp / "decode" / args.system / "wer.json").read_text())
    test = DataDir.read(args.data_dir / "test")

    tic = time.perf_counter()
    if args.system == "gmm":
        feats = FeatureStore.load(exp / "feats" / "mfcc" / "test", mmap=False)
        scores = {u: decode.gmm_loglikes(gmm, feats[u]) for u in feats.utt_ids}
    else:
        model = load_model(exp / "dnn" / args.system / "final.pt", torch.device("cpu")).eval()
        frames = SplicedFrames(FeatureStore.load(exp / "feats" / "fbank" / "test", mmap=False), model.config["left_context"], model.config["right_context"])
        priors = decode.log_priors(np.load(exp / "tri" / "ali_train" / "pdf_counts.npy"), cfg.decode.prior_floor)
        scores = {u: dnn_loglikes(model, frames, u, priors) for u in frames.store.utt_ids}
    scoring_seconds = time.perf_counter() - tic
    audio_seconds = sum(len(s) for s in scores.values()) * cfg.features.frame_shift_ms / 1000
    tid_to_pdf = gmm.tid_to_pdf()
    matrices = {u: decode.transition_id_matrix(s, tid_to_pdf, cfg.decode.acoustic_scale) for u, s in scores.items()}

    rows = []
    for beam in args.beams:
        tic = time.perf_counter()
        lattices = {u: decode.decode_lattice(hclg, m, beam, cfg.decode.lattice_beam) for u, m in matrices.items()}
        seconds = time.perf_counter() - tic
        hyps = {u: " ".join(id2word[w] for w in decode.best_words(decode.add_word_penalty(lat, chosen["word_ins_penalty"]), chosen["lmwt"], cfg.decode.acoustic_scale)) if lat is not None else ""
                for u, lat in lattices.items()}
        rows.append({"beam": beam, "lattice_beam": cfg.decode.lattice_beam, "decode_seconds": round(seconds, 2),
                     "real_time_factor": round(seconds / audio_seconds, 4), "test_wer": round(decode.word_error_rate(test.text, hyps)["wer"], 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({
        "benchmark": "decode_rtf", "command": " ".join(["python", *sys.argv]), "system": args.system,
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        "test_audio_seconds": round(audio_seconds, 1), "lmwt": chosen["lmwt"], "word_ins_penalty": chosen["word_ins_penalty"],
        "scoring_seconds": round(scoring_seconds, 2), "scoring_real_time_factor": round(scoring_seconds / audio_seconds, 4),
        "beams": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
