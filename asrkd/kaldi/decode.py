"""Kaldi's WFST decoding of acoustic scores, with Kaldi's LM-weight sweep and WER.

Acoustic scores are a (frames x pdfs) log-likelihood matrix (the GMM's here, Kaldi's own
per-Gaussian log-likelihoods; a DNN's come from asrkd.nnet.decode, the stage that decodes
systems). The matrix is expanded to one column per transition-id and scaled by the acoustic
weight, which makes kaldi_decoder's DecodableCtc (it reads column ``index - 1``) behave as
Kaldi's DecodableMatrixScaledMapped. LatticeSimpleDecoder produces a raw lattice per
utterance; each (LM weight, word insertion penalty) pair of the sweep takes the best path of
the rescaled lattice, as Kaldi's score_kaldi_wer.sh does, and the pair is chosen on the tuning
set's WER.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import kaldi_hmm_gmm as khg  # noqa: F401  (import order: kaldi_hmm_gmm before kaldi_decoder)
import jiwer
import kaldi_decoder
import kaldifst
import numpy as np

from asrkd.kaldi.gmm_model import GmmModel

log = logging.getLogger(__name__)


def gmm_loglikes(model: GmmModel, feats: np.ndarray) -> np.ndarray:
    """(T, pdfs) log-likelihoods of each pdf's GMM (Kaldi computes the per-Gaussian terms)."""
    x = np.ascontiguousarray(feats, dtype=np.float32)
    columns = []
    for pdf in range(model.num_pdfs):
        per_gauss = model.am.get_pdf(pdf).log_likelihoods_matrix(x)
        top = per_gauss.max(axis=1, keepdims=True)
        columns.append((top + np.log(np.exp(per_gauss - top).sum(axis=1, keepdims=True)))[:, 0])
    return np.stack(columns, axis=1)


def log_priors(pdf_counts: np.ndarray, floor: float) -> np.ndarray:
    """log P(pdf) from alignment counts, floored so unseen pdfs do not get infinite scores."""
    priors = np.maximum(pdf_counts / max(pdf_counts.sum(), 1), floor)
    return np.log(priors / priors.sum())


def check_scores(utt: str, scores: np.ndarray, num_frames: int, num_pdfs: int) -> None:
    """Clear errors for score matrices a decoder would silently misread."""
    if scores.ndim != 2 or scores.shape[1] != num_pdfs:
        raise ValueError(f"utterance {utt}: score matrix has shape {scores.shape}, expected (frames, {num_pdfs} pdfs)")
    if scores.shape[0] != num_frames:
        raise ValueError(f"utterance {utt}: {scores.shape[0]} score rows for {num_frames} frames")
    if not np.isfinite(scores).all():
        raise ValueError(f"utterance {utt}: {int((~np.isfinite(scores)).sum())} NaN/inf scores")


def transition_id_matrix(loglikes: np.ndarray, tid_to_pdf: np.ndarray, acoustic_scale: float) -> np.ndarray:
    """Column t-1 holds transition-id t's pdf score times the acoustic scale (DecodableCtc's layout)."""
    return np.ascontiguousarray(acoustic_scale * loglikes[:, tid_to_pdf[1:]], dtype=np.float32)


def decode_lattice(hclg: kaldifst.StdVectorFst, scores: np.ndarray, beam: float, lattice_beam: float) -> kaldifst.Lattice | None:
    """Raw (undeterminized) lattice of one utterance; None when no path reaches the end."""
    config = kaldi_decoder.LatticeSimpleDecoderConfig(beam=beam, lattice_beam=lattice_beam)
    decoder = kaldi_decoder.LatticeSimpleDecoder(hclg, config)
    decoder.decode(kaldi_decoder.DecodableCtc(scores))
    ok, lattice = decoder.get_raw_lattice(use_final_probs=True)
    if not ok or lattice.num_states == 0:
        ok, lattice = decoder.get_raw_lattice(use_final_probs=False)  # partial, as Kaldi's --allow-partial
        if not ok or lattice.num_states == 0:
            return None
    return lattice


def lattice_arcs(lattice: kaldifst.Lattice, state: int) -> list:
    """Arcs leaving ``state`` (kaldifst's public ArcIterator takes only tropical FSTs)."""
    from _kaldifst import _ArcIteratorLattice

    iterator, arcs = _ArcIteratorLattice(lattice, state), []
    while not iterator.done:
        arcs.append(iterator.value)
        iterator.next()
    return arcs


def add_word_penalty(lattice: kaldifst.Lattice, penalty: float) -> kaldifst.Lattice:
    """lattice-add-penalty: ``penalty`` more graph cost on every word arc."""
    out = lattice.copy()
    if penalty == 0:
        return out
    for state in range(out.num_states):
        arcs = lattice_arcs(out, state)
        if not any(arc.olabel for arc in arcs):
            continue
        out.delete_arcs(state, len(arcs))
        for arc in arcs:
            weight = arc.weight
            if arc.olabel:
                weight = kaldifst.LatticeWeight(weight.value1 + penalty, weight.value2)
            out.add_arc(state=state, arc=kaldifst.LatticeArc(arc.ilabel, arc.olabel, weight, arc.nextstate))
    return out


def best_words(lattice: kaldifst.Lattice, lm_weight: float, decode_acoustic_scale: float) -> list[int]:
    """Best path with acoustics weighted 1/lm_weight relative to the graph (lattice-scale + best-path)."""
    best = kaldifst.lattice_to_nbest(lattice, acoustic_scale=1.0 / (decode_acoustic_scale * lm_weight), lm_scale=1.0, n=1)
    if not best:
        return []
    path, words = best[0], []
    state = path.start
    while state >= 0:
        arcs = lattice_arcs(path, state)
        if not arcs:
            break
        words += [arc.olabel for arc in arcs[:1] if arc.olabel]
        state = arcs[0].nextstate
    return words


