"""The GMM-HMM system and the forced alignment: Kaldi's train_mono.sh -> train_deltas.sh -> align_si.sh.

The EM updates, graph compilation and Viterbi alignment are Kaldi's own code (k2-fsa's
``kaldi-hmm-gmm``); the triphone tree is grown here (see :mod:`asrkd.kaldi.tree`), the EM
statistics are computed here in jobs and summed (:func:`asrkd.kaldi.gmm_em.gmm_stats`: the wheel's accumulators
neither pickle nor add up across processes), and Gaussians are split with a seeded generator
(:func:`asrkd.kaldi.gmm_em.mix_up`: the wheel's is unseedable). As in Kaldi, every pass's alignment lives in its
jobs' files (ali.JOB, :class:`asrkd.kaldi.gmm_align.Alignments`) and each statistics job reads its alignment job's:
a pass holds no per-frame array in memory, so its memory is the same for 1 h and 1000 h.

Outputs of the stage, under ``exp/``:
  mono/, tri/    ``model.pkl`` (tree, transition model, GMMs), ``tree`` (Kaldi binary), ``log.json``
  tri/ali_<set>/ ``pdf_ids.npy`` and ``transition_ids.npy``: one entry per frame of the
                 feature store (same offsets), -1 for utterances that could not be aligned;
                 ``pdf_counts.npy`` (train): the state counts behind the hybrid priors.

``train-gmm`` trains the models, then aligns every set in ``features.sets``; ``align`` aligns
sets made later (a speed-perturbed copy of train) with the same triphone model, as Kaldi's
align_si.sh does. Each ``ali_<set>`` is a stage output of its own. The model is
:mod:`asrkd.kaldi.gmm_model`'s, the alignment :mod:`asrkd.kaldi.gmm_align`'s, the EM :mod:`asrkd.kaldi.gmm_em`'s;
this module grows the triphone system and runs the stages.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import kaldi_hmm_gmm as khg
import numpy as np

from asrkd import sections
from asrkd.data import DataDir, split_by_speaker
from asrkd.drops import account_dropped
from asrkd.files import atomic_write, save_npy, write_json
from asrkd.kaldi import tree as tree_lib
from asrkd.kaldi.gmm_align import AlignJobs, Aligner, Alignments, realigner
from asrkd.kaldi.gmm_em import train_em
from asrkd.kaldi.gmm_model import GmmModel, contiguous, global_moments, make_model, read_topology, single_gaussian
from asrkd.kaldi.lang import Lang, POSITIONS, with_words
from asrkd.stage import Settings, digest, input_fingerprint, plan, read_record
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)


def transition_state_table(model: GmmModel, topo: khg.HmmTopology) -> np.ndarray:
    """(num_transition_states + 1, 3): phone, HMM state and pdf-class of each transition-state.

    Row 0 is unused (transition-states count from 1). The binding exposes Kaldi's tuples only
    through their pickle state: (phone, hmm_state, forward_pdf, self_loop_pdf).
    """
    rows = [(0, 0, 0)]
    for entry in model.trans_model.tuples:
        phone, hmm_state, _, _ = entry.__getstate__()
        rows.append((phone, hmm_state, topo.topology_for_phone(phone)[hmm_state].forward_pdf_class))
    return np.asarray(rows, dtype=np.int64)


def frame_contexts(table: np.ndarray, id2state: np.ndarray, tids: np.ndarray) -> np.ndarray:
    """(T, 4) events (left, center, right, pdf-class) of an alignment, for the tree statistics."""
    phone, hmm_state, pdf_class = table[id2state[tids]].T
    return tree_lib.frame_events(phone, hmm_state, pdf_class)


def build_triphone(lang: Lang, mono: GmmModel, topo: khg.HmmTopology, alignments: Alignments, feats: FeatureStore, options,
                   scratch: Path) -> tuple[GmmModel, dict]:
    """Tree stats from the monophone alignment -> questions -> tree -> one Gaussian per leaf
    (``options``: ``gmm.tree``; ``scratch``: a dir for the statistics' working files, removed after)."""
    table = transition_state_table(mono, topo)
    id2state = np.asarray(mono.trans_model.id2state, dtype=np.int64)
    phones, pdf_classes = int(table[:, 0].max()) + 1, int(table[:, 2].max()) + 1
    stats = tree_lib.accumulate_tree_stats(((frame_contexts(table, id2state, tids), feats.span(utt)[0]) for utt, tids in alignments.items()),
                                           alignments.num_frames, feats.frames,
                                           (phones, phones, phones, pdf_classes), scratch)
    id2phone = lang.id2phone
    position_sets = [[i for i in lang.real_phone_ids if id2phone[i].endswith(f"_{pos}")] for pos in POSITIONS]
    questions = tree_lib.phone_questions(stats, lang.phone_sets, position_sets, options.var_floor)
    num_pdf_classes = dict(enumerate(topo.get_phone_to_num_pdf_classes()))
    root, leaves = tree_lib.build_tree(
        stats, lang.phone_sets, num_pdf_classes, questions, options.max_leaves, options.min_count, options.min_gain, options.var_floor
    )
    data = tree_lib.to_kaldi_binary(root)
    tree = tree_lib.load_context_dependency(data)
    total, sumsq, count = stats.sum.sum(0), stats.sumsq.sum(0), stats.count.sum()
    gaussians = []
    for leaf in leaves:
        c = stats.count[leaf.rows].sum()
        if c > 0:
            gaussians.append(single_gaussian(c, stats.sum[leaf.rows].sum(0), stats.sumsq[leaf.rows].sum(0), options.var_floor))
        else:  # a phone/state never seen in training: the global Gaussian
            gaussians.append(single_gaussian(count, total, sumsq, options.var_floor))
    info = {"num_questions": len(questions), "num_leaves": len(leaves), "num_events": len(stats.count),
            "unseen_leaves": int(sum(stats.count[leaf.rows].sum() == 0 for leaf in leaves))}
    log.info("tree: %d leaves from %d context events and %d questions", len(leaves), len(stats.count), len(questions))
    return make_model(tree, topo, gaussians), info


def store_alignment(model: GmmModel, alignments: Alignments, feats: FeatureStore, out_dir: Path) -> np.ndarray:
    """Per-frame transition-ids and pdf-ids in the feature store's layout (-1 where unaligned),
    written into their files an utterance at a time (nothing the size of the corpus in memory);
    returns the pdf-ids' counts."""
    tid_to_pdf = model.tid_to_pdf()
    counts = np.zeros(model.num_pdfs, dtype=np.int64)
    with atomic_write(out_dir / "transition_ids.npy") as tids_path, atomic_write(out_dir / "pdf_ids.npy") as pdf_ids_path:
        tids, pdf_ids = (np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(feats.num_frames,))
                         for path in (tids_path, pdf_ids_path))
        tids[:], pdf_ids[:] = -1, -1
        for utt, ali in alignments.items():
            start, end = feats.span(utt)
            pdfs = tid_to_pdf[ali]
            tids[start:end], pdf_ids[start:end] = ali, pdfs
            counts += np.bincount(pdfs, minlength=model.num_pdfs)
        tids.flush()
        pdf_ids.flush()
        del tids, pdf_ids  # unmapped before the files are renamed into place
    write_json(out_dir / "index.json", {"num_pdfs": model.num_pdfs, "features_checksum": feats.checksum(),
                                        "aligned_utterances": len(alignments), "utterances": len(feats.utt_ids)})
    return counts


