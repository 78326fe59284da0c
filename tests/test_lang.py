from pathlib import Path

import kaldifst
import pytest

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
    assert sorted([lang.phones["AH_S"]]) in lang.phone_sets
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


def test_words_spelled_in_two_cases_are_refused_with_every_clash_named() -> None:
    refuse_case_clashes({"TEN", "ELEVEN", "yes"}, [Path("data/train/text")])  # one case per word: passes
    with pytest.raises(ValueError, match=r"2 word\(s\) are spelled in two cases across data/train/text, data/heldout/text: "
                                         r"TEN/ten Yes/yes; write every transcript in one case"):
        refuse_case_clashes({"TEN", "ten", "yes", "Yes", "GO"}, [Path("data/train/text"), Path("data/heldout/text")])
