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

from asrkd.data import DataDir, DataDirError, corpus_sets
from asrkd.kaldi.lang import cmudict_path, read_sphinx_dict
from asrkd.stage import copy_file, digest, plan, write_text

log = logging.getLogger("local.kaldi_data")

DICT_FILES = ("lexicon.txt", "nonsilence_phones.txt", "silence_phones.txt", "optional_silence.txt", "extra_questions.txt")


def import_data_dir(source: Path, dest: Path) -> DataDir:
    """utils/copy_data_dir.sh after validate_data_dir.sh: the validated copy, wav.scp paths absolute."""
    data = DataDir.read(source)
    if not data.text:
        raise DataDirError(f"{source}/text: missing; training and scoring need transcripts")
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


def prepare(cfg) -> None:
    """Stage 0: data/<set> for train, the tuning set and the eval sets; data/local/dict."""
    corpus, data_dir = Path(cfg.corpus_dir).resolve(), Path(cfg.data_dir)
    names = corpus_sets(cfg)
    for name in names:
        if not (corpus / name).is_dir():
            raise FileNotFoundError(f"{corpus / name}: no such data dir; --corpus-dir must hold train and every set of "
                                    f"eval_sets / decode.tuning_set ({', '.join(names)})")
    user_dict = corpus / "local" / "dict"
    files = {f"{name}/{p.name}": p.read_bytes() for name in names for p in sorted((corpus / name).iterdir()) if p.is_file()}
    files |= {f"local/dict/{p.name}": p.read_bytes() for p in sorted(user_dict.glob("*")) if p.is_file()}
    stage = plan("kaldi_data prep", data_dir / "local", cfg, ("lang.silence_phone",),
                 values={"corpus": digest({k: v.decode("latin-1") for k, v in files.items()}), "sets": names,
                         "corpus_dir": str(corpus)}, clear=False)
    if stage.up_to_date:
        return
    words: set[str] = set()
    for name in names:
        data = import_data_dir(corpus / name, data_dir / name)
        words.update(w for t in data.text.values() for w in t.split())
        log.info("%s: %d utterances, %d speakers", name, len(data.utt2spk), len(data.spk2utt))
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
                    "and optional_silence.txt beside it (data/local/dict is rebuilt from there at every run); with lang.use_cmudict "
                    "(the default) and CMUdict's phones in nonsilence_phones.txt, words your lexicon lacks still come from CMUdict, "
                    "so it may hold only these.",
                    len(missing), data_dir / "local" / "words_without_pronunciation.txt", " ".join(missing[:20]),
                    f" and {len(missing) - 20} more" if len(missing) > 20 else "", corpus)
    stage.commit(sets=names, words=len(words), without_pronunciation=missing)


def main(argv: list[str] | None = None) -> None:
    from asrkd.cli import run_command

    run_command(prepare, sys.argv[1:] if argv is None else argv, "kaldi_data prep")


if __name__ == "__main__":
    main()
