"""The GMM-HMM system and the forced alignment: Kaldi's train_mono.sh -> train_deltas.sh -> align_si.sh.

The EM updates, graph compilation and Viterbi alignment are Kaldi's own code (k2-fsa's
``kaldi-hmm-gmm``); the triphone tree is grown here (see :mod:`asrkd.kaldi.tree`), the EM
statistics are computed here in jobs and summed (:func:`gmm_stats`: the wheel's accumulators
neither pickle nor add up across processes), and Gaussians are split with a seeded generator
(:func:`mix_up`: the wheel's is unseedable). As in Kaldi, every pass's alignment lives in its
jobs' files (ali.JOB, :class:`Alignments`) and each statistics job reads its alignment job's:
a pass holds no per-frame array in memory, so its memory is the same for 1 h and 1000 h.

Outputs of the stage, under ``exp/``:
  mono/, tri/    ``model.pkl`` (tree, transition model, GMMs), ``tree`` (Kaldi binary), ``log.json``
  tri/ali_<set>/ ``pdf_ids.npy`` and ``transition_ids.npy``: one entry per frame of the
                 feature store (same offsets), -1 for utterances that could not be aligned;
                 ``pdf_counts.npy`` (train): the state counts behind the hybrid priors.

``train-gmm`` trains the models, then aligns every set in ``features.sets``; ``align`` aligns
sets made later (a speed-perturbed copy of train) with the same triphone model, as Kaldi's
align_si.sh does. Each ``ali_<set>`` is a stage output of its own.
"""

from __future__ import annotations

import copy
import heapq
import logging
import pickle
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import kaldi_hmm_gmm as khg
import kaldifst
import numpy as np
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import DataDir, split_by_speaker
from asrkd.drops import account_dropped
from asrkd.files import atomic_write, save_npy, write_json
from asrkd.jobs import Jobs, map_jobs, split
from asrkd.kaldi import tree as tree_lib
from asrkd.kaldi.lang import Lang, POSITIONS, with_words
from asrkd.progress import progress
from asrkd.stage import Settings, digest, input_fingerprint, plan, read_record
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class GmmModel:
    """A tree, the transition model built from it and one GMM per pdf-id."""

    tree: khg.ContextDependency
    trans_model: khg.TransitionModel
    am: khg.AmDiagGmm

    @property
    def num_pdfs(self) -> int:
        return self.am.num_pdfs

    def tid_to_pdf(self) -> np.ndarray:
        return np.asarray(self.trans_model.transition_id_to_pdf_array(), dtype=np.int64)

    def save(self, directory: Path) -> None:
        with atomic_write(directory / "model.pkl") as tmp, open(tmp, "wb") as out:
            pickle.dump({"tree": self.tree, "trans_model": self.trans_model, "am": self.am}, out)
        with atomic_write(directory / "tree") as tmp:
            self.tree.write(binary=True, filename=str(tmp))

    @classmethod
    def load(cls, directory: Path) -> "GmmModel":
        with open(Path(directory) / "model.pkl", "rb") as f:
            return cls(**pickle.load(f))


def read_topology(lang: Lang) -> khg.HmmTopology:
    topo = khg.HmmTopology()
    topo.read(lang.topology_text())
    return topo


def single_gaussian(count: float, total: np.ndarray, sumsq: np.ndarray, var_floor: float) -> khg.DiagGmm:
    mean = total / count
    var = np.maximum(sumsq / count - mean * mean, var_floor)
    gmm = khg.DiagGmm(nmix=1, dim=len(mean))
    gmm.set_weights(np.ones(1, dtype=np.float32))
    gmm.set_means(mean[None, :].astype(np.float32))
    gmm.set_invvars((1.0 / var)[None, :].astype(np.float32))
    gmm.compute_gconsts()
    return gmm


def global_moments(frames: np.ndarray, spans: list[tuple[int, int]] | None = None,
                   block_rows: int = 1 << 16) -> tuple[int, np.ndarray, np.ndarray]:
    """Frame count, sum and sum of squares (float64) of the rows of ``frames`` in ``spans``
    ((start, end) row ranges, in order; default: every row), a block of rows at a time: a
    memory-mapped store is never read whole. Rows are added in order, each block's first row to the
    running sums, so the sums are bit for bit those of one ``sum(0)`` over the rows (numpy adds an
    axis-0 reduction row by row)."""
    total = sumsq = np.zeros(frames.shape[1])
    count = 0
    for first, last in [(0, len(frames))] if spans is None else spans:
        for start in range(first, last, block_rows):
            block = np.asarray(frames[start:min(start + block_rows, last)], dtype=np.float64)
            if count == 0:
                total, sumsq = block.sum(0), (block**2).sum(0)
            else:
                total, sumsq = np.vstack([total, block]).sum(0), np.vstack([sumsq, block**2]).sum(0)
            count += len(block)
    return count, total, sumsq