def alignment_labels(alignment_dir: Path) -> str:
    """What frame accuracy against ``alignment_dir`` (exp/tri/ali_<set>) is scored against, by
    content: its pdf-ids and the feature store's index they follow (the SHA-256 its record keeps of
    pdf_ids.npy and index.json). Two alignments with the same pdf-ids are the same labels however
    they were made (a lang dir remade with the same phones, another commit), so their rows stay
    comparable; a stale alignment is refused (:func:`asrkd.stage.input_fingerprint`)."""
    input_fingerprint(alignment_dir)
    files = read_record(alignment_dir)["files"]
    return digest([files["pdf_ids.npy"]["sha256"], files["index.json"]["sha256"]])


def training_settings(cfg) -> tuple[Settings, dict]:
    """What a GMM's training depends on: ``seed`` and ``train.valid_fraction`` (which speakers are
    held out of it: data.split_by_speaker), ``gmm.*``; and, only when set, ``gmm.seed``, so that
    GMMs made before that key existed keep their fingerprints."""
    keys = ("seed", *(f"gmm.{key}" for key in cfg.gmm if key != "seed"), "train.valid_fraction")
    return sections.settings(cfg, keys), sections.optional_values(cfg, {"gmm.seed": None})


def run(cfg) -> None:
    """Stage 3: monophone -> triphone, then the alignment of every set in ``features.sets``."""
    layout = sections.layout(cfg)
    settings, optional = training_settings(cfg)
    stage = plan("train-gmm", layout.gmm, settings, {"lang": layout.lang, "data": layout.data_dir("train"), "features": layout.mfcc("train")},
                 optional)
    if not stage.up_to_date:
        summary = train(cfg)
        stage.commit(mono_pdfs=summary["mono"]["num_pdfs"], tri_pdfs=summary["tri"]["num_pdfs"])
    run_align(cfg)


