"""The generic recipe (recipes/kaldi_data/run.sh) end to end on Kaldi data dirs a user would bring:
a few AN4 speakers under other names, two evaluation sets, a Kaldi dict with extra silence phones,
wav.scp with relative paths and with commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asrkd.data import DataDir, DataDirError
from asrkd.kaldi.graph import train_arpa
from asrkd.kaldi.lang import Dictionary

from conftest import REPO, TINY, wer_from_hypotheses


TRAIN_SPEAKERS = 5


def kaldi_corpus(run_dir: Path, root: Path) -> Path:
    """root/s5/data/{train,dev,test,local/dict}: AN4 utterances renamed (spk -> user_<spk>), the
    first TRAIN_SPEAKERS training speakers (what a recipe end to end needs, in less time), the two test
    speakers split into dev and test; dev's wav.scp relative to s5, test's commands."""
    s5 = root / "s5"
    train, test = (DataDir.read(run_dir / "data" / name) for name in ("train", "test"))
    sets = {"train": (train, sorted(train.spk2utt)[:TRAIN_SPEAKERS])}
    speakers = sorted(test.spk2utt)
    sets |= {"dev": (test, speakers[:1]), "test": (test, speakers[1:])}
    for name, (source, keep) in sets.items():
        renamed = DataDir()
        for utt in source.utt_ids:
            spk = source.utt2spk[utt]
            if spk not in keep:
                continue
            new = f"user_{utt}"
            wav = source.wav_scp[utt]
            if name == "dev":
                link = s5 / "audio" / f"{new}.wav"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(wav)
                wav = f"audio/{new}.wav"
            elif name == "test":
                wav = f"cat {wav} |"
            renamed.wav_scp[new], renamed.text[new], renamed.utt2spk[new] = wav, source.text[utt], f"user_{spk}"
        renamed.write(s5 / "data" / name)
    dict_dir = s5 / "data" / "local" / "dict"
    dict_dir.mkdir(parents=True)
    an4_dict = run_dir / "data" / "local" / "dict"
    from asrkd.kaldi.lang import read_sphinx_dict

    lexicon = read_sphinx_dict(an4_dict / "lexicon.dic")
    lines = [f"{w} {' '.join(p)}\n" for w in sorted(lexicon) for p in lexicon[w]] + ["!SIL SIL\n", "<UNK> SPN\n"]
    (dict_dir / "lexicon.txt").write_text("".join(lines))
    (dict_dir / "nonsilence_phones.txt").write_text((an4_dict / "nonsilence_phones.txt").read_text())
    (dict_dir / "silence_phones.txt").write_text("SIL\nSPN\n")
    (dict_dir / "optional_silence.txt").write_text("SIL\n")
    return s5 / "data"


def test_generic_recipe_scores_two_eval_sets_end_to_end(run_dir: Path, tmp_path: Path) -> None:
    """Then a set added later, and an ARPA LM of the user's that knows the test set's words."""
    corpus = kaldi_corpus(run_dir, tmp_path)
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = ["bash", str(REPO / "recipes" / "kaldi_data" / "run.sh"), "--corpus-dir", str(corpus), "--",
               f"data_dir={work}/data", f"exp_dir={work}/exp", "corpus=mine", "eval_sets=[dev,test]", "decode.tuning_set=dev",
               "jobs.nj=2", *TINY]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    assert "SPN" in (work / "data" / "lang" / "phones" / "silence.txt").read_text().split()
    assert DataDir.read(work / "data" / "test").wav_scp[f"user_{DataDir.read(run_dir / 'data' / 'test').utt_ids[-1]}"].endswith("|")
    assert all(Path(p).is_absolute() for p in DataDir.read(work / "data" / "dev").wav_scp.values())
    report = json.loads((work / "exp" / "report" / "report.json").read_text())
    assert (report["corpus"], report["eval_sets"], report["tuning_set"]) == ("mine", ["dev", "test"], "dev")
    baseline = report["systems"]["baseline"]
    assert set(baseline["frame_accuracy"]) == {"train", "valid", "dev", "test"}
    assert set(baseline["frame_accuracy_ci"]) == set(baseline["wer_ci"]) == {"dev", "test"}
    for name in ("dev", "test"):
        lo, hi = baseline["frame_accuracy_ci"][name]
        assert lo <= baseline["frame_accuracy"][name] <= hi and baseline["wer"][name] == pytest.approx(wer_from_hypotheses(work, "baseline", name))
    assert set(report["systems"]["gmm"]["wer"]) == {"dev", "test"}
    wer = json.loads((work / "exp" / "decode" / "baseline" / "wer.json").read_text())
    assert wer["tuning_set"] == "dev" and "sweep_dev_wer" in wer and set(wer["utterance_errors"]) == {"dev", "test"}
    table = (work / "exp" / "report" / "report.md").read_text()
    assert "| frame acc. dev [95% CI] | frame acc. test [95% CI] | WER dev [95% CI] | WER test [95% CI] | LMWT |" in table
    order = report["config"]["graph"]["lm_order"]  # the report names the LM that decoded
    assert f"HCLG with a {order}-gram LM trained on train's transcripts, the tuning set's sentences left out)" in table

    # a set that comes later: features, the trained GMM's alignment, then decoded and scored; nothing retrained
    dev = DataDir.read(work / "data" / "dev")
    extra = DataDir(wav_scp={f"x{u}": w for u, w in dev.wav_scp.items()}, text={f"x{u}": t for u, t in dev.text.items()},
                    utt2spk={f"x{u}": f"x{s}" for u, s in dev.utt2spk.items()})
    extra.write(work / "data" / "extra")
    records = {name: json.loads((work / path / "stage.json").read_text())["fingerprint"] for name, path in
               (("lang", "data/lang"), ("gmm", "exp/tri"), ("dnn", "exp/dnn/baseline"))}
    decoded = {name: (work / "exp" / "decode" / "baseline" / name).stat().st_mtime_ns for name in ("hyp_dev.txt", "hyp_test.txt")}
    base = [f"data_dir={work}/data", f"exp_dir={work}/exp", *TINY]
    for command in (["make-feats", "features.sets=[extra]"], ["align", "features.sets=[extra]"],
                    ["decode", "eval_sets=[dev,test,extra]", "decode.tuning_set=dev"],  # the new set alone: no redo
                    ["evaluate", "eval_sets=[dev,test,extra]", "decode.tuning_set=dev"]):
        result = subprocess.run(["python", "-m", "asrkd.cli", *command, *base, "decode.unseen_sentences=[]"], env=env,
                                capture_output=True, text=True, cwd=work)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    assert {name: json.loads((work / path / "stage.json").read_text())["fingerprint"] for name, path in
            (("lang", "data/lang"), ("gmm", "exp/tri"), ("dnn", "exp/dnn/baseline"))} == records
    report = json.loads((work / "exp" / "report" / "report.json").read_text())
    baseline = report["systems"]["baseline"]
    assert baseline["frame_accuracy"]["extra"] == pytest.approx(baseline["frame_accuracy"]["dev"])  # the same audio
    assert baseline["wer"]["extra"] == pytest.approx(baseline["wer"]["dev"])
    assert {name: (work / "exp" / "decode" / "baseline" / name).stat().st_mtime_ns for name in decoded} == decoded  # not decoded again
    extended = json.loads((work / "exp" / "decode" / "baseline" / "wer.json").read_text())
    assert (extended["lmwt"], extended["dev"], set(extended["utterance_errors"])) == (wer["lmwt"], wer["dev"], {"dev", "test", "extra"})

    # the user's own ARPA LM, trained on text that holds the test set's sentences: its words join the decoding lang
    # (data/lang and the acoustic models stay as they are), the OOV rate it reports falls to 0 and so does the WER
    before = report["out_of_vocabulary"]["test"]
    assert before["oov_rate"] > 0 and report["systems"]["baseline"]["wer"]["test"] > 0
    assert list(before["causes"]) == ["not in the LM"] and before["causes"]["not in the LM"]["types"] == before["oov_types"]
    user_text = [t for name in ("train", "test") for t in DataDir.read(work / "data" / name).text.values()]
    user_dir = tmp_path / "user_lm"
    user_dir.mkdir()
    arpa = train_arpa(user_text, 3, user_dir)
    for command in (["make-graph"], ["decode", "decode.tuning_set=dev"], ["evaluate", "decode.tuning_set=dev"]):
        result = subprocess.run(["python", "-m", "asrkd.cli", *command, *base, "eval_sets=[dev,test]", "decode.unseen_sentences=[]",
                                 f"graph.lm_arpa={arpa}", "redo=true"], env=env, capture_output=True, text=True, cwd=work)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    assert {name: json.loads((work / path / "stage.json").read_text())["fingerprint"] for name, path in
            (("lang", "data/lang"), ("gmm", "exp/tri"), ("dnn", "exp/dnn/baseline"))} == records
    user = json.loads((work / "exp" / "report" / "report.json").read_text())
    assert before["oov_words"] and user["out_of_vocabulary"]["test"]["oov_rate"] == 0.0
    assert user["lm"] == f"the ARPA LM {arpa} (3-gram, graph.lm_arpa)" and user["lm"] in (work / "exp" / "report" / "report.md").read_text()
    assert user["systems"]["baseline"]["wer"]["test"] < baseline["wer"]["test"]


def test_a_dictionary_phone_outside_the_phone_set_is_named(tmp_path: Path) -> None:
    (tmp_path / "lexicon.txt").write_text("hello HH AH L OW\nworld W ER L D\n")
    (tmp_path / "nonsilence_phones.txt").write_text("HH\nAH\nL\nOW\nW\nD\n")
    (tmp_path / "silence_phones.txt").write_text("SIL\n")
    with pytest.raises(ValueError, match="'world' uses ER"):
        Dictionary.read(tmp_path, "SIL")
    (tmp_path / "nonsilence_phones.txt").write_text("HH\nAH\nL\nOW\nW\nD\nER\n")
    dictionary = Dictionary.read(tmp_path, "SIL")
    assert dictionary.optional_silence == "SIL" and dictionary.lexicon["world"] == [["W", "ER", "L", "D"]]


def test_a_data_dir_with_segments_is_refused_with_the_fix(tmp_path: Path) -> None:
    DataDir(wav_scp={"a-1": "/x.wav"}, text={"a-1": "HI"}, utt2spk={"a-1": "a"}).write(tmp_path)
    (tmp_path / "segments").write_text("a-1 rec 0.0 1.0\n")
    with pytest.raises(DataDirError, match="extract_wav_segments_data_dir"):
        DataDir.read(tmp_path)


def test_a_wav_scp_command_is_read_and_a_failing_one_named(tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    from asrkd.kaldi.features import AudioError, read_waveform

    wav = tmp_path / "a.wav"
    sf.write(wav, (np.sin(np.arange(1600) / 5) * 3000).astype(np.int16), 16000, subtype="PCM_16")
    assert np.array_equal(read_waveform(f"cat {wav} |", "u1", 16000), read_waveform(str(wav), "u1", 16000))
    with pytest.raises(AudioError, match="utterance u2: the wav.scp command failed"):
        read_waveform(f"cat {tmp_path}/missing.wav |", "u2", 16000)


def write_raw_data_dir(directory: Path, utts: dict[str, str]) -> None:
    """A data dir as a user's tools write it (no validation): utterance -> transcript, speaker 'spk'."""
    directory.mkdir(parents=True)
    (directory / "wav.scp").write_text("".join(f"{u} /audio/{u}.wav\n" for u in utts))
    (directory / "text").write_text("".join(f"{u} {t}\n" if t else f"{u}\n" for u, t in utts.items()))
    (directory / "utt2spk").write_text("".join(f"{u} spk\n" for u in utts))
    (directory / "spk2utt").write_text(f"spk {' '.join(utts)}\n")