def contiguous(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` (sorted row ranges) with adjacent ones joined: fewer, longer reads."""
    joined: list[tuple[int, int]] = []
    for start, end in spans:
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def make_model(tree: khg.ContextDependency, topo: khg.HmmTopology, gaussians: list[khg.DiagGmm]) -> GmmModel:
    am = khg.AmDiagGmm()
    for gmm in gaussians:
        am.add_pdf(gmm)
    return GmmModel(tree, khg.TransitionModel(ctx_dep=tree, hmm_topo=topo), am)


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


def gaussian_offsets(am: khg.AmDiagGmm) -> np.ndarray:
    """Where each pdf's Gaussians start in the statistics' rows (every pdf's Gaussians in pdf order), and the total."""
    return np.cumsum([0] + [am.num_gauss_in_pdf(pdf) for pdf in range(am.num_pdfs)])


STATS_SCALE = 2.0**20  # GMM statistics in fixed point: integer sums are exact in any order, so jobs' sums are the same bits for any nj
# (a Gaussian's sums stay exact up to 2^63 / 2^20 ~ 8.8e12 in natural units: a billion frames of x^2 = 8,800)
STATS_BLOCK = 1 << 21  # elements of a block's (frames x Gaussians x dim) products: ~16 MB of float64


@dataclass
class GmmStats:
    """gmm-acc-stats-ali's statistics as arrays, per Gaussian (every pdf's Gaussians in pdf order):
    occupancy and the sums of x and x^2 weighted by the posteriors, in fixed point (int64, units of
    1/STATS_SCALE), and transition counts. Each job sums its utterances' statistics, and the jobs'
    sums add up to the same integers whatever the split, as gmm-sum-accs sums Kaldi's jobs' (whose
    accumulators this wheel can neither pickle nor fill from outside)."""

    occupancy: np.ndarray  # (gaussians,)
    first: np.ndarray  # (gaussians, dim)
    second: np.ndarray  # (gaussians, dim)
    transitions: np.ndarray  # (transition-ids + 1,)
    loglike: int  # the frames' total log-likelihood, in fixed point
    frames: int

    def __add__(self, other: "GmmStats") -> "GmmStats":
        return GmmStats(self.occupancy + other.occupancy, self.first + other.first, self.second + other.second,
                        self.transitions + other.transitions, self.loglike + other.loglike, self.frames + other.frames)

    def accumulator(self, model: GmmModel) -> khg.AccumAmDiagGmm:
        """Kaldi's accumulator holding these statistics, for Kaldi's own update: a Gaussian's occupancy,
        first and second moments are those of two points, its mean plus and minus its standard deviation
        per dimension, each of half its occupancy (the accumulator is filled only through frames)."""
        accs = khg.AccumAmDiagGmm()
        accs.init(model=model.am, flags=khg.GmmUpdateFlags.kGmmAll)
        offsets = gaussian_offsets(model.am)
        occupancy = self.occupancy / STATS_SCALE
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = self.first / STATS_SCALE / occupancy[:, None]
            deviation = np.sqrt(np.maximum(self.second / STATS_SCALE / occupancy[:, None] - mean**2, 0.0))
        for pdf in range(model.num_pdfs):
            for gauss, g in enumerate(range(offsets[pdf], offsets[pdf + 1])):
                if occupancy[g] > 0:
                    for point in (mean[g] + deviation[g], mean[g] - deviation[g]):
                        accs.accumulate_for_gaussian(model.am, point.astype(np.float32), pdf, gauss, occupancy[g] / 2)
        return accs


def fixed_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the first axis of ``values`` (overwritten) in fixed point: each value rounded to a
    multiple of 1/STATS_SCALE first, so the sum is of integers: exact in float64 within a block
    (its totals stay far below 2^53), hence the same in any order, and returned as int64."""
    values *= STATS_SCALE
    return np.rint(values, out=values).sum(0).astype(np.int64)


def chunks(alignments: Iterable[tuple[str, np.ndarray]], chunk_frames: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    """``alignments`` in lists of whole utterances of at least ``chunk_frames`` frames (the last: what is left)."""
    chunk, size = [], 0
    for utt, tids in alignments:
        chunk.append((utt, tids))
        size += len(tids)
        if size >= chunk_frames:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def gmm_stats(model: GmmModel, alignments: Iterable[tuple[str, np.ndarray]], feats: FeatureStore, chunk_frames: int = 1 << 18) -> GmmStats:
    """gmm-acc-stats-ali over ``alignments`` ((utterance, transition-ids) pairs): each frame's
    posteriors over its pdf's Gaussians (Kaldi's ComponentPosteriors, in float64) and the
    statistics they weight, read a chunk of utterances at a time. Every per-frame quantity is
    computed without BLAS (whose sums' order depends on the matrix shapes) and rounded to fixed
    point before it is summed, so a frame adds the same integers whichever job and chunk hold it."""
    am, tid_to_pdf = model.am, model.tid_to_pdf()
    gmms = [am.get_pdf(pdf) for pdf in range(model.num_pdfs)]
    offsets = gaussian_offsets(am)
    params = [(np.asarray(g.gconsts, np.float64), np.asarray(g.means_invvars, np.float64), np.asarray(g.inv_vars, np.float64)) for g in gmms]
    dim, num_tids = am.dim, model.trans_model.num_transition_ids
    stats = GmmStats(np.zeros(offsets[-1], np.int64), np.zeros((offsets[-1], dim), np.int64), np.zeros((offsets[-1], dim), np.int64),
                     np.zeros(num_tids + 1, np.int64), 0, 0)
    for chunk in progress(chunks(alignments, chunk_frames), "statistics", unit="chunks"):  # the heap trimmed between chunks
        tids = np.concatenate([ali for _, ali in chunk])
        frames = np.concatenate([np.asarray(feats[utt], dtype=np.float32) for utt, _ in chunk])
        stats.transitions += np.bincount(tids, minlength=num_tids + 1)
        stats.frames += len(tids)
        pdf_of = tid_to_pdf[tids]
        order = np.argsort(pdf_of, kind="stable")
        starts = np.flatnonzero(np.r_[True, pdf_of[order][1:] != pdf_of[order][:-1]])
        for begin, end in zip(starts, np.r_[starts[1:], len(order)]):
            pdf = int(pdf_of[order[begin]])
            gconsts, means_invvars, inv_vars = params[pdf]
            block = max(1, STATS_BLOCK // (len(gconsts) * dim))
            for at in range(begin, end, block):
                x = frames[order[at:min(at + block, end)]].astype(np.float64)[:, None, :]  # (frames, 1, dim)
                loglikes = gconsts + (x * (means_invvars - 0.5 * x * inv_vars)).sum(-1)  # (frames, Gaussians)
                top = loglikes.max(1, keepdims=True)
                frame_loglikes = top[:, 0] + np.log(np.exp(loglikes - top).sum(1))
                posteriors = np.exp(loglikes - frame_loglikes[:, None])
                weighted = posteriors[:, :, None] * x  # (frames, Gaussians, dim)
                g = slice(offsets[pdf], offsets[pdf + 1])
                stats.second[g] += fixed_sum(weighted * x)
                stats.first[g] += fixed_sum(weighted)
                stats.occupancy[g] += fixed_sum(posteriors)
                stats.loglike += int(fixed_sum(frame_loglikes))
    return stats


def gmm_stats_part(job: tuple) -> GmmStats:
    """One statistics job: (model, features directory, the alignments of one alignment job) -> the
    statistics of their utterances. The job reads its features and alignments from disk itself."""
    model, feats_dir, alignments = job
    return gmm_stats(model, alignments.items(), FeatureStore.load(Path(feats_dir)))


def accumulate(jobs: Jobs, model: GmmModel, alignments: Alignments, feats_dir: Path, stage: str) -> tuple[khg.AccumAmDiagGmm, np.ndarray, float]:
    """gmm-acc-stats-ali, one job per alignment job's file (Kaldi's ali.JOB -> JOB.acc), and
    gmm-sum-accs: the statistics of every job summed (exactly: the same for any nj), in Kaldi's
    accumulator; transition counts; the average log-likelihood of a frame."""
    parts = map_jobs(jobs, gmm_stats_part, [(model, str(feats_dir), part) for part in alignments.parts()], stage)
    stats = sum(parts[1:], parts[0])
    return stats.accumulator(model), stats.transitions.astype(np.float64), stats.loglike / STATS_SCALE / max(stats.frames, 1)


def split_targets(occupancy: np.ndarray, current: np.ndarray, target: int, power: float, min_count: float) -> np.ndarray:
    """Gaussians per pdf after mixing up to ``target`` (Kaldi's GetSplitTargets idea).

    One Gaussian at a time goes to the pdf with the highest occupancy**power per Gaussian,
    as long as each of its Gaussians keeps at least ``min_count`` frames.
    """
    counts = current.astype(np.int64).copy()
    scores = [(-(occ**power) / n, pdf) for pdf, (occ, n) in enumerate(zip(occupancy, counts))]
    heapq.heapify(scores)
    while counts.sum() < target and scores:
        _, pdf = heapq.heappop(scores)
        if (counts[pdf] + 1) * min_count > occupancy[pdf]:
            continue  # this pdf is full; drop it from the queue
        counts[pdf] += 1
        heapq.heappush(scores, (-(occupancy[pdf] ** power) / counts[pdf], pdf))
    return counts


def mix_up(am: khg.AmDiagGmm, occupancy: np.ndarray, target: int, mixup, rng: np.random.Generator) -> None:
    """Split Gaussians towards ``target`` in all (gmm-est --mix-up; ``mixup``: ``gmm.mixup``), with a seeded perturbation.

    Kaldi's split perturbs the two halves' means by +/- perturb_factor standard deviations of
    noise; the wheel draws that noise from an unseedable std::random_device, which made every
    run's GMM, and so its alignment, differ. This does the same split with a numpy Generator.
    """
    current = np.array([am.get_pdf(i).num_gauss for i in range(am.num_pdfs)])
    for pdf, count in enumerate(split_targets(occupancy, current, target, mixup.power, mixup.min_count)):
        gmm = am.get_pdf(pdf)
        if count <= gmm.num_gauss:
            continue
        # copies: the binding returns views of buffers that resize() frees
        weights, means, inv_vars = list(gmm.weights.copy()), list(gmm.means.copy()), list(gmm.inv_vars.copy())
        while len(weights) < count:
            k = int(np.argmax(weights))  # the heaviest component splits in two
            weights[k] /= 2
            noise = rng.standard_normal(len(means[k])) * mixup.perturb_factor / np.sqrt(inv_vars[k])
            weights.append(weights[k])
            means.append(means[k] + noise)
            inv_vars.append(inv_vars[k].copy())
            means[k] = means[k] - noise
        gmm.resize(count, len(means[0]))
        gmm.set_weights(np.asarray(weights, dtype=np.float32))
        gmm.set_invvars_and_means(np.asarray(inv_vars, dtype=np.float32), np.asarray(means, dtype=np.float32))
        gmm.compute_gconsts()


def update(model: GmmModel, accs: khg.AccumAmDiagGmm, trans_stats: np.ndarray, target_gauss: int, gmm, rng: np.random.Generator) -> None:
    """gmm-est (``gmm``: the ``gmm`` section): ML update of transitions and GMMs, then split Gaussians towards ``target_gauss``."""
    model.trans_model.mle_update(trans_stats, khg.MleTransitionUpdateConfig())
    opts = khg.MleDiagGmmOptions()
    opts.min_gaussian_occupancy = float(gmm.min_gaussian_occupancy)
    khg.mle_am_diag_gmm_update(config=opts, amdiag_gmm_acc=accs, flags=khg.str_to_gmm_flags("mvw"), am_gmm=model.am)
    occupancy = np.array([accs.get_acc(i).occupancy.sum() for i in range(accs.num_accs)])
    if target_gauss > model.am.num_gauss:
        mix_up(model.am, occupancy, target_gauss, gmm.mixup, rng)


def train_em(
    model: GmmModel, realign: Callable[[GmmModel], Alignments], feats_dir: Path, alignments: Alignments, schedule, gmm, jobs: Jobs,
    name: str, rng: np.random.Generator,
) -> list:
    """EM passes as train_mono.sh/train_deltas.sh (``schedule``: ``gmm.mono`` or ``gmm.tri``): realign on
    realign_iters (a new pass's files replace the last's: ``alignments`` and every pass after it are
    removed), grow Gaussians linearly."""
    history = []
    start_gauss = model.am.num_gauss
    for it in range(schedule.num_iters):
        tic = time.time()
        if it in set(schedule.realign_iters):
            new = realign(model)
            alignments.remove()
            alignments = new
        accs, trans_stats, like = accumulate(jobs, model, alignments, feats_dir, f"train-gmm {name} stats")
        grow = min(it + 1, max(1, schedule.num_iters - 5)) / max(1, schedule.num_iters - 5)
        target = int(start_gauss + (schedule.total_gauss - start_gauss) * grow)
        update(model, accs, trans_stats, target, gmm, rng)
        history.append({"iter": it, "avg_loglike": like, "num_gauss": model.am.num_gauss, "aligned": len(alignments)})
        log.info("%s iter %d: avg log-like %.3f over %d utts, %d Gaussians (%.1fs)", name, it, like, len(alignments), model.am.num_gauss, time.time() - tic)
    alignments.remove()
    return history


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
