"""Stage: a teacher's soft targets, stored once per feature store and temperature
(``exp/soft_targets/<teacher>/<store>/T<T>``).

For every frame of a feature store (``train``, or a transfer set's: ``train_sp``...) and
each T in ``distill.temperatures``, the average over the teacher's models of softmax(z/T):
the ensemble's members, or one DNN (the 3%-data experiment's 100% model). For a cross-fitted
ensemble (``ensemble.folds``), a training utterance's average is over the members that never
saw its speaker; frames of other speakers (validation, unlabeled audio) average all members.
With ``distill.logit_matching``, also the teacher's average zero-mean logits
(``.../logits``), the target of the logit-matching student.

A store holds the targets twice: dense fp16 (frames x pdfs) and a compact top-k form (the
k largest, renormalized, plus the mass outside them per frame). ``header.json`` records T,
k, the number of pdfs and frames and the checksum of the features (and alignment) they were
computed from; loading a store against other features, another T, k or number of pdfs, or
a file cut short fails with the reason instead of training on wrong targets. Arrays are
written batch by batch into memory-mapped files, so a store may be larger than RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asrkd.features import load_array
from asrkd.nnet import EnsembleDNN, SplicedFrames, average_softmax, average_zero_mean_logits

log = logging.getLogger(__name__)

DENSE_ARRAYS = ("dense", "topk_ids", "topk_probs", "residual")


class SoftTargetMismatch(ValueError):
    """A soft-target store does not fit: other features or alignment, T, k or number of pdfs, or cut short."""


def source_checksum(features_checksum: str, pdf_ids: np.ndarray | None) -> str:
    """What a store depends on: the feature store's content and the alignment's pdf-ids (if any)."""
    digest = hashlib.sha256(features_checksum.encode())
    if pdf_ids is not None:
        digest.update(np.ascontiguousarray(pdf_ids).tobytes())
    return digest.hexdigest()[:16]


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, renormalized probabilities, residual mass) of each row's k most likely pdfs."""
    ids = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
    mass = kept.sum(1, keepdims=True)
    return ids.astype(np.int32), (kept / np.maximum(mass, 1e-12)), (1.0 - mass[:, 0])


class ArrayWriter:
    """Arrays of known shape filled batch by batch in memory-mapped temporary files, renamed
    into place by ``close`` (a kill leaves no half-written array under the final name)."""

    def __init__(self, directory: Path, shapes: dict[str, tuple[tuple[int, ...], str]]):
        directory.mkdir(parents=True, exist_ok=True)
        self.final = {name: directory / f"{name}.npy" for name in shapes}
        self.tmp = {name: directory / f".{name}.npy.partial" for name in shapes}
        self.arrays = {name: np.lib.format.open_memmap(self.tmp[name], mode="w+", dtype=dtype, shape=shape)
                       for name, (shape, dtype) in shapes.items()}

    def close(self) -> None:
        import os

        for name, array in self.arrays.items():
            array.flush()
            os.replace(self.tmp[name], self.final[name])