def word_error_rate(refs: dict[str, str], hyps: dict[str, str]) -> dict:
    """WER with substitutions/deletions/insertions (jiwer); an utterance without output counts as all deleted."""
    utts = sorted(refs)
    out = jiwer.process_words([refs[u] for u in utts], [hyps.get(u, "") for u in utts])
    words = sum(len(refs[u].split()) for u in utts)
    return {"wer": out.wer, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "words": words, "utterances": len(utts)}


def utterance_errors(refs: dict[str, str], hyps: dict[str, str]) -> dict[str, list[int]]:
    """{utt: [word errors, reference words]} with :func:`word_error_rate`'s counting: what the
    bootstrap resamples (asrkd.stats)."""
    out = {}
    for utt in sorted(refs):
        counts = word_error_rate({utt: refs[utt]}, {utt: hyps.get(utt, "")})
        out[utt] = [counts["substitutions"] + counts["deletions"] + counts["insertions"], counts["words"]]
    return out


def sweep(lattices: dict[str, kaldifst.Lattice | None], id2word: dict[int, str], options) -> dict[tuple[float, float], dict[str, str]]:
    """Hypotheses for every (LM weight, insertion penalty) pair of the sweep (``options``: the ``decode`` section)."""
    result: dict[tuple[float, float], dict[str, str]] = {}
    for penalty in options.word_ins_penalty:
        penalized = {u: (add_word_penalty(lat, penalty) if lat is not None else None) for u, lat in lattices.items()}
        for lm_weight in options.lmwt:
            result[(float(lm_weight), float(penalty))] = {
                u: " ".join(id2word[w] for w in best_words(lat, lm_weight, options.acoustic_scale)) if lat is not None else ""
                for u, lat in penalized.items()
            }
    return result


def choose_weights(dev_refs: dict[str, str], hyps: dict[tuple[float, float], dict[str, str]]) -> tuple[tuple[float, float], dict]:
    """The (LM weight, penalty) with the lowest dev WER (ties: the smaller pair), and every pair's WER."""
    dev_wer = {pair: word_error_rate(dev_refs, h)["wer"] for pair, h in hyps.items()}
    return min(dev_wer, key=lambda pair: (dev_wer[pair], pair)), dev_wer


TIE_ERRORS = 2  # a chosen (LM weight, penalty) that beats another by at most this many word errors is a tie


def choice_margin(dev_wer: dict[tuple[float, float], float], best: tuple[float, float], words: int) -> dict:
    """How clearly the sweep's point was chosen: its word errors on the tuning set, the runner-up's
    (the best other point), the margin, and every point within ``TIE_ERRORS`` of it. A margin of at
    most that is a tie, broken by the rule of :func:`choose_weights` (the smallest LM weight, then
    penalty, among the lowest WER): on a tuning set the system trained on, every point ties."""
    errors = {pair: round(wer * words) for pair, wer in dev_wer.items()}
    others = sorted((errors[pair], pair) for pair in errors if pair != best)
    margin = others[0][0] - errors[best] if others else None
    return {"errors": errors[best], "words": words,
            "runner_up": {"lmwt": others[0][1][0], "word_ins_penalty": others[0][1][1], "errors": others[0][0]} if others else None,
            "margin_errors": margin, "tie": margin is not None and margin <= TIE_ERRORS, "tie_errors": TIE_ERRORS,
            "within_tie": [[lmwt, penalty] for lmwt, penalty in sorted(p for p in errors if errors[p] - errors[best] <= TIE_ERRORS)],
            "tie_broken_by": "the smallest LM weight, then insertion penalty, among the lowest WER"}


NOT_IN_LM = "not in the LM"  # a reference word's cause of being out of the vocabulary when make-graph gave none


def out_of_vocabulary(refs: dict[str, str], vocabulary: set[str], left_out: dict[str, str] | None = None, listed: int = 20) -> dict:
    """How much of a set's references the decoder cannot output: the share of word tokens outside
    ``vocabulary`` (the LM's), the number of such word types and the ``listed`` most frequent, and
    the same by cause (``causes``): why the graph lacks each word, from ``left_out`` (the LM's
    words make-graph left out, with its reason), else not in the LM; each cause has its own fix."""
    counts = Counter(w for text in refs.values() for w in text.split() if w not in vocabulary)
    tokens = sum(len(text.split()) for text in refs.values())
    causes: dict[str, Counter] = {}
    for word, n in counts.items():
        causes.setdefault((left_out or {}).get(word, NOT_IN_LM), Counter())[word] = n
    return {"tokens": tokens, "oov_tokens": sum(counts.values()), "oov_rate": sum(counts.values()) / max(tokens, 1),
            "oov_types": len(counts), "oov_words": dict(counts.most_common(listed)),
            "causes": {cause: {"tokens": sum(words.values()), "types": len(words), "words": dict(words.most_common(listed))}
                       for cause, words in sorted(causes.items(), key=lambda item: (-sum(item[1].values()), item[0]))}}


def unseen_sentences(test_text: dict[str, str], train_text: dict[str, str]) -> list[str]:
    """Test utterances whose sentence never occurs in the training transcripts."""
    seen = set(train_text.values())
    return sorted(u for u, t in test_text.items() if t not in seen)


@functools.lru_cache(maxsize=2)
def read_graph(path: str, mtime_ns: int) -> kaldifst.StdVectorFst:
    """HCLG.fst, read once per process for all the systems it decodes (``mtime_ns``: a remade
    graph is read again)."""
    return kaldifst.StdVectorFst.read(path)
