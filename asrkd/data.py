"""Kaldi data directories: read, write and validate (wav.scp, text, utt2spk, spk2utt).

A data dir is the contract between the corpus-specific prep in ``local/`` and every later
step, so it is validated the way Kaldi's ``utils/validate_data_dir.sh`` does: sorted keys,
identical utterance sets across files, speaker-prefixed utterance ids, non-empty transcripts.
``text`` may be absent (``--no-text``): unlabeled audio, usable as a distillation transfer set.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

from asrkd.files import write_text

log = logging.getLogger(__name__)


class DataDirError(ValueError):
    """A data dir violates Kaldi's conventions; the message names the file and the entry."""


def read_table(path: Path) -> dict[str, str]:
    """Read a Kaldi ``key value...`` table; the value is the rest of the line (may be empty)."""
    table: dict[str, str] = {}
    raw = Path(path).read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        raise DataDirError(
            f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x}); convert the file, e.g. "
            f"`iconv -f latin1 -t utf-8 {path}`"
        ) from None
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            raise DataDirError(f"{path}:{lineno}: empty line")
        key, _, value = line.strip().partition(" ")
        if key in table:
            raise DataDirError(f"{path}:{lineno}: duplicate key {key!r}")
        table[key] = value.strip()
    return table


def write_table(path: Path, table: dict[str, str]) -> None:
    """Write a table sorted by key in C locale order, as Kaldi's tools require (atomically)."""
    lines = [f"{key} {table[key]}".rstrip() for key in sorted(table)]
    write_text(path, "".join(line + "\n" for line in lines))