def train(cfg) -> dict:
    """Monophone training from a flat start, the tree, triphone training: exp/mono, exp/tri.

    The validation speakers (``train.valid_fraction``, the DNNs' held-out speakers) are left out,
    as they are of every DNN: the decoder's LM weight and insertion penalty are chosen on them
    (``decode.tuning_set=valid``), for the GMM too, so no system is tuned on voices it trained on.
    They are still aligned (``ali_train``) with the final model, as every set is."""
    layout = sections.layout(cfg)
    lang = Lang.load(layout.lang)
    topo = read_topology(lang)
    data = DataDir.read(layout.data_dir("train"))
    mfcc_dir = layout.mfcc("train")
    feats = FeatureStore.load(mfcc_dir)  # memory-mapped: every pass reads an utterance at a time
    held_out = set(split_by_speaker(data, float(cfg.train.valid_fraction), int(cfg.seed))[1])
    utts = [u for u in data.utt_ids if u in feats and u not in held_out]
    log.info("train-gmm: %d utterances; %d of the validation speakers held out", len(utts), len(held_out & set(feats.utt_ids)))
    max_drop = cfg.prep.max_drop_fraction

    tic = time.time()
    rng = np.random.default_rng(cfg.seed if cfg.gmm.seed is None else cfg.gmm.seed)  # the Gaussian splits' perturbation: reproducible
    count, total, sumsq = global_moments(feats.frames, contiguous(sorted(feats.span(u) for u in utts)))
    mono_tree = khg.monophone_context_dependency_shared(
        phone_classes=lang.phone_sets, phone2num_pdf_classes=topo.get_phone_to_num_pdf_classes()
    )
    global_gauss = single_gaussian(count, total, sumsq, cfg.gmm.tree.var_floor)
    mono = make_model(mono_tree, topo, [global_gauss] * mono_tree.num_pdfs)
    how = AlignJobs.of(cfg)
    with tempfile.TemporaryDirectory(dir=layout.exp, prefix="gmm_alignments.") as scratch:  # the passes' ali.JOB files
        scratch = Path(scratch)
        alignments, dropped = Aligner(how, data.text, mfcc_dir, "train-gmm mono flat start")(
            mono, utts, Path(tempfile.mkdtemp(dir=scratch, prefix="ali.")), equal=True)
        account_dropped("train-gmm mono (graphs)", len(utts), dropped, max_drop, layout.mono / "dropped.json")
        utts = [u for u in utts if u not in dropped]
        realign = realigner(how, mono, data.text, utts, mfcc_dir, "train-gmm mono realign", scratch)
        mono_history = train_em(mono, realign, mfcc_dir, alignments, cfg.gmm.mono, cfg.gmm, how.jobs, "mono", rng)
        alignments = realign(mono)  # the final model's alignment feeds the tree
        mono.save(layout.mono)
        mono_time = time.time() - tic

        tic = time.time()
        tri, tree_info = build_triphone(lang, mono, topo, alignments, feats, cfg.gmm.tree, layout.exp)
        alignments.remove()
        realign = realigner(how, tri, data.text, utts, mfcc_dir, "train-gmm tri realign", scratch)
        tri_history = train_em(tri, realign, mfcc_dir, realign(tri), cfg.gmm.tri, cfg.gmm, how.jobs, "tri", rng)
    tri.save(layout.gmm)
    tri_time = time.time() - tic

    summary = {"mono": {"num_pdfs": mono.num_pdfs, "history": mono_history, "seconds": mono_time},
               "tri": {"num_pdfs": tri.num_pdfs, "tree": tree_info, "history": tri_history, "seconds": tri_time}}
    write_json(layout.gmm / "log.json", summary)
    return summary


