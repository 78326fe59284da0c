"""The EM statistics and updates of the GMM (Kaldi's gmm-acc-stats-ali / gmm-est, with
train_mono.sh's and train_deltas.sh's Gaussian splits): statistics computed here in jobs, in
fixed point (:data:`STATS_SCALE`) so that their sum is the same bits for any number of jobs,
summed into Kaldi's accumulators; Gaussians split with a seeded generator (:func:`mix_up`: the
wheel's is unseedable); the passes of EM with realignment."""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator

import kaldi_hmm_gmm as khg
import numpy as np

from asrkd.jobs import Jobs, map_jobs
from asrkd.kaldi.gmm_align import Alignments
from asrkd.kaldi.gmm_model import GmmModel
from asrkd.progress import progress
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)


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
