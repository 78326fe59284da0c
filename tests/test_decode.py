from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import Split
from asrkd.kaldi.decode import (check_scores, choice_margin, choose_weights, log_priors, out_of_vocabulary, transition_id_matrix, unseen_sentences,
                                utterance_errors, word_error_rate)
from asrkd.kaldi.graph import NO_PRONUNCIATION, language_model, lm_exclusions
from asrkd.report import choice_line, out_of_vocabulary_line


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
    # a tie is broken towards the smallest LM weight, then the smallest penalty (the rule the report states)
    tied = {(12.0, 0.0): dict(refs), (9.0, 0.5): dict(refs), (9.0, 0.0): dict(refs), (8.0, 0.0): {"a": "ONE", "b": "THREE"}}
    assert choose_weights(refs, tied)[0] == (9.0, 0.0)


def test_the_choice_says_its_margin_in_word_errors_and_calls_two_or_fewer_a_tie() -> None:
    dev_wer = {(7.0, 0.0): 4 / 500, (8.0, 0.0): 6 / 500, (9.0, 0.5): 9 / 500, (10.0, 0.0): 20 / 500}
    choice = choice_margin(dev_wer, (7.0, 0.0), 500)
    assert (choice["errors"], choice["runner_up"]["errors"], choice["margin_errors"], choice["tie"]) == (4, 6, 2, True)
    assert choice["within_tie"] == [[7.0, 0.0], [8.0, 0.0]]
    clear = choice_margin({**dev_wer, (8.0, 0.0): 7 / 500}, (7.0, 0.0), 500)
    assert (clear["margin_errors"], clear["tie"], clear["within_tie"]) == (3, False, [[7.0, 0.0]])
    report = {"tuning_set": "valid", "systems": {"gmm": {"lmwt": 7.0, "word_ins_penalty": 0.0, "lmwt_choice": choice},
                                                 "baseline": {"lmwt": 7.0, "word_ins_penalty": 0.0, "lmwt_choice": clear}}}
    assert choice_line(report) == (
        "LM weight chosen on the validation speakers: gmm LMWT 7, penalty 0 (4 errors of 500 words) beats the runner-up (LMWT 8, "
        "penalty 0) by 2 word errors: a tie (2 points within 2 errors), broken by the smallest LM weight, then insertion penalty, "
        "among the lowest WER; baseline LMWT 7, penalty 0 (4 errors of 500 words) beats the runner-up (LMWT 8, penalty 0) by 3 "
        "word errors.")


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


ARPA = """
\\data\\
ngram 1=5
ngram 2=1

\\1-grams:
-1.0 </s>
-99 <s> -0.5
-0.7 ONE -0.3
-0.7 TWO
-1.2 <unk>

\\2-grams:
-0.2 <s> ONE

\\end\\
"""


def graph_cfg(tmp_path: Path, tuning_set: str = "valid"):
    return OmegaConf.create({"exp_dir": str(tmp_path / "exp"), "data_dir": str(tmp_path / "data"), "seed": 0,
                             "graph": {"lm_order": 2, "lm_exclude_valid": True, "lm_arpa": None}, "decode": {"tuning_set": tuning_set}})


def test_the_oov_rate_counts_reference_words_the_lm_cannot_output(tmp_path: Path) -> None:
    (tmp_path / "exp" / "graph").mkdir(parents=True)
    (tmp_path / "exp" / "graph" / "lm_2gram.arpa").write_text(ARPA)
    (tmp_path / "exp" / "graph" / "words.txt").write_text("<eps> 0\nONE 1\nTHREE 2\n#0 3\n<s> 4\n</s> 5\n")
    vocabulary = language_model(graph_cfg(tmp_path)).vocabulary()
    assert vocabulary == {"ONE"}  # the unigrams the lexicon holds: TWO has no pronunciation, THREE no n-gram
    oov = out_of_vocabulary({"a": "ONE TWO THREE", "b": "THREE FOUR ONE"}, vocabulary | {"TWO"})
    assert (oov["tokens"], oov["oov_tokens"], oov["oov_types"]) == (6, 3, 2)
    assert oov["oov_rate"] == pytest.approx(0.5) and list(oov["oov_words"]) == ["THREE", "FOUR"]  # most frequent first
    assert out_of_vocabulary_line({"test": oov}).endswith("test 50.00% of 6 words (2 word types: THREE FOUR; 2 not in the LM).")
    # by cause: a word the LM has but make-graph left out (no pronunciation) is told apart from one the LM lacks
    why = {"THREE": "in the LM, without a usable pronunciation (in neither the corpus dictionary nor CMUdict)"}
    oov = out_of_vocabulary({"a": "ONE TWO THREE", "b": "THREE FOUR ONE"}, vocabulary, why)
    assert {cause: (c["tokens"], c["types"], list(c["words"])) for cause, c in oov["causes"].items()} == {
        why["THREE"]: (2, 1, ["THREE"]), "not in the LM": (2, 2, ["TWO", "FOUR"])}
    assert out_of_vocabulary_line({"test": oov}).endswith(f"(3 word types: THREE TWO FOUR; 1 {why['THREE']}; 2 not in the LM).")



