import logging
from pathlib import Path

import kaldifst
import pytest

from asrkd.errors import StageMismatch
from asrkd.kaldi.lang import Lang, add_disambig, build_lexicon, position_phones, prepare_lang, read_sphinx_dict, refuse_case_clashes


def test_sphinx_dict_alternates_and_stress(tmp_path: Path) -> None:
    path = tmp_path / "x.dic"
    path.write_text("A  AH\nA(2)  EY\nread  R IY1 D\n")
    assert read_sphinx_dict(path) == {"A": [["AH"], ["EY"]], "READ": [["R", "IY", "D"]]}


def test_word_position_phones() -> None:
    assert position_phones(["AH"]) == ["AH_S"]
    assert position_phones(["T", "UW"]) == ["T_B", "UW_E"]
    assert position_phones(["S", "IH", "K", "S"]) == ["S_B", "IH_I", "K_I", "S_E"]


def test_disambiguation_of_homophones_and_prefixes() -> None:
    prons = [("TWO", ["T", "UW"]), ("TO", ["T", "UW"]), ("TOOL", ["T", "UW", "L"]), ("GO", ["G", "OW"])]
    result, max_disambig = add_disambig(prons)
    assert result == [("TWO", ["T", "UW", "#1"]), ("TO", ["T", "UW", "#2"]), ("TOOL", ["T", "UW", "L"]), ("GO", ["G", "OW"])]
    assert max_disambig == 2


def test_lexicon_falls_back_to_cmudict_within_the_phone_set() -> None:
    primary = {"YES": [["Y", "EH", "S"]]}
    fallback = {"NO": [["N", "OW"]], "SHE": [["SH", "IY"]]}
    lexicon, missing = build_lexicon({"YES", "NO", "SHE", "QWERTY"}, primary, fallback, {"Y", "EH", "S", "N", "OW", "IY"})
    assert lexicon == {"YES": [["Y", "EH", "S"]], "NO": [["N", "OW"]]}
    assert "outside the phone set" in missing["SHE"]
    assert "neither" in missing["QWERTY"]


def test_prepare_lang_writes_a_kaldi_lang_dir(tmp_path: Path) -> None:
    lexicon = {"YES": [["Y", "EH", "S"]], "A": [["AH"], ["EY"]]}
    lang = prepare_lang(lexicon, tmp_path, "SIL", 0.5, 5, 3)
    assert list(lang.phones)[:2] == ["<eps>", "SIL"]
    assert {"Y_B", "EH_I", "S_E", "AH_S", "EY_S"} <= set(lang.phones)
    assert [lang.phones["SIL"]] in lang.phone_sets
    assert sorted(p for s in lang.phone_sets for p in s) == sorted(lang.real_phone_ids)  # a partition
    assert sorted(lang.phones[f"AH_{pos}"] for pos in "BEIS") in lang.phone_sets  # a phone's variants share a set
    assert list(lang.words)[-3:] == ["#0", "<s>", "</s>"]
    assert "<ForPhones>\n1\n</ForPhones>" in lang.topology_text()  # silence has its own 5-state entry
    loaded = Lang.load(tmp_path)
    assert loaded.words == lang.words
    fst = loaded.lexicon_fst(disambig=True)
    loop = [a for a in kaldifst.ArcIterator(fst, 1) if a.ilabel == lang.phones["#0"]]
    assert len(loop) == 1 and loop[0].olabel == lang.words["#0"] and loop[0].nextstate == 1
    assert loaded.word_ids("YES A", "u1") == [lang.words["YES"], lang.words["A"]]
    with pytest.raises(KeyError, match=r"utterance u2: words 'NO' 'MAYBE' not in .*words.txt"):  # every unknown word, not the first
        loaded.word_ids("NO YES MAYBE NO", "u2")


def test_every_phone_has_every_word_position_so_a_later_word_can_be_spelled(tmp_path: Path) -> None:
    """As Kaldi's prepare_lang.sh: Z is heard only word-initially (ZOO) and W in no word, yet both
    get all four variants, grouped under their base phone (one tree root), so a decoding lang on
    the model's phone table spells SAYS (Z_E) and WE (W_B)."""
    lexicon = {"YES": [["Y", "EH", "S"]], "ZOO": [["Z", "UW"]]}
    lang = prepare_lang(lexicon, tmp_path / "lang", "SIL", 0.5, 5, 3, phone_set={"Y", "EH", "S", "Z", "UW", "W", "IY"})
    assert set(lang.phones) - {"<eps>", "SIL", "#0"} == {f"{p}_{pos}" for p in ("Y", "EH", "S", "Z", "UW", "W", "IY") for pos in "BEIS"}
    assert sorted(lang.phones[f"Z_{pos}"] for pos in "BEIS") in lang.phone_sets
    decoding = prepare_lang(lexicon | {"SAYS": [["S", "EH", "Z"]], "WE": [["W", "IY"]]}, tmp_path / "decoding", "SIL", 0.5, 5, 3,
                            phone_table=lang.phones)
    assert {p: i for p, i in decoding.phones.items() if not p.startswith("#")} == {p: i for p, i in lang.phones.items() if not p.startswith("#")}
    assert decoding.lexicon["SAYS"] == [["S_B", "EH_I", "Z_E"]] and decoding.lexicon["WE"] == [["W_B", "IY_E"]]
    used_only = prepare_lang(lexicon, tmp_path / "used", "SIL", 0.5, 5, 3)  # without a phone set: every variant of the phones used
    assert "Z_E" in used_only.phones and "W_B" not in used_only.phones


