"""Forced alignment with a GMM-HMM (Kaldi's align_si.sh, and the equal alignment that starts
train_mono.sh): training graphs compiled per utterance, Viterbi alignment in jobs, each job's
alignment in its own file (ali.JOB, :class:`Alignments`), realigned between EM passes, so that
no pass holds a per-frame array in memory."""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import kaldi_hmm_gmm as khg
import kaldifst
import numpy as np
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.files import atomic_write
from asrkd.jobs import Jobs, map_jobs, split
from asrkd.kaldi.gmm_model import GmmModel
from asrkd.kaldi.lang import Lang
from asrkd.progress import progress
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)


def compile_graphs(lang: Lang, model: GmmModel, text: dict[str, str], utts: list[str]) -> Iterator[tuple[str, Any, str | None]]:
    """compile-train-graphs: the training graph (HCLG of its transcript, with self-loops, no
    transition probs) of each utterance in turn, as ``(utt, graph, None)``, or ``(utt, None,
    reason)`` when a word has no pronunciation. A graph is compiled when its utterance is aligned
    and dropped after it, so no pass holds the corpus's graphs (recompiling them costs AN4 0.8 s a pass)."""
    compiler = khg.TrainingGraphCompiler(
        trans_model=model.trans_model, ctx_dep=model.tree, lex_fst=lang.lexicon_fst(),
        disambig_syms=lang.disambig_ids, opts=khg.TrainingGraphCompilerOptions(),
    )
    for utt in utts:
        try:
            yield utt, compiler.compile_graph_from_text(lang.word_ids(text[utt], utt)), None
        except KeyError as err:
            yield utt, None, f"{err.args[0]} (no pronunciation)"


@dataclass
class Alignments:
    """A pass's alignment as Kaldi keeps it, in its jobs' files (ali.JOB): ``files[j]`` the
    transition-ids of job j's utterances end to end (int32, read by memory map), ``utts[j]``
    those utterances in order and ``lengths[j]`` their frames. Nothing a frame stays in memory,
    so a pass over 1000 hours holds what one over 1 hour does; a statistics job reads the file of
    its alignment job. Picklable: a job receives the paths, not the alignments."""

    files: list[Path]
    utts: list[list[str]]
    lengths: list[np.ndarray]

    def __len__(self) -> int:
        return sum(len(utts) for utts in self.utts)

    @property
    def num_frames(self) -> int:
        return int(sum(lengths.sum() for lengths in self.lengths))

    def parts(self) -> list["Alignments"]:
        """One Alignments per job file: what each statistics job reads."""
        return [Alignments([f], [u], [n]) for f, u, n in zip(self.files, self.utts, self.lengths)]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(utterance, its transition-ids), in job order: views into the files."""
        for path, utts, lengths in zip(self.files, self.utts, self.lengths):
            if not utts:
                continue  # a job whose utterances all failed wrote an empty file (which cannot be mapped)
            tids = np.memmap(path, dtype=np.int32, mode="r")
            for utt, end, length in zip(utts, np.cumsum(lengths), lengths):
                yield utt, tids[end - length:end]

    def remove(self) -> None:
        """Delete the files: the pass that replaces this one is written (Kaldi overwrites ali.JOB.gz)."""
        for path in self.files:
            Path(path).unlink(missing_ok=True)


def equal_align(graphs: Iterable[tuple[str, Any, str | None]], feats: FeatureStore) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """align-equal-compiled: the first monophone alignment spreads each path evenly over the
    frames. Yields ``(utt, transition-ids, None)``, or ``(utt, None, reason)`` when it is dropped."""
    for utt, graph, reason in graphs:
        if graph is None:
            yield utt, None, reason
            continue
        ok, path = kaldifst.equal_align(ifst=graph, length=len(feats[utt]), rand_seed=3, num_retries=10)
        if ok:
            ok, tids, _, _ = kaldifst.get_linear_symbol_sequence(path)
        if not ok:
            yield utt, None, f"utterance {utt}: {len(feats[utt])} frames are too few for its transcript's HMMs"
            continue
        yield utt, np.asarray(tids, dtype=np.int32), None


def align(model: GmmModel, graphs: Iterable[tuple[str, Any, str | None]], feats: FeatureStore, options,
          total: int) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """gmm-align-compiled: Viterbi alignment with beam, retried with retry_beam on failure, of the
    ``total`` utterances ``graphs`` yields (:func:`compile_graphs`), as :func:`equal_align` yields them
    (those without a graph are dropped with its reason). ``options``: ``gmm.align``."""
    config = khg.AlignConfig()
    config.beam, config.retry_beam, config.careful = float(options.beam), float(options.retry_beam), False
    failed, example = 0, None
    for utt, graph, reason in progress(graphs, "align", total=total, unit="utterances"):
        if graph is None:
            yield utt, None, reason
            continue
        khg.add_transition_probs(
            trans_model=model.trans_model, transition_scale=options.transition_scale, self_loop_scale=options.self_loop_scale, fst=graph
        )
        x = np.ascontiguousarray(feats[utt], dtype=np.float32)
        decodable = khg.DecodableAmDiagGmmScaled(am=model.am, tm=model.trans_model, feats=x, scale=options.acoustic_scale)
        _, num_error, _, _, _, tids, _ = khg.align_utterance_wrapper(
            config=config, utt=utt, acoustic_scale=options.acoustic_scale, fst=graph, decodable=decodable,
            num_done=0, num_error=0, num_retried=0, tot_like=0.0, frame_count=0,
        )
        if num_error or len(tids) != len(x):
            failed, example = failed + 1, example or utt
            yield utt, None, f"utterance {utt}: alignment failed even with retry_beam={options.retry_beam}"
            continue
        yield utt, np.asarray(tids, dtype=np.int32), None
    if failed:  # training goes on without them this pass; the final alignment accounts for them
        log.warning("align: %d of %d utterances failed (e.g. %s)", failed, total, example)


def write_alignments(results: Iterable[tuple[str, np.ndarray | None, str | None]], path: Path) -> tuple[Alignments, dict[str, str]]:
    """Append each aligned utterance's transition-ids to ``path`` as they come (atomically: the file
    appears whole); the :class:`Alignments` of that one file and the utterances dropped, with the reason."""
    utts, lengths, dropped = [], [], {}
    with atomic_write(path) as tmp, open(tmp, "wb") as out:
        for utt, tids, reason in results:
            if tids is None:
                dropped[utt] = reason
                continue
            out.write(tids.tobytes())
            utts.append(utt)
            lengths.append(len(tids))
    return Alignments([Path(path)], [utts], [np.asarray(lengths, dtype=np.int64)]), dropped


def align_part(job: tuple) -> tuple[Alignments, dict[str, str]]:
    """One alignment job: (model, the model its graphs are compiled with, lang dir, transcripts,
    features directory, align config or None for align-equal-compiled, utterances, the job's
    alignment file) -> the alignments written there and the utterances dropped (no graph, too few
    frames, or no alignment within retry_beam). A job reads its utterances' features from disk and
    writes its alignment to disk itself, as Kaldi's jobs do: nothing the size of the corpus goes
    through a pipe or stays in memory."""
    model, graph_model, lang_dir, text, feats_dir, options, utts, path = job
    store = FeatureStore.load(Path(feats_dir))
    graphs = compile_graphs(Lang.load(Path(lang_dir)), graph_model, text, utts)  # FSTs do not pickle: each job compiles its own
    results = equal_align(graphs, store) if options is None else align(model, graphs, store, OmegaConf.create(options), len(utts))
    return write_alignments(results, Path(path))


@dataclass(frozen=True)
class AlignJobs:
    """How alignments are made: the jobs (``jobs.*``), ``gmm.align``'s options and the lang dir
    whose lexicon compiles the graphs."""

    jobs: Jobs
    options: dict
    lang_dir: Path

    @classmethod
    def of(cls, cfg) -> "AlignJobs":
        """The training lang's, as ``cfg`` says (``jobs.*``, ``gmm.align``, ``exp_dir``)."""
        return cls(sections.jobs(cfg), OmegaConf.to_container(cfg.gmm.align, resolve=True), sections.layout(cfg).lang)


