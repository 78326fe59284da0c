"""AN4 (CMU census database) -> Kaldi data dirs ``data/train``, ``data/test``, ``data/train_<pct>pct``
(one per ``prep.subset_fractions``)
and the corpus dictionary ``data/local/dict``.

Usage (from a recipe dir): ``python -m local.an4 [corpus_dir=/path/to/an4] [hydra overrides]``.
A ``corpus_dir`` given must hold AN4 (else one line names it: a typo never passes for "no
corpus"). Without one, AN4 is read from ``../shared/corpora/an4`` beside the repository, else
downloaded from ``prep.download_url`` (CMU's tarball) into ``data/local/downloads``, unless
``data/`` was prepared already (a recipe packed for a machine without the corpus).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from asrkd import sections
from asrkd.data import DataDir, speaker_balanced_subset, subset_name
from asrkd.drops import account_dropped
from asrkd.errors import StageError
from asrkd.files import copy_file, write_text
from asrkd.stage import digest, plan, read_record

log = logging.getLogger("local.an4")

MARKER = Path("etc") / "an4_train.transcription"
DEFAULT_CORPUS = Path("..") / ".." / ".." / "shared" / "corpora" / "an4"  # from recipes/an4: ../shared beside the repository
NON_WORDS = {"<s>", "</s>", "<sil>"}


def find_corpus_root(directory: Path) -> Path | None:
    """The folder holding etc/ and wav/: ``directory`` itself or one level below (tarballs nest)."""
    for candidate in [directory, *sorted(p for p in directory.glob("*") if p.is_dir())]:
        if (candidate / MARKER).is_file():
            return candidate
    return None


def download_an4(url: str, dest_dir: Path) -> Path:
    """Download and unpack the AN4 tarball; returns the corpus root. Works for file:// URLs too."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if not archive.is_file():
        log.info("downloading %s -> %s", url, archive)
        partial = archive.with_suffix(archive.suffix + ".part")
        try:
            with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as err:
            partial.unlink(missing_ok=True)
            reason = getattr(err, "reason", None) or err.strerror or err
            raise StageError(f"could not download AN4 from {url} ({reason}); download and unpack it yourself and pass "
                             "--corpus-dir DIR (or set $AN4_DIR)") from None
        partial.rename(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(dest_dir, filter="data")
    root = find_corpus_root(dest_dir)
    if root is None:
        raise FileNotFoundError(f"{archive}: unpacked, but no {MARKER} inside")
    return root


def read_split(root: Path, split: str) -> tuple[DataDir, dict[str, str]]:
    """One AN4 split (``train`` or ``test``) as a DataDir; returns it and the dropped utterances."""
    fileids = (root / "etc" / f"an4_{split}.fileids").read_text().split()
    transcripts: dict[str, str] = {}
    conflicting: set[str] = set()
    path = root / "etc" / f"an4_{split}.transcription"
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        words, _, tail = line.rpartition("(")
        if not tail.endswith(")"):
            raise ValueError(f"{path}:{lineno}: no '(utterance-id)' at the end of {line!r}")
        text = " ".join(w for w in words.split() if w not in NON_WORDS)
        if transcripts.get(tail[:-1], text) != text:
            conflicting.add(tail[:-1])
        transcripts[tail[:-1]] = text
    data, dropped = DataDir(), {}
    for lineno, fileid in enumerate(fileids, 1):
        name = Path(fileid).name
        speaker = Path(fileid).parent.name
        utt = f"{speaker}-{name}"
        audio = next((p for p in (root / "wav" / f"{fileid}.wav", root / "wav" / f"{fileid}.sph") if p.is_file()), None)
        if utt in data.utt2spk or utt in dropped:
            dropped[f"{utt} (line {lineno})"] = f"utterance {utt}: duplicate utterance id (an4_{split}.fileids line {lineno}; the first is kept)"
        elif name in conflicting:
            dropped[utt] = f"utterance {utt}: two different transcripts in {path.name}"
        elif name not in transcripts:
            dropped[utt] = f"utterance {utt}: no transcript in {path.name}"
        elif not transcripts[name]:
            dropped[utt] = f"utterance {utt}: empty transcript"
        elif audio is None:
            dropped[utt] = f"utterance {utt}: missing audio (wav/{fileid}.wav)"
        else:
            data.wav_scp[utt] = str(audio.resolve())
            data.text[utt] = transcripts[name]
            data.utt2spk[utt] = speaker
    return data, dropped


def write_dict(root: Path, dict_dir: Path, silence_phone: str) -> None:
    """Kaldi's data/local/dict: the corpus dictionary and its phone lists."""
    copy_file(root / "etc" / "an4.dic", dict_dir / "lexicon.dic")
    phones = (root / "etc" / "an4.phone").read_text().split()
    write_text(dict_dir / "nonsilence_phones.txt", "".join(f"{p}\n" for p in phones if p != silence_phone))
    write_text(dict_dir / "silence_phones.txt", f"{silence_phone}\n")


def write_subsets(data: DataDir, cfg) -> None:
    """data/train_<pct>pct for every prep.subset_fractions (missing ones only: they are seeded)."""
    for fraction in cfg.prep.subset_fractions:
        out = Path(cfg.data_dir) / subset_name(fraction)
        if (out / "spk2utt").is_file():
            continue
        subset = data.subset(speaker_balanced_subset(data, fraction, cfg.prep.subset_seed))
        subset.write(out)
        log.info("%s: %d utterances of %d speakers", subset_name(fraction), len(subset.utt2spk), len(subset.spk2utt))


def corpus_fingerprint(root: Path) -> str:
    """What decides the data dirs: AN4's file lists, transcripts and dictionaries (not where it lies)."""
    names = sorted(p.name for p in (root / "etc").iterdir() if p.suffix in (".fileids", ".transcription", ".dic", ".phone"))
    return digest({name: (root / "etc" / name).read_text(encoding="latin-1") for name in names})


def prepare(cfg) -> None:
    """Stage 0: data/train, data/test, the subsets of train and data/local/dict."""
    data_dir = Path(cfg.data_dir)
    corpus = Path(cfg.corpus_dir) if cfg.corpus_dir is not None else DEFAULT_CORPUS
    root = find_corpus_root(corpus) if corpus.is_dir() else None
    if root is None and cfg.corpus_dir is not None:
        held = "holds no AN4 (no etc/an4_train.transcription in it or one level below)" if corpus.is_dir() else "does not exist"
        raise StageError(f"corpus_dir {corpus} {held}: pass --corpus-dir (or $AN4_DIR) the folder holding AN4's etc/ and wav/, "
                         f"or leave it out to read {DEFAULT_CORPUS.resolve()} or download {cfg.prep.download_url}")
    if root is None and read_record(data_dir / "local") is not None:
        log.info("an4 prep: no corpus at %s to check against; keeping the data dirs in %s", corpus, data_dir)
        write_subsets(DataDir.read(data_dir / "train"), cfg)  # fractions added to the config since
        return
    if root is None:
        log.info("no AN4 at %s: downloading it", corpus)
        root = download_an4(cfg.prep.download_url, data_dir / "local" / "downloads")
    stage = plan("an4 prep", data_dir / "local", sections.settings(cfg, ("prep.subset_seed", "lang.silence_phone")),
                 values={"corpus": corpus_fingerprint(root)}, clear=False)
    if stage.up_to_date:
        write_subsets(DataDir.read(data_dir / "train"), cfg)
        return
    log.info("AN4 from %s", root)
    for split in ("test", "train"):
        data, dropped = read_split(root, split)
        total = len(data.utt2spk) + len(dropped)
        account_dropped(f"an4 prep ({split})", total, dropped, cfg.prep.max_drop_fraction, data_dir / "local" / f"dropped_{split}.json")
        data.write(data_dir / split)
    log.info("train: %d utterances, %d speakers", len(data.utt2spk), len(data.spk2utt))
    for fraction in cfg.prep.subset_fractions:  # a redo redraws them from the new train
        shutil.rmtree(data_dir / subset_name(fraction), ignore_errors=True)
    write_subsets(data, cfg)
    write_dict(root, data_dir / "local" / "dict", cfg.lang.silence_phone)
    stage.commit()


def main(argv: list[str] | None = None) -> None:
    from asrkd.cli import run_command

    run_command(prepare, sys.argv[1:] if argv is None else argv, "an4 prep")


if __name__ == "__main__":
    main()