@dataclass
class SoftTargetStore:
    header: dict
    dense: np.ndarray  # (frames, pdfs) fp16
    topk_ids: np.ndarray  # (frames, k) int32
    topk_probs: np.ndarray  # (frames, k) fp16, renormalized to sum to 1
    residual: np.ndarray  # (frames,) fp16: probability mass the top-k form leaves out

    @staticmethod
    def make_header(temperature: float, k: int, num_frames: int, num_pdfs: int, checksum: str) -> dict:
        return {"temperature": float(temperature), "k": int(k), "num_pdfs": int(num_pdfs), "num_frames": int(num_frames),
                "source_checksum": checksum}

    @classmethod
    def from_probs(cls, probs: np.ndarray, temperature: float, k: int, checksum: str) -> "SoftTargetStore":
        ids, kept, residual = top_k(probs, k)
        header = cls.make_header(temperature, k, probs.shape[0], probs.shape[1], checksum)
        return cls(header, probs.astype(np.float16), ids, kept.astype(np.float16), residual.astype(np.float16))

    @staticmethod
    def writer(directory: Path, header: dict) -> ArrayWriter:
        frames, pdfs, k = header["num_frames"], header["num_pdfs"], header["k"]
        return ArrayWriter(directory, {"dense": ((frames, pdfs), "float16"), "topk_ids": ((frames, k), "int32"),
                                       "topk_probs": ((frames, k), "float16"), "residual": ((frames,), "float16")})

    @staticmethod
    def fill(writer: ArrayWriter, rows: np.ndarray, probs: np.ndarray, k: int) -> None:
        """Write the dense and top-k forms of ``probs`` into frames ``rows``."""
        ids, kept, residual = top_k(probs, k)
        writer.arrays["dense"][rows] = probs
        writer.arrays["topk_ids"][rows] = ids
        writer.arrays["topk_probs"][rows] = kept
        writer.arrays["residual"][rows] = residual

    def save(self, directory: Path) -> None:
        from asrkd.stage import write_json

        writer = self.writer(directory, self.header)
        for name in DENSE_ARRAYS:
            writer.arrays[name][:] = getattr(self, name)
        writer.close()
        write_json(directory / "header.json", self.header)

    @classmethod
    def load(cls, directory: Path, expected_checksum: str, temperature: float | None = None, num_pdfs: int | None = None,
             k: int | None = None) -> "SoftTargetStore":
        header = read_header(directory, expected_checksum, {"temperature": temperature, "num_pdfs": num_pdfs, "k": k})
        arrays = {name: load_array(directory / f"{name}.npy", True, "soft-targets") for name in DENSE_ARRAYS}
        check_shape(directory / "dense.npy", arrays["dense"], (header["num_frames"], header["num_pdfs"]))
        check_shape(directory / "topk_ids.npy", arrays["topk_ids"], (header["num_frames"], header["k"]))
        return cls(header, **arrays)

    def batch(self, indices: np.ndarray, form: str) -> torch.Tensor:
        """(B, pdfs) float targets of frames ``indices``: dense, or top-k scattered back."""
        if form == "dense":
            return torch.from_numpy(np.asarray(self.dense[indices], dtype=np.float32))
        if form != "topk":
            raise ValueError(f"soft-target form must be 'dense' or 'topk', got {form!r}")
        out = torch.zeros(len(indices), self.header["num_pdfs"])
        ids = torch.from_numpy(np.asarray(self.topk_ids[indices], dtype=np.int64))
        return out.scatter_(1, ids, torch.from_numpy(np.asarray(self.topk_probs[indices], dtype=np.float32)))


class TeacherLogits:
    """The teacher's zero-mean logits of every frame (fp16), for logit matching.

    For an ensemble, the members' average zero-mean logits: the high-temperature limit of the
    averaged soft targets. Same header and checksum rules as SoftTargetStore.
    """

    def __init__(self, header: dict, logits: np.ndarray):
        self.header, self.logits = header, logits

    @staticmethod
    def make_header(num_frames: int, num_pdfs: int, checksum: str) -> dict:
        return {"kind": "zero-mean logits", "num_pdfs": int(num_pdfs), "num_frames": int(num_frames), "source_checksum": checksum}

    @classmethod
    def from_logits(cls, logits: np.ndarray, checksum: str) -> "TeacherLogits":
        return cls(cls.make_header(*logits.shape, checksum), logits.astype(np.float16))

    @staticmethod
    def writer(directory: Path, header: dict) -> ArrayWriter:
        return ArrayWriter(directory, {"logits": ((header["num_frames"], header["num_pdfs"]), "float16")})

    def save(self, directory: Path) -> None:
        from asrkd.stage import write_json

        writer = self.writer(directory, self.header)
        writer.arrays["logits"][:] = self.logits
        writer.close()
        write_json(directory / "header.json", self.header)

    @classmethod
    def load(cls, directory: Path, expected_checksum: str, num_pdfs: int | None = None) -> "TeacherLogits":
        header = read_header(directory, expected_checksum, {"num_pdfs": num_pdfs})
        logits = load_array(directory / "logits.npy", True, "soft-targets")
        check_shape(directory / "logits.npy", logits, (header["num_frames"], header["num_pdfs"]))
        return cls(header, logits)

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.logits[indices], dtype=np.float32))