@dataclass
class DataDir:
    """The in-memory form of a Kaldi data dir.

    ``utt2uniq`` (optional, as Kaldi's perturbed data dirs write it) maps a copy of an
    utterance (``sp0.9-<utt>``) to the utterance it was made from, so that copies of a
    validation speaker's audio never end up in training.
    """

    wav_scp: dict[str, str] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    utt2spk: dict[str, str] = field(default_factory=dict)
    utt2uniq: dict[str, str] = field(default_factory=dict)

    @property
    def utt_ids(self) -> list[str]:
        return sorted(self.utt2spk)

    @property
    def spk2utt(self) -> dict[str, list[str]]:
        spk2utt: dict[str, list[str]] = {}
        for utt in self.utt_ids:
            spk2utt.setdefault(self.utt2spk[utt], []).append(utt)
        return spk2utt

    def source(self, utt: str) -> str:
        """The original utterance ``utt`` is a copy of (itself when it is no copy)."""
        return self.utt2uniq.get(utt, utt)

    def subset(self, utt_ids: list[str]) -> "DataDir":
        keep = set(utt_ids)
        return DataDir(**{t.name: {u: v for u, v in getattr(self, t.name).items() if u in keep} for t in fields(self)})

    @classmethod
    def combine(cls, *parts: "DataDir") -> "DataDir":
        """utils/combine_data.sh: the union of data dirs with distinct utterance ids."""
        return cls(**{t.name: {u: v for part in parts for u, v in getattr(part, t.name).items()} for t in fields(cls)})

    def empty_transcripts(self) -> list[str]:
        """The utterances whose transcript has no words."""
        return sorted(utt for utt, words in self.text.items() if not words.split())

    def validate(self, where: str = "data dir", empty_transcripts: bool = False) -> None:
        """Raise DataDirError on the first violation of Kaldi's data-dir rules (an empty transcript
        too, unless ``empty_transcripts``: the importer drops and counts those)."""
        utts = set(self.utt2spk)
        if not utts:
            raise DataDirError(f"{where}: no utterances")
        for name, table in (("wav.scp", self.wav_scp), ("text", self.text)):
            if name == "text" and not table:
                continue  # no transcripts: unlabeled audio
            missing = sorted(utts - set(table))
            extra = sorted(set(table) - utts)
            if missing or extra:
                raise DataDirError(
                    f"{where}/{name}: utterance sets differ from utt2spk "
                    f"(missing {missing[:3]}, extra {extra[:3]})"
                )
        for utt, spk in self.utt2spk.items():
            if not utt.startswith(spk):
                raise DataDirError(
                    f"{where}/utt2spk: utterance {utt!r} does not start with its speaker id "
                    f"{spk!r} (Kaldi sorts spk2utt and utt2spk together only then)"
                )
        for utt in [] if empty_transcripts else self.empty_transcripts()[:1]:
            raise DataDirError(f"{where}/text: utterance {utt!r} has an empty transcript; give it its words, or remove its "
                               "text line and run Kaldi's utils/fix_data_dir.sh (which leaves it out of every file)")
        extra = sorted(set(self.utt2uniq) - utts)
        if extra:
            raise DataDirError(f"{where}/utt2uniq: utterances not in utt2spk: {extra[:3]}")

    def write(self, directory: Path) -> None:
        self.validate(str(directory))
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_table(directory / "wav.scp", self.wav_scp)
        if self.text:
            write_table(directory / "text", self.text)
        write_table(directory / "utt2spk", self.utt2spk)
        write_table(directory / "spk2utt", {s: " ".join(u) for s, u in self.spk2utt.items()})
        if self.utt2uniq:
            write_table(directory / "utt2uniq", self.utt2uniq)

    @classmethod
    def read(cls, directory: Path, empty_transcripts: bool = False) -> "DataDir":
        """The data dir at ``directory``, validated (``empty_transcripts``: utterances without words
        are let through, for the importer to drop and count)."""
        directory = Path(directory)
        for name in ("wav.scp", "utt2spk", "spk2utt"):
            if not (directory / name).is_file():
                raise DataDirError(f"{directory}: missing {name}")
        if (directory / "segments").is_file():
            raise DataDirError(f"{directory}/segments: utterances as segments of recordings are not read yet; cut them into "
                               "files first (Kaldi: utils/data/extract_wav_segments_data_dir.sh) and point wav.scp at those")
        data = cls(
            wav_scp=read_table(directory / "wav.scp"),
            text=read_table(directory / "text") if (directory / "text").is_file() else {},
            utt2spk=read_table(directory / "utt2spk"),
            utt2uniq=read_table(directory / "utt2uniq") if (directory / "utt2uniq").is_file() else {},
        )
        data.validate(str(directory), empty_transcripts)
        for name in ("wav.scp", "text", "utt2spk", "spk2utt", "utt2uniq"):
            if not (directory / name).is_file():
                continue
            keys = list(read_table(directory / name))
            if keys != sorted(keys):
                raise DataDirError(f"{directory}/{name}: not sorted; sort it in C order (`LC_ALL=C sort -k1,1 -o {name} {name}`, "
                                   "or Kaldi's utils/fix_data_dir.sh)")
        spk2utt = {s: u.split() for s, u in read_table(directory / "spk2utt").items()}
        if spk2utt != data.spk2utt:
            raise DataDirError(f"{directory}/spk2utt: does not match utt2spk")
        return data


def fraction_tag(fraction: float) -> str:
    """``3pct`` for 0.03: how names of subsets and of the runs on them spell a fraction of train."""
    return f"{round(100 * fraction)}pct"


def subset_name(fraction: float) -> str:
    """data/train_3pct for 0.03: the data dir of a seeded speaker-balanced share of train."""
    return f"train_{fraction_tag(fraction)}"


def speaker_balanced_subset(data: DataDir, fraction: float, seed: int) -> list[str]:
    """Draw round(fraction * N) utterances spread as evenly as possible over the speakers.

    Speakers are visited round-robin in a seeded order, each giving one utterance of its own
    seeded shuffle per round, so no speaker gives two before every speaker has given one: a 3%
    subset of AN4 (28 utterances, 74 speakers) has 28 different voices. Reproducible for a seed.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    target = max(1, round(fraction * len(data.utt2spk)))
    queues = []
    for _, utts in sorted(data.spk2utt.items()):
        utts = list(utts)
        rng.shuffle(utts)
        queues.append(utts)
    rng.shuffle(queues)
    chosen: list[str] = []
    while len(chosen) < target:
        for queue in queues:
            if queue and len(chosen) < target:
                chosen.append(queue.pop())
    return sorted(chosen)


def split_by_speaker(data: DataDir, valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole speakers for validation, so validation accuracy measures unseen voices."""
    speakers = sorted(data.spk2utt)
    rng = random.Random(seed)
    rng.shuffle(speakers)
    num_valid = max(1, round(valid_fraction * len(speakers)))
    valid_speakers = set(speakers[:num_valid])
    train = [u for u in data.utt_ids if data.utt2spk[u] not in valid_speakers]
    valid = [u for u in data.utt_ids if data.utt2spk[u] in valid_speakers]
    return train, valid


