import copy
from pathlib import Path

import kaldi_hmm_gmm as khg
import numpy as np
from omegaconf import OmegaConf

from asrkd.jobs import split
from asrkd.kaldi.gmm_align import Alignments, write_alignments
from asrkd.kaldi.gmm_em import STATS_SCALE, gmm_stats, mix_up, split_targets
from asrkd.kaldi.gmm_model import GmmModel, global_moments, single_gaussian
from asrkd.stores import FeatureStore


def test_split_targets_follow_occupancy_within_min_count() -> None:
    occupancy = np.array([1000.0, 100.0, 10.0])
    # pdf 0 has the most frames per Gaussian until it holds 8 (1000/8 = 125 > 100)
    assert split_targets(occupancy, np.ones(3), target=10, power=1.0, min_count=20.0).tolist() == [8, 1, 1]
    # with 300 frames a Gaussian at least, pdf 0 stops at 3 and the target is not reached
    assert split_targets(occupancy, np.ones(3), target=10, power=1.0, min_count=300.0).tolist() == [3, 1, 1]


def test_mix_up_is_seeded_and_keeps_the_distribution() -> None:
    def model() -> khg.AmDiagGmm:
        am = khg.AmDiagGmm()
        x = np.random.default_rng(0).normal(size=(500, 3))
        for _ in range(2):
            am.add_pdf(single_gaussian(len(x), x.sum(0), (x * x).sum(0), 0.01))
        return am

    cfg = OmegaConf.create({"perturb_factor": 0.01, "power": 0.2, "min_count": 20.0})
    first, second = model(), model()
    mix_up(first, np.array([500.0, 500.0]), 8, cfg, np.random.default_rng(7))
    mix_up(second, np.array([500.0, 500.0]), 8, cfg, np.random.default_rng(7))
    assert first.num_gauss == 8
    for pdf in range(2):
        a, b = first.get_pdf(pdf), second.get_pdf(pdf)
        np.testing.assert_array_equal(a.means, b.means)
        assert abs(a.weights.sum() - 1.0) < 1e-6
        data_mean = np.random.default_rng(0).normal(size=(500, 3)).mean(0)
        np.testing.assert_allclose((a.weights[:, None] * a.means).sum(0), data_mean, atol=1e-5)  # +/- noise cancels


def test_global_moments_read_in_blocks_equal_one_sum_over_the_array() -> None:
    # bit for bit: the GMM's flat start must not change when the store is read a block at a time
    frames = (np.random.default_rng(0).normal(size=(1000, 5)) * [1e6, 1, 1e-3, 10, 1e4]).astype(np.float32)
    whole = frames.astype(np.float64)
    count, total, sumsq = global_moments(frames, block_rows=7)
    assert count == 1000 and np.array_equal(total, whole.sum(0)) and np.array_equal(sumsq, (whole**2).sum(0))


def trained_model_and_alignments(run_dir: Path) -> tuple[GmmModel, dict[str, np.ndarray], FeatureStore]:
    model = GmmModel.load(run_dir / "exp" / "tri")
    feats = FeatureStore.load(run_dir / "exp" / "feats" / "mfcc" / "train")
    tids = np.load(run_dir / "exp" / "tri" / "ali_train" / "transition_ids.npy")
    spans = {utt: feats.span(utt) for utt in feats.utt_ids}
    return model, {utt: tids[a:b].astype(np.int32) for utt, (a, b) in spans.items() if (tids[a:b] > 0).all()}, feats


def updated(model: GmmModel, accs: khg.AccumAmDiagGmm) -> GmmModel:
    model = copy.deepcopy(model)
    khg.mle_am_diag_gmm_update(config=khg.MleDiagGmmOptions(), amdiag_gmm_acc=accs, flags=khg.str_to_gmm_flags("mvw"), am_gmm=model.am)
    return model


def test_gmm_statistics_of_jobs_update_as_kaldis_own_accumulation_does(run_dir: Path) -> None:
    """gmm-acc-stats-ali as arrays, summed over jobs, then Kaldi's update: against Kaldi's accumulator
    filled a frame at a time (AccumulateForGmm, its posteriors in float), the same model to float tolerance."""
    model, alignments, feats = trained_model_and_alignments(run_dir)
    kaldi = khg.AccumAmDiagGmm()
    kaldi.init(model=model.am, flags=khg.GmmUpdateFlags.kGmmAll)
    tid_to_pdf, like = model.tid_to_pdf(), 0.0
    for utt, tids in alignments.items():
        for frame, pdf in zip(np.asarray(feats[utt], np.float32), tid_to_pdf[tids]):
            like += kaldi.accumulate_for_gmm(model=model.am, data=frame, gmm_index=int(pdf), weight=1.0)
    stats = gmm_stats(model, alignments.items(), feats)
    assert abs(stats.loglike / STATS_SCALE / stats.frames - like / stats.frames) < 1e-5  # the average log-likelihood a frame
    ours, theirs = updated(model, stats.accumulator(model)), updated(model, kaldi)
    for pdf in range(model.num_pdfs):
        a, b = ours.am.get_pdf(pdf), theirs.am.get_pdf(pdf)
        assert a.num_gauss == b.num_gauss
        np.testing.assert_allclose(a.weights, b.weights, atol=1e-6)
        np.testing.assert_allclose(a.means, b.means, atol=1e-4)
        np.testing.assert_allclose(a.vars, b.vars, rtol=1e-3)


def test_gmm_statistics_are_the_same_integers_for_any_split_into_jobs_and_chunks(run_dir: Path) -> None:
    model, alignments, feats = trained_model_and_alignments(run_dir)
    one = gmm_stats(model, alignments.items(), feats)
    for jobs, chunk_frames in ((2, 1 << 18), (3, 1000), (7, 50)):
        parts = [gmm_stats(model, [(u, alignments[u]) for u in part], feats, chunk_frames) for part in split(list(alignments), jobs)]
        total = sum(parts[1:], parts[0])
        for field in ("occupancy", "first", "second", "transitions"):
            np.testing.assert_array_equal(getattr(total, field), getattr(one, field))
        assert (total.loglike, total.frames) == (one.loglike, one.frames)


def test_alignments_live_in_job_files_read_back_in_order(tmp_path: Path) -> None:
    results = [("a", np.arange(3, dtype=np.int32), None), ("b", None, "too short"), ("c", np.full(2, 7, np.int32), None)]
    first, dropped = write_alignments(results, tmp_path / "ali.0")
    empty, _ = write_alignments([("d", None, "no pronunciation")], tmp_path / "ali.1")  # a job whose utterances all failed
    both = Alignments(first.files + empty.files, first.utts + empty.utts, first.lengths + empty.lengths)
    assert dropped == {"b": "too short"} and len(both) == 2 and both.num_frames == 5 and len(both.parts()) == 2
    assert [(utt, tids.tolist()) for utt, tids in both.items()] == [("a", [0, 1, 2]), ("c", [7, 7])]
    both.remove()
    assert not list(tmp_path.iterdir())