def run_align(cfg) -> None:
    """Stage 3's end, and the ``align`` command: the triphone model's forced alignment of every
    set in ``features.sets`` (exp/tri/ali_<set>), utterances that fail counted and listed.

    A set whose transcripts hold words the training lang lacks (an eval set's) is aligned with
    an alignment lang of its own, ``ali_<set>/lang``: the training lang with those words, their
    pronunciations from the dictionary then CMUdict on the acoustic model's phones (as the
    decoding lang is made), so a set with new words needs no new lang dir, GMM or DNN; words
    without a usable pronunciation are named and their utterances dropped."""
    log = logging.getLogger(__name__)
    layout, data_sets, how = sections.layout(cfg), sections.data_sets(cfg), AlignJobs.of(cfg)
    tri, trained = None, None
    for name in data_sets.processed():
        out_dir = layout.alignment(name)
        mfcc = layout.mfcc(name)
        stage = plan(f"align {name}", out_dir, sections.settings(cfg, ("gmm.align",)), {"model": layout.gmm, "lang": layout.lang, "data": layout.data_dir(name),
                                                                     "features": mfcc})
        if stage.up_to_date:
            continue
        if tri is None:
            tri = GmmModel.load(layout.gmm)
        set_data = DataDir.read(layout.data_dir(name))
        set_feats = FeatureStore.load(mfcc)
        set_utts = [u for u in set_data.utt_ids if u in set_feats]
        trained = Lang.load(layout.lang) if trained is None else trained
        words = {word for transcript in set_data.text.values() for word in transcript.split()}  # the data dir as read above
        set_lang, missing = with_words(cfg.lang, layout.dictionary, trained, words, layout.alignment_lang(name))
        for word, reason in sorted(missing.items()):
            log.warning("align %s: word %s has no pronunciation the model can use (%s); its utterances are dropped", name, word, reason)
        with tempfile.TemporaryDirectory(dir=layout.exp, prefix=f"ali_{name}.") as scratch:  # the jobs' ali.JOB files
            set_alignments, dropped = Aligner(replace(how, lang_dir=set_lang.directory), set_data.text, mfcc, f"align {name}")(tri, set_utts, Path(scratch))
            scored_only = data_sets.scoring_only(name)
            account_dropped(f"align {name}" + (" (scored only: drops never stop the stage)" if scored_only else ""),
                            len(set_utts), dropped, 1.0 if scored_only else cfg.prep.max_drop_fraction, out_dir / "dropped.json")
            counts = store_alignment(tri, set_alignments, set_feats, out_dir)
        save_npy(out_dir / "pdf_counts.npy", counts)  # priors of the hybrid models trained on this set
        stage.commit(aligned=len(set_alignments), dropped=len(dropped))