class Aligner:
    """gmm-align-compiled (or align-equal-compiled) over ``jobs.nj`` jobs (Kaldi's split data): the
    utterances split into parts, each job compiling its part's training graphs, aligning them and
    writing its file ``<out_dir>/ali.<job>``, the parts kept in utterance order: the same alignments
    as one job (tested). The align stage uses it on the saved model, GMM training for its flat start
    and its realignments.

    The graphs hold the transition probabilities of the model they are compiled with; as
    Kaldi's train_mono.sh compiles them once, before training, ``graph_model`` (default: the
    model aligning) is the model of that moment, so every realignment sees the graphs one job
    would have."""

    def __init__(self, how: AlignJobs, text: dict[str, str], feats_dir: Path, stage: str, graph_model: GmmModel | None = None):
        self.text, self.feats_dir, self.stage, self.graph_model = text, feats_dir, stage, graph_model
        self.jobs, self.align_options, self.lang_dir = how.jobs, how.options, str(how.lang_dir)

    def __call__(self, model: GmmModel, utts: list[str], out_dir: Path, equal: bool = False) -> tuple[Alignments, dict[str, str]]:
        """Alignments of ``utts`` (``equal``: the flat start's) in ``out_dir``, and the utterances dropped, with the reason."""
        graph_model = self.graph_model or model
        options = None if equal else self.align_options
        jobs = [(model, graph_model, self.lang_dir, {u: self.text[u] for u in part}, str(self.feats_dir), options, part,
                 str(Path(out_dir) / f"ali.{job}")) for job, part in enumerate(split(utts, self.jobs.nj))]  # one job runs here, in this process
        alignments, dropped = Alignments([], [], []), {}
        for part, part_dropped in map_jobs(self.jobs, align_part, jobs, self.stage):
            alignments = Alignments(alignments.files + part.files, alignments.utts + part.utts, alignments.lengths + part.lengths)
            dropped |= part_dropped
        return alignments, dropped


def realigner(how: AlignJobs, model: GmmModel, text: dict[str, str], utts: list[str], feats_dir: Path, stage: str,
              scratch: Path) -> Callable[[GmmModel], Alignments]:
    """The realignment step of GMM training for ``model`` (as it is now, before training: its
    graphs are compiled with it): an :class:`Aligner` over ``utts`` in ``jobs.nj`` jobs (one job
    runs in this process), every pass on the graphs of that moment, its files in a new directory
    under ``scratch``."""
    aligner = Aligner(how, text, feats_dir, stage, graph_model=copy.deepcopy(model))
    return lambda current: aligner(current, utts, Path(tempfile.mkdtemp(dir=scratch, prefix="ali.")))[0]