def test_words_spelled_in_two_cases_are_refused_with_every_clash_named() -> None:
    refuse_case_clashes({"TEN", "ELEVEN", "yes"}, [Path("data/train/text")])  # one case per word: passes
    with pytest.raises(ValueError, match=r"2 word\(s\) are spelled in two cases across data/train/text, data/heldout/text: "
                                         r"TEN/ten Yes/yes; write every transcript in one case"):
        refuse_case_clashes({"TEN", "ten", "yes", "Yes", "GO"}, [Path("data/train/text"), Path("data/heldout/text")])


def test_kaldilm_messages_go_to_the_log_not_the_terminal(tmp_path: Path, capfd, caplog) -> None:
    from asrkd.kaldi.graph import arpa_to_g

    arpa = tmp_path / "lm.arpa"
    arpa.write_text("\\data\\\nngram 1=4\n\n\\1-grams:\n-1.0\t</s>\n-99.0\t<s>\n-0.5\tA\n-0.5\tB\n\n\\end\\\n")
    words = tmp_path / "words.txt"
    words.write_text("<eps> 0\nA 1\nB 2\n#0 3\n<s> 4\n</s> 5\n")
    with caplog.at_level(logging.DEBUG, logger="asrkd.kaldi.graph"):
        g = arpa_to_g(arpa, words, tmp_path / "G.fst")
    assert g.num_states > 0
    assert "Reading" not in capfd.readouterr().err
    assert any("arpa2fst lm.arpa: [I] Reading \\1-grams: section." in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    arpa.write_text(arpa.read_text().replace("-0.5\tB", "-0.5\tB\t-0.3"))  # a back-off weight on the highest order: not an ARPA LM
    with pytest.raises(ValueError, match=r"lm.arpa: kaldilm cannot read it .* line 8 .*Invalid n-gram data line.*graph.lm_arpa"):
        arpa_to_g(arpa, words, tmp_path / "G_bad.fst")
    assert not (tmp_path / "G_bad.fst").exists()


def test_kaldingram_progress_bars_stay_off_the_terminal_even_after_tqdm_was_imported(tmp_path: Path, capfd) -> None:
    """tqdm reads TQDM_DISABLE once, when first imported (here: already, by the suite's imports), so the
    LM is trained in a process of its own where its bars are off; the ARPA it writes is a 2-gram LM."""
    import tqdm  # noqa: F401  (imported first, as a long-running command has it)

    from asrkd.kaldi.graph import arpa_order, arpa_unigrams, train_arpa

    arpa = train_arpa(["ONE TWO", "TWO THREE ONE", "ONE"], 2, tmp_path)
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err[-500:]
    assert arpa_order(arpa) == 2 and arpa_unigrams(arpa) == {"ONE", "TWO", "THREE"}


def test_a_dictionary_entry_for_a_word_outside_train_leaves_the_lang_and_its_models_current(tmp_path: Path) -> None:
    """A set added later needs a pronunciation for its new word: the user adds it to the dictionary.
    The lang (and so the GMM and every model on its phones) stays current, as in Kaldi, where a new
    lexicon word needs a new graph, not a new model; a new pronunciation of a training word or a
    phone remakes it (redo=true)."""
    from asrkd.cli import load_config
    from asrkd.kaldi import lang

    dict_dir, train = tmp_path / "data" / "local" / "dict", tmp_path / "data" / "train"
    dict_dir.mkdir(parents=True)
    train.mkdir(parents=True)
    (train / "text").write_text("u1 YES ZOO\n")
    (dict_dir / "nonsilence_phones.txt").write_text("Y\nEH\nS\nZ\nUW\nN\nOW\n")
    (dict_dir / "silence_phones.txt").write_text("SIL\n")
    (dict_dir / "optional_silence.txt").write_text("SIL\n")
    lexicon = dict_dir / "lexicon.txt"
    lexicon.write_text("YES Y EH S\nZOO Z UW\n")
    cfg = load_config([f"data_dir={tmp_path}/data", f"exp_dir={tmp_path}/exp", "lang.use_cmudict=false"])
    lang.run(cfg)
    record = (tmp_path / "data" / "lang" / "stage.json").read_text()

    lexicon.write_text("YES Y EH S\nZOO Z UW\nNO N OW\n")  # the later set's word
    lang.run(cfg)
    assert (tmp_path / "data" / "lang" / "stage.json").read_text() == record  # kept: current

    lexicon.write_text("YES Y EH S\nZOO Z OW\nNO N OW\n")  # a training word pronounced otherwise
    with pytest.raises(StageMismatch, match="prepare-lang: .* with other settings: .*dict.*redo=true"):
        lang.run(cfg)
