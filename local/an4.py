"""AN4 (CMU census database) -> Kaldi data dirs ``data/train``, ``data/test``, ``data/train_<pct>pct``
(one per ``prep.subset_fractions``)
and the corpus dictionary ``data/local/dict``.

Usage (from a recipe dir): ``python -m local.an4 corpus_dir=/path/to/an4 [hydra overrides]``.
The corpus is looked for at ``corpus_dir``; when absent it is downloaded from
``prep.download_url`` (CMU's tarball) into ``data/local/downloads``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

from asrkd.data import DataDir, speaker_balanced_subset, subset_name
from asrkd.stage import account_dropped, mark_done, skip_if_done

log = logging.getLogger("local.an4")

MARKER = Path("etc") / "an4_train.transcription"
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
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
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
    path = root / "etc" / f"an4_{split}.transcription"
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        words, _, tail = line.rpartition("(")
        if not tail.endswith(")"):
            raise ValueError(f"{path}:{lineno}: no '(utterance-id)' at the end of {line!r}")
        transcripts[tail[:-1]] = " ".join(w for w in words.split() if w not in NON_WORDS)
    data, dropped = DataDir(), {}
    for fileid in fileids:
        name = Path(fileid).name
        speaker = Path(fileid).parent.name
        utt = f"{speaker}-{name}"
        audio = next((p for p in (root / "wav" / f"{fileid}.wav", root / "wav" / f"{fileid}.sph") if p.is_file()), None)
        if name not in transcripts:
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
    dict_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "etc" / "an4.dic", dict_dir / "lexicon.dic")
    phones = (root / "etc" / "an4.phone").read_text().split()
    (dict_dir / "nonsilence_phones.txt").write_text("".join(f"{p}\n" for p in phones if p != silence_phone))
    (dict_dir / "silence_phones.txt").write_text(f"{silence_phone}\n")


def write_subsets(data: DataDir, cfg) -> None:
    """data/train_<pct>pct for every prep.subset_fractions (missing ones only: they are seeded)."""
    for fraction in cfg.prep.subset_fractions:
        out = Path(cfg.data_dir) / subset_name(fraction)
        if (out / "spk2utt").is_file():
            continue
        subset = data.subset(speaker_balanced_subset(data, fraction, cfg.prep.subset_seed))
        subset.write(out)
        log.info("%s: %d utterances of %d speakers", subset_name(fraction), len(subset.utt2spk), len(subset.spk2utt))


def prepare(cfg) -> None:
    data_dir = Path(cfg.data_dir)
    if skip_if_done(data_dir / "train", "an4 prep"):
        write_subsets(DataDir.read(data_dir / "train"), cfg)  # fractions added to the config since
        return
    root = find_corpus_root(Path(cfg.corpus_dir))
    if root is None:
        log.info("no AN4 at %s", cfg.corpus_dir)
        root = download_an4(cfg.prep.download_url, data_dir / "local" / "downloads")
    log.info("AN4 from %s", root)
    for split in ("test", "train"):
        data, dropped = read_split(root, split)
        total = len(data.utt2spk) + len(dropped)
        account_dropped(f"an4 prep ({split})", total, dropped, cfg.prep.max_drop_fraction, data_dir / "local" / f"dropped_{split}.json")
        data.write(data_dir / split)
    log.info("train: %d utterances, %d speakers", len(data.utt2spk), len(data.spk2utt))
    write_subsets(data, cfg)
    write_dict(root, data_dir / "local" / "dict", cfg.lang.silence_phone)
    mark_done(data_dir / "test")
    mark_done(data_dir / "train")


def main(argv: list[str] | None = None) -> None:
    from asrkd.cli import load_config

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prepare(cfg)


if __name__ == "__main__":
    main()
