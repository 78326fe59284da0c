"""Stage 0 of ``recipes/kaldi_data/run.sh``: your own Kaldi data dirs -> ``data/``.

``--corpus-dir`` (``corpus_dir``) is a directory of Kaldi data dirs, as a Kaldi recipe's
``data/`` is: ``train``, every set of ``eval_sets`` and ``decode.tuning_set`` when that is a data
dir, each with ``wav.scp``, ``text``, ``utt2spk`` and ``spk2utt``; and, optionally,
``local/dict`` in Kaldi's layout (``lexicon.txt``, ``nonsilence_phones.txt``,
``silence_phones.txt``, ``optional_silence.txt``). Each data dir is validated (the rules of
``utils/validate_data_dir.sh``) and copied to ``data/<name>``; relative paths in ``wav.scp`` are
read, as Kaldi reads them, from the recipe dir that holds the data dirs (``--corpus-dir``'s
parent) and written absolute; commands (``flac -c -d -s x.flac |``) are kept as written.

Without ``local/dict`` the dictionary is CMUdict: ``data/local/dict/lexicon.txt`` holds the
CMUdict pronunciations (stress marks dropped) of every word of the transcripts, the phone set
is CMUdict's 39 phones and silence is ``lang.silence_phone``. Words CMUdict lacks are listed
here; ``prepare-lang`` names them again and the utterances that use them are dropped, counted.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from asrkd import sections
from asrkd.data import DataDir, DataDirError
from asrkd.drops import account_dropped
from asrkd.files import copy_file, write_text
from asrkd.kaldi.lang import cmudict_path, read_sphinx_dict
from asrkd.stage import digest, plan

log = logging.getLogger("local.kaldi_data")

DICT_FILES = ("lexicon.txt", "nonsilence_phones.txt", "silence_phones.txt", "optional_silence.txt", "extra_questions.txt")


def import_data_dir(source: Path, dest: Path, max_drop_fraction: float, dropped_report: Path) -> DataDir:
    """utils/copy_data_dir.sh after validate_data_dir.sh: the validated copy, wav.scp paths absolute,
    without the utterances whose transcript is empty (dropped, counted and listed in
    ``dropped_report``; more than ``max_drop_fraction`` of the set fails the stage)."""
    data = DataDir.read(source, empty_transcripts=True)
    if not data.text:
        raise DataDirError(f"{source}/text: missing; training and scoring need transcripts")
    empty = data.empty_transcripts()
    account_dropped(f"kaldi_data prep ({source.name})", len(data.utt_ids),
                    {utt: f"utterance {utt}: empty transcript ({source}/text); give it its words, or remove its text line and "
                     "run Kaldi's utils/fix_data_dir.sh" for utt in empty}, max_drop_fraction, dropped_report)
    data = data.subset(sorted(set(data.utt_ids) - set(empty)))
    if not data.utt2spk:
        raise DataDirError(f"{source}: no utterance with a transcript")
    base = source.parent.parent
    for utt, path in data.wav_scp.items():
        if not path.rstrip().endswith("|") and not Path(path).is_absolute():
            data.wav_scp[utt] = str((base / path).resolve())
    data.write(dest)
    return data


def cmudict_dictionary(words: set[str], dict_dir: Path, silence_phone: str) -> list[str]:
    """data/local/dict from CMUdict for ``words``; returns the words it has no pronunciation of."""
    cmudict = read_sphinx_dict(cmudict_path())
    lines, missing = [], []
    for word in sorted(words):
        prons = cmudict.get(word) or cmudict.get(word.upper())
        if prons is None:
            missing.append(word)
        lines += [f"{word} {' '.join(pron)}\n" for pron in prons or []]
    phones = sorted({p for prons in cmudict.values() for pron in prons for p in pron})
    write_text(dict_dir / "lexicon.txt", "".join(lines))
    write_text(dict_dir / "nonsilence_phones.txt", "".join(f"{p}\n" for p in phones))
    write_text(dict_dir / "silence_phones.txt", f"{silence_phone}\n")
    write_text(dict_dir / "optional_silence.txt", f"{silence_phone}\n")
    return missing


def files_digest(directory: Path) -> str:
    """The fingerprint of a directory's files (not its subdirectories)."""
    return digest({p.name: p.read_bytes().decode("latin-1") for p in sorted(directory.glob("*")) if p.is_file()})


