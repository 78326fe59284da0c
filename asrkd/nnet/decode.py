"""Stage 6: decode every system of ``decode.systems`` (the GMM, DNNs, ensembles) with Kaldi's
decoder (asrkd.kaldi.decode) and choose the LM weight on the tuning set.

A DNN's scores are log-posteriors minus log-priors (pdf counts of the training alignment,
floored); an ensemble's, the log of its members' averaged posteriors minus the same priors;
the GMM's, Kaldi's own log-likelihoods. The pair (LM weight, word insertion penalty) is chosen
on ``decode.tuning_set`` (``valid``: the validation speakers of train; or a data dir such as
``dev``) and applied to every set of ``eval_sets``.

``exp/decode/<system>/``: ``wer.json`` (the sweep, the chosen pair, the WER of the tuning set,
of every eval set and, for ``decode.unseen_sentences``, of its sentences the LM never saw, with
substitutions/deletions/insertions), ``hyp_<set>.txt`` and, with
``decode.write_loglikes_ark``, ``loglikes_<set>.ark/.scp``: the unscaled (frames x pdfs)
log-likelihoods that a user's own ``latgen-faster-mapped`` decodes with its HCLG.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import DataDir, DataSets, Split, read_table
from asrkd.drops import account_dropped
from asrkd.files import write_json, write_text
from asrkd.jobs import map_jobs, split
from asrkd.kaldi.decode import (check_scores, choice_margin, choose_weights, decode_lattice, gmm_loglikes, log_priors, read_graph, sweep,
                                transition_id_matrix, unseen_sentences, utterance_errors, word_error_rate)
from asrkd.kaldi.gmm_model import GmmModel
from asrkd.kaldi.graph import language_model
from asrkd.kaldi.lang import read_symbol_table
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import load_system, system_dirs
from asrkd.nnet.model import SplicedFrames
from asrkd.parallel import pick_device
from asrkd.progress import progress
from asrkd.stage import Settings, Stage, plan, read_record
from asrkd.stores import FeatureStore, write_kaldi_matrices

log = logging.getLogger(__name__)


DECODE_KEYS = ("decode.acoustic_scale", "decode.beam", "decode.lattice_beam", "decode.prior_floor", "decode.lmwt",
               "decode.word_ins_penalty", "decode.write_loglikes_ark", "seed", "train.valid_fraction", "features.frame_shift_ms")


@torch.no_grad()
def dnn_loglikes(model, frames: SplicedFrames, utt: str, priors: np.ndarray) -> np.ndarray:
    """Scaled likelihoods of the hybrid model: log p(pdf | x) - log p(pdf)."""
    start, end = frames.store.span(utt)
    device = frames.device
    logits = model(frames.context(torch.arange(start, end, device=device))).float()
    return (torch.log_softmax(logits, dim=-1).cpu().numpy() - priors).astype(np.float32)


def decode_part(job: tuple[dict, str, dict[str, str], list[tuple[str, str]]]) -> dict[str, dict]:
    """One decoding job: (config, system, {set: feature store}, its (set, utterance) pairs) ->
    per set it holds, the sweep's hypotheses of those utterances, what was dropped, their
    log-likelihood matrices (when written), and the seconds spent and of audio. A job loads the
    graph and the model once."""
    cfg, system, stores, pairs = job
    sets = {set_name: [u for s, u in pairs if s == set_name] for set_name in dict.fromkeys(s for s, _ in pairs)}
    cfg = OmegaConf.create(cfg)
    exp, layout, dcfg = Path(cfg.exp_dir), sections.layout(cfg), cfg.decode
    graph = layout.graph / "HCLG.fst"
    hclg = read_graph(str(graph), graph.stat().st_mtime_ns)
    id2word = {i: w for w, i in read_symbol_table(layout.graph / "words.txt").items()}
    gmm = GmmModel.load(layout.gmm)
    tid_to_pdf = gmm.tid_to_pdf()
    if system == "gmm":
        feats = {name: FeatureStore.load(layout.mfcc(name)) for name in {stores[s] for s in sets}}
        score = lambda name, utt: gmm_loglikes(gmm, feats[name][utt])  # noqa: E731
    else:
        device = pick_device(cfg.train.device)
        priors = log_priors(np.load(layout.pdf_counts), dcfg.prior_floor)
        model = load_system(exp, system, device)
        model.eval()
        frames = {name: SplicedFrames(FeatureStore.load(layout.fbank(name)),
                                      model.config["left_context"], model.config["right_context"], device)
                  for name in {stores[s] for s in sets}}
        score = lambda name, utt: dnn_loglikes(model, frames[name], utt, priors)  # noqa: E731
    out = {}
    for set_name, utts in sets.items():
        store_name = stores[set_name]
        hyps = sweep({}, id2word, dcfg)  # every pair of the sweep, filled an utterance at a time: no set's lattices are held
        dropped, matrices = {}, {}
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
            lattice = decode_lattice(hclg, transition_id_matrix(loglikes, tid_to_pdf, dcfg.acoustic_scale), dcfg.beam, dcfg.lattice_beam)
            decode_seconds += time.time() - tic
            audio_seconds += len(loglikes) * cfg.features.frame_shift_ms / 1000
            if lattice is None:
                dropped[utt] = f"utterance {utt}: no path survived the beam (scored as all deletions)"
            for pair, hyp in sweep({utt: lattice}, id2word, dcfg).items():
                hyps[pair].update(hyp)
        out[set_name] = {"hyps": hyps, "dropped": dropped, "matrices": matrices, "decode_seconds": decode_seconds,
                         "audio_seconds": audio_seconds}
    return out


# decode settings that decide a decode only when set away from these (AN4's) defaults
DECODE_OPTIONAL_KEYS = {"eval_sets": ["test"], "decode.tuning_set": "valid", "decode.unseen_sentences": ["test"]}


def scored_sets(data_sets: DataSets, split: Split) -> dict[str, tuple[str, dict[str, str]]]:
    """{set: (its feature store, its references)}: the tuning set (``valid``: train's held-out
    speakers of ``split``, or a data dir), then every eval set."""
    data_dir = split.data_dir
    if data_sets.tuning == "valid":
        _, valid_utts = split.utterances()
        train_text = read_table(data_dir / "train" / "text")
        sets = {"valid": ("train", {u: train_text[u] for u in valid_utts})}
    else:
        sets = {data_sets.tuning: (data_sets.tuning, DataDir.read(data_dir / data_sets.tuning).text)}
    for name in data_sets.evaluated:
        sets[name] = (name, DataDir.read(data_dir / name).text)
    for name, (_, refs) in sets.items():
        if not refs:
            raise ValueError(f"{data_dir / name}: no transcripts (text) to score against; decode needs them")
    return sets


@dataclass(frozen=True)
class DecodePlan:
    """The decode stages of a config: where they write (``layout``), what their fingerprints hold
    (``settings``: DECODE_KEYS; ``optional``: the DECODE_OPTIONAL_KEYS set away from their defaults)
    and which sets they score (``data_sets``)."""

    layout: Layout
    settings: Settings
    optional: dict
    data_sets: DataSets

    def stage(self, system: str, sets: dict[str, tuple[str, dict[str, str]]], writer: bool = True, extend: bool = False) -> Stage:
        """The decode stage of ``system`` over ``sets`` (its inputs: the model, graph, priors and each set's data and features)."""
        layout = self.layout
        kind = "mfcc" if system == "gmm" else "fbank"
        stores = list(dict.fromkeys(store for store, _ in sets.values()))
        models = {"model": layout.gmm} if system == "gmm" else {f"model {d.name}": d for d in system_dirs(layout.exp, system)}
        inputs = {**models, "graph": layout.graph, "priors": layout.alignment("train"), "train": layout.data_dir("train"),
                  **{store: layout.data_dir(store) for store in stores}, **{f"{store} features": layout.features(kind, store) for store in stores}}
        return plan(f"decode {system}", layout.decode(system), self.settings, inputs, {"system": system, **self.optional},
                    writer=writer, extend=extend)

    def decoded_before(self, system: str, sets: dict[str, tuple[str, dict[str, str]]], unseen: set[str]) -> list[str] | None:
        """The eval sets of ``system``'s decode when it is complete and current for the config but for
        eval sets added since (as Kaldi decodes a new set into a directory of its own, nothing else
        is redone: the LM weight stays the one chosen on the tuning set); else None. ``sets``: the
        config's scored sets (:func:`scored_sets`), of which the earlier ones are a part; ``unseen``:
        ``decode.unseen_sentences``. ``redo`` remakes only what changed, here as in every stage: the
        earlier sets' decode is kept when it is current, and redone whole when its model, graph or
        code changed."""
        record = read_record(self.layout.decode(system))
        if record is None:
            return None
        default = DECODE_OPTIONAL_KEYS["eval_sets"]
        before, now = record["config"].get("eval_sets", default), self.data_sets.evaluated
        if not set(before) < set(now) or unseen - set(before):
            return None
        earlier = replace(self, optional={key: value for key, value in self.optional.items() if key != "eval_sets"}
                          | ({} if list(before) == default else {"eval_sets": list(before)}))
        earlier_sets = {name: sets[name] for name in (self.data_sets.tuning, *before)}
        return before if earlier.stage(system, earlier_sets, writer=False).up_to_date else None


def run(cfg, systems: list[str] | None = None) -> None:
    """Stage 6: decode every system of ``decode.systems`` (or ``systems``: an experiment's, each
    once, in order; the GMM, DNNs, ensembles) on the tuning set and every eval set, each set's
    utterances split over ``jobs.nj`` jobs; the LM weight and insertion penalty are chosen on the
    tuning set and applied to the eval sets. A decode that is current but for eval sets added
    since decodes those alone, with the weights it chose."""
    layout, data_sets, jobs_of = sections.layout(cfg), sections.data_sets(cfg), sections.jobs(cfg)
    dcfg = cfg.decode
    unseen = {str(name) for name in dcfg.unseen_sentences}
    if unseen - set(data_sets.evaluated):
        raise ValueError(f"decode.unseen_sentences names {sorted(unseen - set(data_sets.evaluated))}, which are not in "
                         f"eval_sets {list(data_sets.evaluated)}")
    id2word = {i: w for w, i in read_symbol_table(layout.graph / "words.txt").items()}
    lm_text = read_table(layout.data_dir(str(cfg.graph.lm_data)) / "text")
    sets = scored_sets(data_sets, sections.split(cfg))
    tuning, evaluated = data_sets.tuning, data_sets.evaluated
    decode_plan = DecodePlan(layout, sections.settings(cfg, DECODE_KEYS), sections.optional_values(cfg, DECODE_OPTIONAL_KEYS), data_sets)
    settings = OmegaConf.to_container(cfg, resolve=True)
    stores = {set_name: store for set_name, (store, _) in sets.items()}

    for system in (dcfg.systems if systems is None else list(dict.fromkeys(systems))):
        out_dir = layout.decode(system)
        before = decode_plan.decoded_before(system, sets, unseen)
        stage = decode_plan.stage(system, sets, extend=before is not None)
        if stage.up_to_date:
            continue
        decoding = {name: refs for name, (_, refs) in sets.items() if before is None or name not in (tuning, *before)}
        if before is not None:
            log.info("decode %s: %s added to %s; the sets decoded before and their LM weight stay", system, ", ".join(decoding), out_dir)
        pairs = [(set_name, utt) for set_name, refs in decoding.items() for utt in sorted(refs)]
        jobs = [(settings, system, stores, part) for part in split(pairs, jobs_of.nj)]
        results = map_jobs(jobs_of, decode_part, jobs, f"decode {system}", threads=int(cfg.train.num_threads))
        hyps, decode_seconds, audio_seconds = {}, 0.0, 0.0
        for set_name, refs in decoding.items():
            dropped, matrices, hyps[set_name] = {}, {}, {}
            for part in (result[set_name] for result in results if set_name in result):  # in utterance order, as one job's
                dropped |= part["dropped"]
                matrices |= part["matrices"]
                decode_seconds += part["decode_seconds"]
                audio_seconds += part["audio_seconds"]
                for pair, part_hyps in part["hyps"].items():
                    hyps[set_name].setdefault(pair, {}).update(part_hyps)
            # every set decoded (the tuning set, the eval sets) is scored only: its drops are counted and listed, never fatal
            account_dropped(f"decode {system} {set_name} (scored only: drops never stop the stage)", len(refs), dropped, 1.0,
                            out_dir / f"dropped_{set_name}.json")
            if matrices:
                write_kaldi_matrices(out_dir / f"loglikes_{set_name}.ark", out_dir / f"loglikes_{set_name}.scp", matrices.items())
        vocabulary = language_model(cfg).vocabulary() & set(id2word.values())
        oov = sorted({w for name in evaluated for t in sets[name][1].values() for w in t.split() if w not in vocabulary})
        if oov:  # they count as errors: no path of the graph can output them (the report gives each set's rate)
            log.warning("decode %s: references hold %d word types outside the LM's vocabulary: %s", system, len(oov), oov[:10])
        if before is None:
            best, tuning_wer = choose_weights(sets[tuning][1], hyps[tuning])
            result = {"system": system, "lmwt": best[0], "word_ins_penalty": best[1], "tuning_set": tuning,
                      tuning: word_error_rate(sets[tuning][1], hyps[tuning][best])}
            result["choice"] = choice_margin(tuning_wer, best, result[tuning]["words"])
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
        else:  # the earlier sets' results as they are; the new ones at the weights chosen then
            result = json.loads((out_dir / "wer.json").read_text())
            best = (result["lmwt"], result["word_ins_penalty"])
            for name in decoding:
                result[name] = word_error_rate(sets[name][1], hyps[name][best])
                result["utterance_errors"][name] = utterance_errors(sets[name][1], hyps[name][best])
            result["reference_oov_words"] = oov
        write_json(out_dir / "wer.json", result)
        for set_name in decoding:
            write_text(out_dir / f"hyp_{set_name}.txt", "".join(f"{u} {h}\n" for u, h in sorted(hyps[set_name][best].items())))
        log.info("decode %s: LMWT %g, penalty %g (%s WER %.2f%%) -> %s, RTF %.3f", system, best[0], best[1], tuning,
                 100 * result[tuning]["wer"], ", ".join(f"{name} WER {100 * result[name]['wer']:.2f}%" for name in evaluated),
                 result["real_time_factor"])
        stage.commit(**{f"{name}_wer": result[name]["wer"] for name in evaluated}, lmwt=best[0], word_ins_penalty=best[1])
