"""Stage: WER through an external Kaldi WFST decoder, with Kaldi's LM-weight sweep.

Acoustic scores are a (frames x pdfs) log-likelihood matrix: for the GMM, Kaldi's own
per-Gaussian log-likelihoods; for a DNN, log-posteriors minus log-priors (pdf counts of the
training alignment, floored); for an ensemble, the log of its members' averaged posteriors
minus the same priors. The matrix is expanded to one column per transition-id and
scaled by the acoustic weight, which makes kaldi_decoder's DecodableCtc (it reads column
``index - 1``) behave as Kaldi's DecodableMatrixScaledMapped. LatticeSimpleDecoder produces a
raw lattice per utterance; each (LM weight, word insertion penalty) pair of the sweep takes
the best path of the rescaled lattice, as Kaldi's score_kaldi_wer.sh does. The pair is chosen
on ``decode.tuning_set`` (``valid``: the validation speakers of train; or a data dir such as
``dev``) and applied to every set of ``eval_sets``.

``exp/decode/<system>/``: ``wer.json`` (the sweep, the chosen pair, the WER of the tuning set,
of every eval set and, for ``decode.unseen_sentences``, of its sentences the LM never saw, with
substitutions/deletions/insertions), ``hyp_<set>.txt`` and, with
``decode.write_loglikes_ark``, ``loglikes_<set>.ark/.scp``: the unscaled (frames x pdfs)
log-likelihoods that a user's own ``latgen-faster-mapped`` decodes with its HCLG.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import kaldi_hmm_gmm as khg  # noqa: F401  (import order: kaldi_hmm_gmm before kaldi_decoder)
import kaldi_decoder
import kaldifst
import numpy as np
import torch

from asrkd.data import DataDir, read_table
from asrkd.kaldi.features import FeatureStore, write_kaldi_matrices
from asrkd.kaldi.gmm import GmmModel
from asrkd.kaldi.lang import read_symbol_table
from asrkd.nnet.model import SplicedFrames, pick_device
from asrkd.stage import account_dropped, plan, progress, write_json, write_text

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


@torch.no_grad()
def dnn_loglikes(model, frames: SplicedFrames, utt: str, priors: np.ndarray) -> np.ndarray:
    """Scaled likelihoods of the hybrid model: log p(pdf | x) - log p(pdf)."""
    start, end = frames.store.span(utt)
    device = frames.frames.device
    logits = model(frames.context(torch.arange(start, end, device=device))).float()
    return (torch.log_softmax(logits, dim=-1).cpu().numpy() - priors).astype(np.float32)


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
    import jiwer

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


def sweep(lattices: dict[str, kaldifst.Lattice | None], id2word: dict[int, str], cfg) -> dict[tuple[float, float], dict[str, str]]:
    """Hypotheses for every (LM weight, insertion penalty) pair of the sweep."""
    result: dict[tuple[float, float], dict[str, str]] = {}
    for penalty in cfg.word_ins_penalty:
        penalized = {u: (add_word_penalty(lat, penalty) if lat is not None else None) for u, lat in lattices.items()}
        for lm_weight in cfg.lmwt:
            result[(float(lm_weight), float(penalty))] = {
                u: " ".join(id2word[w] for w in best_words(lat, lm_weight, cfg.acoustic_scale)) if lat is not None else ""
                for u, lat in penalized.items()
            }
    return result


def choose_weights(dev_refs: dict[str, str], hyps: dict[tuple[float, float], dict[str, str]]) -> tuple[tuple[float, float], dict]:
    """The (LM weight, penalty) with the lowest dev WER (ties: the smaller pair), and every pair's WER."""
    dev_wer = {pair: word_error_rate(dev_refs, h)["wer"] for pair, h in hyps.items()}
    return min(dev_wer, key=lambda pair: (dev_wer[pair], pair)), dev_wer


def unseen_sentences(test_text: dict[str, str], train_text: dict[str, str]) -> list[str]:
    """Test utterances whose sentence never occurs in the training transcripts."""
    seen = set(train_text.values())
    return sorted(u for u, t in test_text.items() if t not in seen)


DECODE_KEYS = ("decode.acoustic_scale", "decode.beam", "decode.lattice_beam", "decode.prior_floor", "decode.lmwt",
               "decode.word_ins_penalty", "decode.write_loglikes_ark", "seed", "train.valid_fraction", "features.frame_shift_ms")


@functools.lru_cache(maxsize=2)
def read_graph(path: str, mtime_ns: int) -> kaldifst.StdVectorFst:
    """HCLG.fst, read once per process for all the systems it decodes (``mtime_ns``: a remade
    graph is read again)."""
    return kaldifst.StdVectorFst.read(path)


