"""The bootstrap on cases whose answer is known."""

import numpy as np
import pytest

from asrkd.stats import Bootstrap, UtteranceCounts, format_interval, frame_table, mean_std


def counts(hits: list[list[int]], totals: list[int]) -> UtteranceCounts:
    utts = [f"u{i:04d}" for i in range(len(totals))]
    return UtteranceCounts.from_tables([{u: [h, t] for u, h, t in zip(utts, row, totals)} for row in hits])


def test_interval_of_independent_frames_matches_the_binomial() -> None:
    rng = np.random.default_rng(0)
    n, p = 4000, 0.6
    hits = (rng.random(n) < p).astype(int)  # one frame per utterance: independent trials
    boot = Bootstrap([f"u{i:04d}" for i in range(n)], replicates=4000, seed=1)
    result = boot.add("a", counts([hits.tolist()], [1] * n))
    half_width = 1.96 * np.sqrt(p * (1 - p) / n)  # the normal approximation of the binomial interval
    assert result["estimate"] == pytest.approx(hits.mean())
    assert (result["ci"][1] - result["ci"][0]) / 2 == pytest.approx(half_width, rel=0.08)
    assert result["ci"][0] < hits.mean() < result["ci"][1]


def test_whole_utterances_widen_the_interval_when_their_frames_agree() -> None:
    rng = np.random.default_rng(2)
    utterances, frames = 400, 100
    right = (rng.random(utterances) < 0.5).astype(int)  # every frame of an utterance right, or every one wrong
    boot = Bootstrap([f"u{i:04d}" for i in range(utterances)], replicates=4000, seed=3)
    ci = boot.add("a", counts([(right * frames).tolist()], [frames] * utterances))["ci"]
    # 400 independent units, not 40000 frames: the half width is that of 400 coin flips, 10x the frame-level one
    assert (ci[1] - ci[0]) / 2 == pytest.approx(1.96 * np.sqrt(0.25 / utterances), rel=0.1)


def test_paired_differences() -> None:
    rng = np.random.default_rng(4)
    totals = rng.integers(50, 150, 300)
    base = rng.binomial(totals, 0.55)
    boot = Bootstrap([f"u{i:04d}" for i in range(300)], replicates=2000, seed=5)
    boot.add("a", counts([base.tolist()], totals.tolist()))
    boot.add("same", counts([base.tolist()], totals.tolist()))
    boot.add("better", counts([np.minimum(base + 3, totals).tolist()], totals.tolist()))
    same = boot.difference("same", "a")
    assert same["estimate"] == 0 and same["ci"] == [0.0, 0.0] and same["p_above_zero"] == 0.0
    better = boot.difference("better", "a")
    assert better["ci"][0] > 0 and better["p_above_zero"] == 1.0  # better on every utterance: in every replicate
    assert boot.add("a", counts([base.tolist()], totals.tolist())) == boot.interval("a")  # the same statistic again: kept
    with pytest.raises(ValueError, match="'a' added again with other counts"):  # another under its name: refused, never the first's interval
        boot.add("a", counts([np.minimum(base + 3, totals).tolist()], totals.tolist()))


def test_gain_kept_of_a_student_half_way_is_one_half_in_every_replicate() -> None:
    rng = np.random.default_rng(6)
    totals = np.full(200, 10)
    baseline = rng.integers(2, 6, 200)
    ensemble = baseline + 4
    student = baseline + 2  # exactly half of the ensemble's gain on every utterance
    boot = Bootstrap([f"u{i:04d}" for i in range(200)], replicates=1000, seed=7)
    for key, hits in (("b", baseline), ("e", ensemble), ("s", student)):
        boot.add(key, counts([hits.tolist()], totals.tolist()))
    kept = boot.share("s", "b", "e")
    assert kept["estimate"] == pytest.approx(0.5)
    assert kept["ci"] == pytest.approx([0.5, 0.5]) and kept["whole_gain_significant"]
    assert format_interval(kept) == "50.00% [50.00, 50.00]"