def read_header(directory: Path, expected_checksum: str, expected: dict) -> dict:
    """A store's header, after checking it was computed from today's features and alignment and
    holds what the caller expects (``expected``: header key -> value, None = any)."""
    path = Path(directory) / "header.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no soft-target store (header.json missing); run the soft-targets stage")
    header = json.loads(path.read_text())
    if header["source_checksum"] != expected_checksum:
        raise SoftTargetMismatch(
            f"{directory}: soft targets were computed from features/alignment {header['source_checksum']}, "
            f"the current ones are {expected_checksum}; rerun the soft-targets stage"
        )
    for key, value in expected.items():
        if value is not None and header.get(key) != value:
            raise SoftTargetMismatch(f"{directory}: the store has {key}={header.get(key)}, {value} was asked for; "
                                     "point distill.* at the right store or rerun the soft-targets stage")
    return header


def check_shape(path: Path, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise SoftTargetMismatch(f"{path} has shape {array.shape}, its header says {shape}; rerun the soft-targets stage")


FrameGroups = list[tuple[np.ndarray, list[int]]]  # (frame indices, the members that score them)


@torch.no_grad()
def write_teacher_outputs(teacher: EnsembleDNN, frames: SplicedFrames, groups: FrameGroups, temperatures: dict[float, Path],
                          logits_dir: Path | None, top_k_size: int, checksum: str, batch_size: int) -> None:
    """For every frame of the store: the average softmax(z/T) of its group's members for each T,
    and with ``logits_dir`` their average zero-mean logits, written batch by batch."""
    from asrkd.stage import progress, write_json

    num_frames, num_pdfs = frames.store.num_frames, teacher.config["num_pdfs"]
    headers = {t: SoftTargetStore.make_header(t, top_k_size, num_frames, num_pdfs, checksum) for t in temperatures}
    writers = {t: SoftTargetStore.writer(directory, headers[t]) for t, directory in temperatures.items()}
    logits_header = TeacherLogits.make_header(num_frames, num_pdfs, checksum)
    logits_writer = TeacherLogits.writer(logits_dir, logits_header) if logits_dir else None
    teacher.eval()
    device = frames.frames.device
    batches = [(indices[s : s + batch_size], members) for indices, members in groups for s in range(0, len(indices), batch_size)]
    for indices, members in progress(batches, "soft targets"):
        member_logits = teacher.member_logits(frames.context(torch.from_numpy(indices).to(device)), members)
        for t, writer in writers.items():
            SoftTargetStore.fill(writer, indices, average_softmax(member_logits, t).cpu().numpy(), top_k_size)
        if logits_writer is not None:
            logits_writer.arrays["logits"][indices] = average_zero_mean_logits(member_logits).cpu().numpy()
    for t, writer in writers.items():
        writer.close()
        write_json(temperatures[t] / "header.json", headers[t])
    if logits_writer is not None:
        logits_writer.close()
        write_json(logits_dir / "header.json", logits_header)


def teacher_dir(cfg, store: str) -> Path:
    return Path(cfg.exp_dir) / "soft_targets" / cfg.distill.teacher / store


def store_dir(cfg, temperature: float, store: str = "train") -> Path:
    return teacher_dir(cfg, store) / f"T{temperature:g}"


def logits_dir(cfg, store: str = "train") -> Path:
    return teacher_dir(cfg, store) / "logits"


def current_checksum(exp_dir: Path, store: str) -> str:
    """The checksum a store must carry to be used with today's features (and alignment) of ``store``."""
    from asrkd.features import FeatureStore

    exp = Path(exp_dir)
    features = FeatureStore.load(exp / "feats" / "fbank" / store)
    ali = exp / "tri" / f"ali_{store}" / "pdf_ids.npy"
    return source_checksum(features.checksum(), np.load(ali) if ali.is_file() else None)


def teacher_groups(cfg, store_utts: list[str], offsets: np.ndarray, member_dirs: list[Path]) -> FrameGroups:
    """Which members score which frames: all of them, except for a cross-fitted ensemble, whose
    members recorded the speakers they never saw; an utterance (or a copy of it) of such a
    speaker is scored by exactly those members."""
    from asrkd.data import DataDir
    from asrkd.stage import read_record

    everyone = list(range(len(member_dirs)))
    records = [read_record(d) or {"config": {}} for d in member_dirs]
    held_out = [set(record["config"].get("held_out_speakers") or []) for record in records]
    if not any(held_out):
        return [(np.arange(int(offsets[-1])), everyone)]
    full = DataDir.read(Path(cfg.data_dir) / "train")
    sources: dict[str, str] = {}
    for directory in Path(cfg.data_dir).iterdir():  # copies name their source in utt2uniq
        if (directory / "utt2uniq").is_file():
            sources |= DataDir.read(directory).utt2uniq
    by_members: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i, utt in enumerate(store_utts):
        speaker = full.utt2spk.get(sources.get(utt, utt))
        members = tuple(m for m in everyone if speaker in held_out[m]) or tuple(everyone)
        by_members.setdefault(members, []).append(np.arange(offsets[i], offsets[i + 1]))
    return [(np.concatenate(spans), list(members)) for members, spans in sorted(by_members.items())]


def run(cfg) -> None:
    """Stage: the teacher's average softmax(z/T) per T (and its logits) for every frame of each
    feature store the configured students train on: ``train``'s, a subset's or perturbed copy's
    store (``train.data``), and the stores of ``distill.transfer``'s data dirs."""
    from asrkd.student import student_cfg
    from asrkd.train import TrainingSet

    for store in TrainingSet(student_cfg(cfg), list(cfg.distill.transfer)).stores:
        run_store(cfg, store)


def run_store(cfg, store: str) -> None:
    """The soft targets of one feature store (``exp/soft_targets/<teacher>/<store>/...``)."""
    from asrkd.features import FeatureStore
    from asrkd.nnet import pick_device
    from asrkd.stage import plan
    from asrkd.train import load_system, system_dirs

    exp = Path(cfg.exp_dir)
    members = system_dirs(exp, cfg.distill.teacher)
    inputs = {f"teacher {d.name}": d for d in members} | {"features": exp / "feats" / "fbank" / store}
    values = {"teacher": cfg.distill.teacher, "store": store}
    todo = {}
    for t in sorted({float(t) for t in cfg.distill.temperatures}):
        stage = plan(f"soft-targets {cfg.distill.teacher} {store} T={t:g}", store_dir(cfg, t, store), cfg,
                     ("distill.top_k",), inputs, {**values, "temperature": t})
        if not stage.up_to_date:
            todo[t] = stage
    logits_stage = None
    if cfg.distill.logit_matching:
        logits_stage = plan(f"soft-targets {cfg.distill.teacher} {store} logits", logits_dir(cfg, store), cfg, (), inputs, values)
        logits_stage = None if logits_stage.up_to_date else logits_stage
    if not todo and logits_stage is None:
        return
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    teacher = load_system(exp, cfg.distill.teacher, device)
    if not isinstance(teacher, EnsembleDNN):
        teacher = EnsembleDNN([teacher])
    features = FeatureStore.load(exp / "feats" / "fbank" / store, mmap=False)
    frames = SplicedFrames(features, teacher.config["left_context"], teacher.config["right_context"], device)
    groups = teacher_groups(cfg, features.utt_ids, features.offsets, members)
    write_teacher_outputs(teacher, frames, groups, {t: stage.out_dir for t, stage in todo.items()},
                          logits_stage.out_dir if logits_stage else None, int(cfg.distill.top_k),
                          current_checksum(exp, store), int(cfg.eval.batch_size))
    for t, stage in todo.items():
        log.info("soft-targets T=%g: %d frames of %s from %d model(s) in %d group(s)", t, features.num_frames, store,
                 len(teacher.members), len(groups))
        stage.commit(frames=features.num_frames, members=len(teacher.members), groups=len(groups))
    if logits_stage is not None:
        logits_stage.commit(frames=features.num_frames, members=len(teacher.members))