def test_an_empty_transcript_is_a_counted_drop_with_its_fix_and_fatal_only_past_the_limit(tmp_path: Path) -> None:
    """Stage 0 of the generic recipe: an utterance with no words is left out of the copy, named with
    its fix in data/local/dropped_<set>.json; a training set losing more than prep.max_drop_fraction
    stops, a scored set never does."""
    from asrkd.drops import TooManyDropped
    from local.kaldi_data import import_data_dir

    source = tmp_path / "corpus" / "data" / "test"
    write_raw_data_dir(source, {"spk-1": "HELLO", "spk-2": "", "spk-3": "WORLD", "spk-4": ""})
    with pytest.raises(DataDirError, match="'spk-2' has an empty transcript; give it its words, or remove its text line"):
        DataDir.read(source)  # any other command: one line with the fix
    report = tmp_path / "dropped_test.json"
    data = import_data_dir(source, tmp_path / "data" / "test", 1.0, report)
    assert data.utt_ids == ["spk-1", "spk-3"] and DataDir.read(tmp_path / "data" / "test").utt_ids == ["spk-1", "spk-3"]
    dropped = json.loads(report.read_text())
    assert dropped["total"] == 4 and sorted(dropped["dropped"]) == ["spk-2", "spk-4"]
    assert "empty transcript" in dropped["dropped"]["spk-2"] and "utils/fix_data_dir.sh" in dropped["dropped"]["spk-2"]
    with pytest.raises(TooManyDropped, match="dropped 2 of 4 utterances, more than prep.max_drop_fraction=0.05"):
        import_data_dir(source, tmp_path / "data" / "train", 0.05, tmp_path / "dropped_train.json")