def test_a_share_with_the_teacher_drawn_holds_both_teachers() -> None:
    """Two teachers of one student recipe: the student keeps all of teacher a's gain (+4) and none
    of b's (+2, which it does not reach). Each pair alone has no spread; drawn with the teachers,
    the interval holds both pairs' shares, and the estimate is the share of the mean gain."""
    rng = np.random.default_rng(11)
    totals = np.full(200, 10)
    baseline = rng.integers(2, 6, 200)
    boot = Bootstrap([f"u{i:04d}" for i in range(200)], replicates=2000, seed=12)
    for key, hits in (("b", baseline), ("teacher a", baseline + 4), ("student a", baseline + 4),
                      ("teacher b", baseline + 2), ("student b", baseline)):
        boot.add(key, counts([hits.tolist()], totals.tolist()))
    assert boot.share("student a", "b", "teacher a")["ci"] == pytest.approx([1.0, 1.0])
    assert boot.share("student b", "b", "teacher b")["ci"] == pytest.approx([0.0, 0.0])
    drawn = boot.share_drawn([("student a", "teacher a"), ("student b", "teacher b")], "b")
    assert drawn["estimate"] == pytest.approx((4 + 0) / 2 / ((4 + 2) / 2))  # the mean student's gain over the mean teacher's
    assert drawn["ci"] == pytest.approx([0.0, 1.0]) and drawn["whole_gain_significant"] and drawn["pairs"] == 2
    state = boot.rng.bit_generator.state
    boot.share_drawn([("student a", "teacher a"), ("student b", "teacher b")], "b")
    assert boot.rng.bit_generator.state == state  # its draws leave the rates' draws as they were: other keys keep their intervals
    assert boot.share_drawn([("student a", "teacher a")], "b") == boot.share("student a", "b", "teacher a") | {"pairs": 1}
    with pytest.raises(ValueError, match="no pairs"):
        boot.share_drawn([], "b")


def test_a_share_of_a_gain_that_may_be_zero_is_undefined() -> None:
    rng = np.random.default_rng(9)
    totals = np.full(200, 10)
    baseline = rng.integers(2, 8, 200)
    noise = rng.integers(-1, 2, 200)  # +-1 hits per utterance, no gain on average
    boot = Bootstrap([f"u{i:04d}" for i in range(200)], replicates=1000, seed=10)
    for key, hits in (("b", baseline), ("e", baseline + noise), ("s", baseline + 1)):
        boot.add(key, counts([hits.tolist()], totals.tolist()))
    kept = boot.share("s", "b", "e")
    assert not kept["whole_gain_significant"] and kept["whole_gain_ci"][0] < 0 < kept["whole_gain_ci"][1]
    assert format_interval(kept).startswith("undefined (the gain it is a share of, [")
    boot.add("same", counts([baseline.tolist()], totals.tolist()))
    none = boot.share("s", "b", "same")  # a gain of exactly 0 (models that all fail alike): no share, no error
    assert none["estimate"] is None and none["ci"] == [None, None] and format_interval(none) == "–"


def test_seeds_are_resampled_too() -> None:
    totals = [100] * 50
    identical = counts([[60] * 50, [60] * 50, [60] * 50], totals)
    spread = counts([[50] * 50, [60] * 50, [70] * 50], totals)  # seeds 10 points apart, no test-set variation
    boot = Bootstrap([f"u{i:04d}" for i in range(50)], replicates=3000, seed=8)
    assert boot.add("identical", identical)["ci"] == pytest.approx([0.6, 0.6])
    result = boot.add("spread", spread)
    assert result["estimate"] == pytest.approx(0.6)
    assert result["ci"][0] < 0.56 and result["ci"][1] > 0.64  # the seed variation makes the interval
    with pytest.raises(ValueError, match="different utterances"):
        UtteranceCounts.from_tables([{"a": [1, 2]}, {"b": [1, 2]}])


def test_speakers_as_units_draw_their_utterances_together() -> None:
    utts = [f"s{s}-u{u}" for s in range(2) for u in range(50)]
    boot = Bootstrap(utts, replicates=500, seed=9, unit_of={u: u.split("-")[0] for u in utts})
    # one speaker all right, the other all wrong: a replicate holds 0, 1 or 2 copies of each speaker
    result = boot.add("a", UtteranceCounts.from_tables([{u: [int(u.startswith("s0")), 1] for u in utts}]))
    assert sorted(set(np.round(boot.samples["a"], 6))) == [0.0, 0.5, 1.0]
    assert result["ci"] == [0.0, 1.0]


def test_frame_table_and_helpers() -> None:
    offsets = np.array([0, 3, 5, 9])
    table = frame_table(["a", "b", "c"], offsets, np.array([0, 1, 2, 6, 7]), np.array([1, 0, 1, 1, 1]))
    assert table == {"a": [2, 3], "c": [2, 2]}  # b has no frames among the indices
    assert mean_std([0.5, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414, abs=1e-4), "n": 2, "min": 0.5, "max": 0.7}
    assert format_interval({"estimate": 0.5597, "ci": [0.551, 0.5684]}) == "55.97% [55.10, 56.84]"
    assert format_interval({"estimate": 0.0196, "ci": [-0.001, 0.031]}, signed=True) == "+1.96 [-0.10, +3.10]"