def speaker_folds(speakers: list[str], folds: int, seed: int) -> list[list[str]]:
    """Speakers dealt into ``folds`` groups in a seeded order (cross-fitted teachers: member i
    never sees fold i mod folds, so those speakers' soft targets come from members that did not)."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    order = sorted(set(speakers))
    random.Random(seed).shuffle(order)
    return [sorted(order[f::folds]) for f in range(folds)]


@dataclass(frozen=True)
class DataSets:
    """The data dirs a run builds and scores (the config's ``eval_sets``, ``decode.tuning_set``,
    ``features.sets``; :func:`asrkd.sections.data_sets` reads them): ``evaluated``, the sets decode
    and evaluate score (the first is the experiments' test set); ``tuning``, where the LM weight is
    chosen: ``valid`` (train's held-out speakers) or a data dir; ``features``, the sets make-feats
    and align process (None: :meth:`corpus`)."""

    evaluated: tuple[str, ...]
    tuning: str = "valid"
    features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = list(self.evaluated)
        if not names:
            raise ValueError("eval_sets is empty: name at least one data dir to score, e.g. eval_sets=[test]")
        if "valid" in names or "train" in names:
            raise ValueError(f"eval_sets={names}: 'train' and 'valid' are scored anyway (valid: train's held-out speakers); "
                             "name evaluation data dirs only")

    def scoring_only(self, name: str) -> bool:
        """Whether data dir ``name`` is only scored (an eval set, or the tuning set when it is a data
        dir): its alignment and decoding drops are counted and named, never fatal to a stage."""
        return name in self.evaluated or name == self.tuning

    def corpus(self) -> list[str]:
        """The data dirs a system is built and scored on: train, the tuning set (when it is a data
        dir) and the eval sets: what make-feats and align process by default, and whose transcripts
        prepare-lang checks for words spelled in two cases (the lang dir's vocabulary is train's alone)."""
        tuning = [self.tuning] if self.tuning != "valid" else []
        return list(dict.fromkeys(["train", *tuning, *self.evaluated]))

    def processed(self) -> list[str]:
        """The data dirs make-feats and align process: ``features``, or :meth:`corpus`."""
        return list(self.features) if self.features is not None else self.corpus()


@dataclass(frozen=True)
class Split:
    """Which utterances train and which validate (the config's ``data_dir``, ``train.data``,
    ``train.valid_fraction``, ``seed``; :func:`asrkd.sections.split`)."""

    data_dir: Path
    valid_fraction: float
    seed: int
    train_data: str = "train"

    def utterances(self) -> tuple[list[str], list[str]]:
        """Training and validation utterances: whole speakers of ``train`` held out for validation.

        The split is made on the full training set, so a run on a subset or a perturbed copy
        (``train_data``) is validated on the same speakers as the full run; the utterances of
        ``train_data`` that are (copies of) those speakers' are left out of its training.
        """
        full = DataDir.read(self.data_dir / "train")
        train, valid = split_by_speaker(full, self.valid_fraction, self.seed)
        if self.train_data != "train":
            train = without_valid(DataDir.read(self.data_dir / self.train_data), set(valid), self.train_data)
        return train, valid


def without_valid(data: DataDir, valid: set[str], name: str) -> list[str]:
    """The utterances of ``data`` that are not validation utterances nor copies of one."""
    kept = [u for u in data.utt_ids if data.source(u) not in valid]
    if len(kept) < len(data.utt_ids):
        log.info("%s: %d utterances are (copies) of validation speakers and are not trained on", name, len(data.utt_ids) - len(kept))
    return kept