def guide_commands() -> list[str]:
    """The command lines of docs/own_corpus.md's "The guide as one script", as written there."""
    text = (REPO / "docs" / "own_corpus.md").read_text()
    block = text.split("## The guide as one script", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_own_corpus_guide_runs_as_written(run_dir: Path, tmp_path: Path) -> None:
    """docs/own_corpus.md's script, line by line as written (the tiny model's overrides added to the
    first): the recipe end to end; a set added later, with a new word whose pronunciation the user
    adds to DIR's lexicon and an utterance without audio, scored by `--again --redo` with the last
    run's --corpus-dir and overrides remembered (only the dictionary and the new set are imported, the
    set featurized, aligned, decoded and scored; the lang, GMM, DNN, graph and test's decode stay; the
    missing audio a counted drop); then an ARPA LM made with kaldingram and stages 5-7 with it."""
    corpus = kaldi_corpus(run_dir, tmp_path)
    repo = tmp_path / "repo"  # a copy of the recipe: its exp/ remembers the run
    (repo / "recipes" / "kaldi_data").mkdir(parents=True)
    shutil.copy2(REPO / "recipes" / "kaldi_data" / "run.sh", repo / "recipes" / "kaldi_data" / "run.sh")
    shutil.copy2(REPO / "recipes" / "stages.sh", repo / "recipes" / "stages.sh")
    dev = DataDir.read(corpus / "dev")
    later = DataDir(wav_scp={f"late_{u}": w for u, w in dev.wav_scp.items()}, text={f"late_{u}": t for u, t in dev.text.items()},
                    utt2spk={f"late_{u}": f"late_{s}" for u, s in dev.utt2spk.items()})
    gone, new_word = later.utt_ids[0], later.utt_ids[1]
    later.wav_scp[gone] = str(tmp_path / "no_such.wav")
    later.text[new_word] += " TWOFIVE"
    later.write(corpus / "later")
    (repo / "my_text.txt").write_text("".join(f"{t}\n" for name in ("train", "test") for t in DataDir.read(corpus / name).text.values()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIR": str(corpus), "TQDM_DISABLE": "1"}
    env.pop("ASRKD_OUTER_RECIPE", None)

    def run(command: str) -> None:
        result = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])

    first, new_entry, again, own_lm, with_own_lm = guide_commands()
    assert first.startswith("recipes/kaldi_data/run.sh --corpus-dir") and again.startswith("recipes/kaldi_data/run.sh --again")
    run(f"{first} {' '.join(TINY)}")
    exp = repo / "recipes" / "kaldi_data" / "exp"
    made = {path: json.loads((exp.parent / path / "stage.json").read_text())["fingerprint"]
            for path in ("data/lang", "exp/tri", "exp/dnn/baseline", "exp/graph")}
    decoded = (exp / "decode" / "baseline" / "hyp_test.txt").stat().st_mtime_ns

    run(new_entry)
    run(again)
    # the dictionary's import is remade; the lang (its phones and the training words' pronunciations), GMM, DNN and graph stay
    assert {path: json.loads((exp.parent / path / "stage.json").read_text())["fingerprint"] for path in made} == made
    assert (exp / "decode" / "baseline" / "hyp_test.txt").stat().st_mtime_ns == decoded  # test is not decoded again
    report = json.loads((exp / "report" / "report.json").read_text())
    assert report["eval_sets"] == ["test", "later"] and set(report["systems"]["baseline"]["wer"]) >= {"test", "later"}
    assert report["command"].startswith(f"recipes/kaldi_data/run.sh --corpus-dir {corpus} -- ") and report["command"].endswith(
        "eval_sets=[test,later]")  # what the run amounted to: the remembered arguments, then the new ones
    assert report["frame_accuracy_utterances"]["later"]["of"] == len(later.utt_ids)
    # the one without audio is dropped and counted; the one with the new word is aligned (without its entry it would drop too)
    assert report["frame_accuracy_utterances"]["later"]["aligned"] == len(later.utt_ids) - 1
    assert list(json.loads((exp / "feats" / "fbank" / "later" / "dropped.json").read_text())["dropped"]) == [gone]
    assert new_word in (exp / "decode" / "baseline" / "hyp_later.txt").read_text()

    run(own_lm)
    run(with_own_lm)
    made.pop("exp/graph")
    assert {path: json.loads((exp.parent / path / "stage.json").read_text())["fingerprint"] for path in made} == made
    report = json.loads((exp / "report" / "report.json").read_text())
    assert report["lm"] == f"the ARPA LM {repo / 'lm.arpa'} (3-gram, graph.lm_arpa)" and report["eval_sets"] == ["test", "later"]
    assert report["out_of_vocabulary"]["test"]["oov_rate"] == 0.0  # the user's LM knows the test sentences' words