def decode_part(job: tuple[dict, str, dict[str, str], list[tuple[str, str]]]) -> dict[str, dict]:
    """One decoding job: (config, system, {set: feature store}, its (set, utterance) pairs) ->
    per set it holds, the sweep's hypotheses of those utterances, what was dropped, their
    log-likelihood matrices (when written), and the seconds spent and of audio. A job loads the
    graph and the model once."""
    from omegaconf import OmegaConf

    from asrkd.nnet.train import load_system

    cfg, system, stores, pairs = job
    sets = {set_name: [u for s, u in pairs if s == set_name] for set_name in dict.fromkeys(s for s, _ in pairs)}
    cfg = OmegaConf.create(cfg)
    exp, dcfg = Path(cfg.exp_dir), cfg.decode
    graph = exp / "graph" / "HCLG.fst"
    hclg = read_graph(str(graph), graph.stat().st_mtime_ns)
    id2word = {i: w for w, i in read_symbol_table(exp / "graph" / "words.txt").items()}
    gmm = GmmModel.load(exp / "tri")
    tid_to_pdf = gmm.tid_to_pdf()
    if system == "gmm":
        feats = {name: FeatureStore.load(exp / "feats" / "mfcc" / name, mmap=False) for name in {stores[s] for s in sets}}
        score = lambda name, utt: gmm_loglikes(gmm, feats[name][utt])  # noqa: E731
    else:
        device = pick_device(cfg.train.device)
        priors = log_priors(np.load(exp / "tri" / "ali_train" / "pdf_counts.npy"), dcfg.prior_floor)
        model = load_system(exp, system, device)
        model.eval()
        frames = {name: SplicedFrames(FeatureStore.load(exp / "feats" / "fbank" / name, mmap=False),
                                      model.config["left_context"], model.config["right_context"], device)
                  for name in {stores[s] for s in sets}}
        score = lambda name, utt: dnn_loglikes(model, frames[name], utt, priors)  # noqa: E731
    out = {}
    for set_name, utts in sets.items():
        store_name = stores[set_name]
        lattices, dropped, matrices = {}, {}, {}
        decode_seconds, audio_seconds = 0.0, 0.0
        for utt in progress(utts, f"decode {system} {set_name}", unit="utterances"):
            tic = time.time()
            try:
                loglikes = score(store_name, utt)
            except KeyError:
                dropped[utt] = f"utterance {utt}: no features"
                continue
            check_scores(utt, loglikes, len(loglikes), gmm.num_pdfs)
            if dcfg.write_loglikes_ark:
                matrices[utt] = loglikes
            lattices[utt] = decode_lattice(hclg, transition_id_matrix(loglikes, tid_to_pdf, dcfg.acoustic_scale), dcfg.beam, dcfg.lattice_beam)
            decode_seconds += time.time() - tic
            audio_seconds += len(loglikes) * cfg.features.frame_shift_ms / 1000
            if lattices[utt] is None:
                dropped[utt] = f"utterance {utt}: no path survived the beam (scored as all deletions)"
        out[set_name] = {"hyps": sweep(lattices, id2word, dcfg), "dropped": dropped, "matrices": matrices,
                         "decode_seconds": decode_seconds, "audio_seconds": audio_seconds}
    return out


# decode settings that decide a decode only when set away from these (AN4's) defaults
DECODE_OPTIONAL_KEYS = {"eval_sets": ["test"], "decode.tuning_set": "valid", "decode.unseen_sentences": ["test"]}


def scored_sets(cfg) -> dict[str, tuple[str, dict[str, str]]]:
    """{set: (its feature store, its references)}: the tuning set (``valid``: train's held-out
    speakers, or a data dir), then every eval set."""
    from asrkd.data import eval_sets, tuning_set
    from asrkd.nnet.train import data_split

    data_dir = Path(cfg.data_dir)
    tuning = tuning_set(cfg)
    if tuning == "valid":
        _, valid_utts = data_split(cfg)
        train_text = read_table(data_dir / "train" / "text")
        sets = {"valid": ("train", {u: train_text[u] for u in valid_utts})}
    else:
        sets = {tuning: (tuning, DataDir.read(data_dir / tuning).text)}
    for name in eval_sets(cfg):
        sets[name] = (name, DataDir.read(data_dir / name).text)
    for name, (_, refs) in sets.items():
        if not refs:
            raise ValueError(f"{data_dir / name}: no transcripts (text) to score against; decode needs them")
    unknown = sorted(set(cfg.decode.unseen_sentences) - set(eval_sets(cfg)))
    if unknown:
        raise ValueError(f"decode.unseen_sentences names {unknown}, which are not in eval_sets {list(eval_sets(cfg))}")
    return sets