def import_set(cfg, corpus: Path, data_dir: Path, name: str) -> DataDir:
    """data/<name> from the corpus's data dir, a stage of its own (its record in
    data/local/import/<name>): a set added later is imported alone, the others skip as current."""
    scored = sections.data_sets(cfg).scoring_only(name)
    stage = plan(f"kaldi_data import {name}", data_dir / "local" / "import" / name, sections.settings(cfg, ()),
                 values={"files": files_digest(corpus / name), "source": str(corpus / name), "scored_only": scored}, clear=False)
    if stage.up_to_date:
        return DataDir.read(data_dir / name)
    data = import_data_dir(corpus / name, data_dir / name, 1.0 if scored else float(cfg.prep.max_drop_fraction),
                           data_dir / "local" / f"dropped_{name}.json")
    log.info("%s: %d utterances, %d speakers", name, len(data.utt2spk), len(data.spk2utt))
    stage.commit(utterances=len(data.utt2spk), speakers=len(data.spk2utt))
    return data


def prepare_dictionary(cfg, corpus: Path, data_dir: Path, words: set[str], train_words: set[str]) -> None:
    """data/local/dict, a stage of its own (its record in data/local/import_dictionary): a copy of
    DIR/local/dict, or CMUdict's pronunciations of ``words``. Its fingerprint is its source and
    train's words, so a set added later changes nothing the lang is made from: its new words take
    their pronunciations in its alignment and decoding langs (the dictionary, then CMUdict)."""
    user_dict = corpus / "local" / "dict"
    stage = plan("kaldi_data dictionary", data_dir / "local" / "import_dictionary", sections.settings(cfg, ("lang.silence_phone",)),
                 values={"source": files_digest(user_dict) if user_dict.is_dir() else "cmudict",
                         "train_words": digest(sorted(train_words))}, clear=False)
    if stage.up_to_date:
        return
    dict_dir = data_dir / "local" / "dict"
    shutil.rmtree(dict_dir, ignore_errors=True)
    if user_dict.is_dir():
        for name in DICT_FILES:
            if (user_dict / name).is_file():
                copy_file(user_dict / name, dict_dir / name)
        missing: list[str] = []
        log.info("dictionary: %s", user_dict)
    else:
        missing = cmudict_dictionary(words, dict_dir, cfg.lang.silence_phone)
        log.info("dictionary: CMUdict for %d words", len(words) - len(missing))
    if missing:
        write_text(data_dir / "local" / "words_without_pronunciation.txt", "".join(f"{w}\n" for w in missing))
        log.warning("%d words are not in CMUdict, listed in %s (their utterances will be dropped): %s%s. Give them "
                    "pronunciations in %s/local/dict/lexicon.txt, Kaldi's layout, with nonsilence_phones.txt, silence_phones.txt "
                    "and optional_silence.txt beside it (stage 0 copies it to data/local/dict; run again with --redo); with "
                    "lang.use_cmudict (the default) and CMUdict's phones in nonsilence_phones.txt, words your lexicon lacks still "
                    "come from CMUdict, so it may hold only these.",
                    len(missing), data_dir / "local" / "words_without_pronunciation.txt", " ".join(missing[:20]),
                    f" and {len(missing) - 20} more" if len(missing) > 20 else "", corpus)
    stage.commit(words=len(words), without_pronunciation=missing)


def prepare(cfg) -> None:
    """Stage 0: data/<set> for train, the tuning set and the eval sets, each imported as a stage of
    its own; then data/local/dict."""
    corpus, data_dir = Path(cfg.corpus_dir).resolve(), Path(cfg.data_dir)
    names = sections.data_sets(cfg).corpus()
    for name in names:
        if not (corpus / name).is_dir():
            raise FileNotFoundError(f"{corpus / name}: no such data dir; --corpus-dir must hold train and every set of "
                                    f"eval_sets / decode.tuning_set ({', '.join(names)})")
    words = {name: {w for t in import_set(cfg, corpus, data_dir, name).text.values() for w in t.split()} for name in names}
    prepare_dictionary(cfg, corpus, data_dir, set().union(*words.values()), words["train"])


def main(argv: list[str] | None = None) -> None:
    from asrkd.cli import run_command

    run_command(prepare, sys.argv[1:] if argv is None else argv, "kaldi_data prep")


if __name__ == "__main__":
    main()
