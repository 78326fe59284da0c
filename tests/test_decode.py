import numpy as np
import pytest

from asrkd.kaldi.decode import (check_scores, choose_weights, log_priors, transition_id_matrix, unseen_sentences,
                                utterance_errors, word_error_rate)


def test_wer_counts_errors_by_kind() -> None:
    refs = {"a": "ONE TWO THREE", "b": "YES"}
    assert word_error_rate(refs, dict(refs))["wer"] == 0.0
    result = word_error_rate(refs, {"a": "ONE TOO THREE FOUR"})  # b has no output: a deletion
    assert (result["substitutions"], result["insertions"], result["deletions"]) == (1, 1, 1)
    assert result["wer"] == pytest.approx(3 / 4)


def test_utterance_errors_add_up_to_the_corpus_wer() -> None:
    refs = {"a": "ONE TWO THREE", "b": "YES", "c": "GO TO SLEEP NOW"}
    hyps = {"a": "ONE TOO THREE FOUR", "c": "GO SLEEP NOW NOW"}  # b: no output, all deleted
    per_utterance = utterance_errors(refs, hyps)
    assert per_utterance == {"a": [2, 3], "b": [1, 1], "c": [2, 4]}
    total = word_error_rate(refs, hyps)
    assert sum(e for e, _ in per_utterance.values()) == total["substitutions"] + total["deletions"] + total["insertions"]


def test_sweep_choice_is_the_dev_best_pair() -> None:
    refs = {"a": "ONE TWO", "b": "THREE"}
    hyps = {(8.0, 0.0): {"a": "ONE", "b": "THREE"}, (10.0, 0.5): dict(refs), (12.0, 0.0): {"a": "ONE TWO TWO", "b": "THREE"}}
    best, dev_wer = choose_weights(refs, hyps)
    assert best == (10.0, 0.5) and dev_wer[best] == 0.0 and dev_wer[(8.0, 0.0)] == pytest.approx(1 / 3)


def test_transition_id_columns_carry_their_pdf_scores() -> None:
    loglikes = np.array([[0.0, -1.0, -2.0], [-3.0, -4.0, -5.0]])
    tid_to_pdf = np.array([-1, 2, 2, 0, 1])  # transition-ids 1..4 (0 is unused)
    matrix = transition_id_matrix(loglikes, tid_to_pdf, acoustic_scale=0.1)
    np.testing.assert_allclose(matrix, 0.1 * np.array([[-2.0, -2.0, 0.0, -1.0], [-5.0, -5.0, -3.0, -4.0]]))


def test_bad_scores_are_named() -> None:
    good = np.zeros((5, 3))
    check_scores("u1", good, 5, 3)
    with pytest.raises(ValueError, match="u1: score matrix has shape \\(5, 4\\)"):
        check_scores("u1", np.zeros((5, 4)), 5, 3)
    with pytest.raises(ValueError, match="u1: 4 score rows for 5 frames"):
        check_scores("u1", np.zeros((4, 3)), 5, 3)
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="u1: 1 NaN/inf"):
        check_scores("u1", bad, 5, 3)


def test_priors_are_floored_and_normalized() -> None:
    logp = log_priors(np.array([90.0, 10.0, 0.0]), floor=1e-6)
    assert np.isfinite(logp).all() and np.exp(logp).sum() == pytest.approx(1.0)
    assert np.exp(logp[0]) == pytest.approx(0.9, rel=1e-5)


def test_unseen_sentences() -> None:
    assert unseen_sentences({"t1": "A B", "t2": "C"}, {"x": "C", "y": "A"}) == ["t1"]