def test_an_lm_word_left_out_of_the_graph_keeps_make_graphs_reason(tmp_path: Path) -> None:
    """The LM's words outside words.txt are told apart from words the LM lacks: each with the reason
    make-graph recorded (none recorded: without a usable pronunciation); the LM's other words are not listed."""
    from asrkd.stage import plan

    cfg = graph_cfg(tmp_path)
    stage = plan("make-graph", tmp_path / "exp" / "graph", sections.settings(cfg, ["seed"]))
    (tmp_path / "exp" / "graph" / "lm_2gram.arpa").write_text(ARPA)
    (tmp_path / "exp" / "graph" / "words.txt").write_text("<eps> 0\nONE 1\nTHREE 2\n#0 3\n<s> 4\n</s> 5\n")
    stage.commit(lm_words_left_out={"TWO": "in neither the corpus dictionary nor CMUdict"})
    lm = language_model(cfg)
    assert lm.words_left_out() == {"TWO": f"{NO_PRONUNCIATION} (in neither the corpus dictionary nor CMUdict)"}
    oov = out_of_vocabulary({"a": "ONE TWO FOUR"}, lm.vocabulary(), lm.words_left_out())
    assert {cause: list(c["words"]) for cause, c in oov["causes"].items()} == {
        f"{NO_PRONUNCIATION} (in neither the corpus dictionary nor CMUdict)": ["TWO"], "not in the LM": ["FOUR"]}

def test_the_lm_leaves_out_the_tuning_sets_sentences_whichever_set_tunes(tmp_path: Path) -> None:
    dev = tmp_path / "data" / "dev"
    dev.mkdir(parents=True)
    (dev / "text").write_text("dev-1 ONE TWO\ndev-2 TWO\n")
    split = Split(tmp_path / "data", 0.1, 0)
    assert lm_exclusions(True, "dev", split) == {"dev-1", "dev-2"}
    assert lm_exclusions(False, "dev", split) == set()



def test_the_tiny_runs_lm_never_saw_the_validation_speakers_sentences(run_dir: Path) -> None:
    """decode.tuning_set=valid (the default): the LM was trained on train's transcripts less the
    validation speakers' (data.split_by_speaker, a second route), as its record and its text show."""
    import json

    from asrkd.data import DataDir, split_by_speaker

    from conftest import tiny_config

    cfg = tiny_config(run_dir)
    train = DataDir.read(run_dir / "data" / "train")
    valid = set(split_by_speaker(train, float(cfg.train.valid_fraction), int(cfg.seed))[1])
    summary = json.loads((run_dir / "exp" / "graph" / "stage.json").read_text())["summary"]
    assert valid and summary["lm_sentences"] + summary["lm_sentences_dropped"] == len(train.text) - len(valid & set(train.text))

def test_the_oov_warning_fires_above_its_threshold_with_each_causes_fix(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On the tiny run (its test set holds words the training transcripts lack): a threshold under the
    test set's rate warns, naming the words, their cause and the fix; one above it stays silent."""
    import logging

    from asrkd.evaluate import out_of_vocabulary_by_set

    from conftest import tiny_config

    cfg = tiny_config(run_dir)
    lm, data_sets, split = language_model(cfg), sections.data_sets(cfg), sections.split(cfg)
    rate = out_of_vocabulary_by_set(lm, data_sets, split, float(cfg.decode.oov_warning))["test"]
    assert rate["oov_rate"] > 0 and list(rate["causes"]) == ["not in the LM"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asrkd.evaluate"):
        out_of_vocabulary_by_set(lm, data_sets, split, rate["oov_rate"] * 0.99)
    warned = [r.getMessage() for r in caplog.records if "can never be recognised" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"test: {100 * rate['oov_rate']:.1f}% of its reference words")
    assert next(iter(rate["causes"]["not in the LM"]["words"])) in warned[0] and "graph.lm_arpa=YOUR.arpa" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asrkd.evaluate"):
        out_of_vocabulary_by_set(lm, data_sets, split, min(1.0, rate["oov_rate"] * 1.01))
    assert not [r for r in caplog.records if "can never be recognised" in r.getMessage()]


def test_the_priors_are_floored_and_renormalized() -> None:
    """log P(pdf) = log(max(count / total, floor) / sum of those): a pdf the alignment never saw gets
    the floor's prior, not log 0 (which would make its scaled likelihood infinite), by hand."""
    counts = np.array([6.0, 0.0, 3.0, 1.0])
    floor = 0.05
    floored = np.maximum(counts / counts.sum(), floor)
    np.testing.assert_allclose(log_priors(counts, floor), np.log(floored / floored.sum()), rtol=1e-12)
    assert np.isfinite(log_priors(counts, floor)).all() and log_priors(counts, floor)[1] == pytest.approx(np.log(0.05 / 1.05))