def run(cfg) -> None:
    """Stage 6: decode every system of ``decode.systems`` (the GMM, DNNs, ensembles) on the tuning
    set and every eval set, each set's utterances split over ``jobs.nj`` jobs; the LM weight and
    insertion penalty are chosen on the tuning set and applied to the eval sets."""
    from omegaconf import OmegaConf

    from asrkd.data import eval_sets, tuning_set
    from asrkd.jobs import map_jobs, num_jobs, split
    from asrkd.stage import optional_values
    from asrkd.nnet.train import system_dirs

    exp, data_dir = Path(cfg.exp_dir), Path(cfg.data_dir)
    dcfg = cfg.decode
    id2word = {i: w for w, i in read_symbol_table(exp / "graph" / "words.txt").items()}
    lm_text = read_table(data_dir / cfg.graph.lm_data / "text")
    sets = scored_sets(cfg)
    tuning, evaluated = tuning_set(cfg), eval_sets(cfg)
    settings = OmegaConf.to_container(cfg, resolve=True)
    stores = {set_name: store for set_name, (store, _) in sets.items()}
    pairs = [(set_name, utt) for set_name, (_, refs) in sets.items() for utt in sorted(refs)]

    for system in dcfg.systems:
        out_dir = exp / "decode" / system
        kind = "mfcc" if system == "gmm" else "fbank"
        models = {"model": exp / "tri"} if system == "gmm" else {f"model {d.name}": d for d in system_dirs(exp, system)}
        inputs = {**models, "graph": exp / "graph", "priors": exp / "tri" / "ali_train", "train": data_dir / "train",
                  **{store: data_dir / store for store in stores.values()},
                  **{f"{store} features": exp / "feats" / kind / store for store in stores.values()}}
        stage = plan(f"decode {system}", out_dir, cfg, DECODE_KEYS, inputs, {"system": system, **optional_values(cfg, DECODE_OPTIONAL_KEYS)})
        if stage.up_to_date:
            continue
        jobs = [(settings, system, stores, part) for part in split(pairs, num_jobs(cfg))]
        results = map_jobs(cfg, decode_part, jobs, f"decode {system}", threads=int(cfg.train.num_threads))
        hyps, decode_seconds, audio_seconds = {}, 0.0, 0.0
        for set_name, (_, refs) in sets.items():
            dropped, matrices, hyps[set_name] = {}, {}, {}
            for part in (result[set_name] for result in results if set_name in result):  # in utterance order, as one job's
                dropped |= part["dropped"]
                matrices |= part["matrices"]
                decode_seconds += part["decode_seconds"]
                audio_seconds += part["audio_seconds"]
                for pair, part_hyps in part["hyps"].items():
                    hyps[set_name].setdefault(pair, {}).update(part_hyps)
            account_dropped(f"decode {system} {set_name}", len(refs), dropped, cfg.prep.max_drop_fraction, out_dir / f"dropped_{set_name}.json")
            if matrices:
                write_kaldi_matrices(out_dir / f"loglikes_{set_name}.ark", out_dir / f"loglikes_{set_name}.scp", matrices.items())
        best, tuning_wer = choose_weights(sets[tuning][1], hyps[tuning])
        vocabulary = set(id2word.values())
        oov = sorted({w for name in evaluated for t in sets[name][1].values() for w in t.split() if w not in vocabulary})
        if oov:  # they count as errors: no path of the graph can output them
            log.warning("decode %s: references hold %d word types outside the graph's vocabulary: %s", system, len(oov), oov[:10])
        result = {"system": system, "lmwt": best[0], "word_ins_penalty": best[1], "tuning_set": tuning,
                  tuning: word_error_rate(sets[tuning][1], hyps[tuning][best])}
        for name in evaluated:
            result[name] = word_error_rate(sets[name][1], hyps[name][best])
        for name in dcfg.unseen_sentences:
            refs = sets[name][1]
            result[f"{name}_unseen"] = word_error_rate({u: refs[u] for u in unseen_sentences(refs, lm_text)}, hyps[name][best])
        result |= {
            f"sweep_{tuning}_wer": [{"lmwt": p[0], "word_ins_penalty": p[1], "wer": w} for p, w in sorted(tuning_wer.items())],
            "real_time_factor": decode_seconds / max(audio_seconds, 1e-9),
            "reference_oov_words": oov,
            "beam": dcfg.beam, "lattice_beam": dcfg.lattice_beam, "acoustic_scale": dcfg.acoustic_scale,
            "utterance_errors": {name: utterance_errors(sets[name][1], hyps[name][best]) for name in evaluated},
        }
        write_json(out_dir / "wer.json", result)
        for set_name in sets:
            write_text(out_dir / f"hyp_{set_name}.txt", "".join(f"{u} {h}\n" for u, h in sorted(hyps[set_name][best].items())))
        log.info("decode %s: LMWT %g, penalty %g (%s WER %.2f%%) -> %s, RTF %.3f", system, best[0], best[1], tuning,
                 100 * result[tuning]["wer"], ", ".join(f"{name} WER {100 * result[name]['wer']:.2f}%" for name in evaluated),
                 result["real_time_factor"])
        stage.commit(**{f"{name}_wer": result[name]["wer"] for name in evaluated}, lmwt=best[0], word_ins_penalty=best[1])
