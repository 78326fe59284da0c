import kaldi_hmm_gmm as khg
import numpy as np
from omegaconf import OmegaConf

from asrkd.kaldi.gmm import global_moments, mix_up, single_gaussian, split_targets


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
