"""Stage: a teacher's soft targets, stored once per temperature (``exp/soft_targets/<teacher>/T<T>``).

For every frame of the training feature store and each T in ``distill.temperatures``, the
average over the teacher's models of softmax(z/T): the ensemble's members, or one DNN (the
3%-data experiment's 100% model). With ``distill.logit_matching``, also the teacher's
average zero-mean logits (``.../logits``), the target of the logit-matching student. A store holds them twice: dense fp16 (frames x pdfs)
and a compact top-k form (the k largest, renormalized, plus the mass outside them per
frame). ``header.json`` records T, k, the number of pdfs and frames, and the checksums of the
feature store and alignment they were computed from; loading a store against other features
or another alignment fails instead of training on misaligned targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asrkd.nnet import EnsembleDNN, SplicedFrames, average_softmax, average_zero_mean_logits

log = logging.getLogger(__name__)


class SoftTargetMismatch(ValueError):
    """A soft-target store was computed from other features or another alignment."""


def source_checksum(features_checksum: str, pdf_ids: np.ndarray) -> str:
    """What a store depends on: the feature store's content and the alignment's pdf-ids."""
    digest = hashlib.sha256(features_checksum.encode())
    digest.update(np.ascontiguousarray(pdf_ids).tobytes())
    return digest.hexdigest()[:16]


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, renormalized probabilities, residual mass) of each row's k most likely pdfs."""
    ids = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
    mass = kept.sum(1, keepdims=True)
    return ids.astype(np.int32), (kept / np.maximum(mass, 1e-12)), (1.0 - mass[:, 0])


@dataclass
class SoftTargetStore:
    header: dict
    dense: np.ndarray  # (frames, pdfs) fp16
    topk_ids: np.ndarray  # (frames, k) int32
    topk_probs: np.ndarray  # (frames, k) fp16, renormalized to sum to 1
    residual: np.ndarray  # (frames,) fp16: probability mass the top-k form leaves out

    @classmethod
    def from_probs(cls, probs: np.ndarray, temperature: float, k: int, checksum: str) -> "SoftTargetStore":
        ids, kept, residual = top_k(probs, k)
        header = {"temperature": float(temperature), "k": int(k), "num_pdfs": int(probs.shape[1]),
                  "num_frames": int(probs.shape[0]), "source_checksum": checksum}
        return cls(header, probs.astype(np.float16), ids, kept.astype(np.float16), residual.astype(np.float16))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("dense", "topk_ids", "topk_probs", "residual"):
            np.save(directory / f"{name}.npy", getattr(self, name))
        (directory / "header.json").write_text(json.dumps(self.header, indent=1))

    @classmethod
    def load(cls, directory: Path, expected_checksum: str) -> "SoftTargetStore":
        header = read_header(directory, expected_checksum)
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("dense", "topk_ids", "topk_probs", "residual")}
        check_shape(directory / "dense.npy", arrays["dense"], header)
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
    """The teacher's zero-mean logits of every training frame (fp16), for logit matching.

    For an ensemble, the members' average zero-mean logits: the high-temperature limit of the
    averaged soft targets. Same header and checksum rules as SoftTargetStore.
    """

    def __init__(self, header: dict, logits: np.ndarray):
        self.header, self.logits = header, logits

    @classmethod
    def from_logits(cls, logits: np.ndarray, checksum: str) -> "TeacherLogits":
        header = {"kind": "zero-mean logits", "num_pdfs": int(logits.shape[1]), "num_frames": int(logits.shape[0]),
                  "source_checksum": checksum}
        return cls(header, logits.astype(np.float16))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "logits.npy", self.logits)
        (directory / "header.json").write_text(json.dumps(self.header, indent=1))

    @classmethod
    def load(cls, directory: Path, expected_checksum: str) -> "TeacherLogits":
        header = read_header(directory, expected_checksum)
        logits = np.load(directory / "logits.npy", mmap_mode="r")
        check_shape(directory / "logits.npy", logits, header)
        return cls(header, logits)

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.logits[indices], dtype=np.float32))


def read_header(directory: Path, expected_checksum: str) -> dict:
    """A store's header, after checking it was computed from today's features and alignment."""
    header = json.loads((directory / "header.json").read_text())
    if header["source_checksum"] != expected_checksum:
        raise SoftTargetMismatch(
            f"{directory}: soft targets were computed from features/alignment {header['source_checksum']}, "
            f"the current ones are {expected_checksum}; rerun the soft-targets stage"
        )
    return header


def check_shape(path: Path, array: np.ndarray, header: dict) -> None:
    if array.shape != (header["num_frames"], header["num_pdfs"]):
        raise SoftTargetMismatch(f"{path} has shape {array.shape}, header says ({header['num_frames']}, {header['num_pdfs']})")


@torch.no_grad()
def teacher_outputs(teacher: EnsembleDNN, frames: SplicedFrames, temperatures: list[float], with_logits: bool,
                    batch_size: int) -> tuple[dict[float, np.ndarray], np.ndarray | None]:
    """For every frame of the store: the members' average softmax(z/T) for each T (float32),
    and with ``with_logits`` their average zero-mean logits."""
    num_frames, num_pdfs = frames.store.num_frames, teacher.config["num_pdfs"]
    probs = {t: np.zeros((num_frames, num_pdfs), dtype=np.float32) for t in temperatures}
    logits = np.zeros((num_frames, num_pdfs), dtype=np.float32) if with_logits else None
    teacher.eval()
    device = frames.frames.device
    for start in range(0, num_frames, batch_size):
        batch = torch.arange(start, min(start + batch_size, num_frames), device=device)
        member_logits = teacher.member_logits(frames.context(batch))
        for t in temperatures:
            probs[t][start : start + len(batch)] = average_softmax(member_logits, t).cpu().numpy()
        if logits is not None:
            logits[start : start + len(batch)] = average_zero_mean_logits(member_logits).cpu().numpy()
    return probs, logits


def teacher_dir(cfg) -> Path:
    return Path(cfg.exp_dir) / "soft_targets" / cfg.distill.teacher


def store_dir(cfg, temperature: float) -> Path:
    return teacher_dir(cfg) / f"T{temperature:g}"


def logits_dir(cfg) -> Path:
    return teacher_dir(cfg) / "logits"


def current_checksum(cfg) -> str:
    """The checksum a store must carry to be used with today's features and alignment."""
    from asrkd.features import FeatureStore

    exp = Path(cfg.exp_dir)
    features = FeatureStore.load(exp / "feats" / "fbank" / "train")
    return source_checksum(features.checksum(), np.load(exp / "tri" / "ali_train" / "pdf_ids.npy"))


def run(cfg) -> None:
    """Stage: the teacher's average softmax(z/T) for every training frame, per T (and its logits)."""
    from asrkd.features import FeatureStore
    from asrkd.nnet import pick_device
    from asrkd.stage import mark_done, skip_if_done
    from asrkd.train import load_system

    temperatures = [float(t) for t in cfg.distill.temperatures]
    todo = [t for t in temperatures if not skip_if_done(store_dir(cfg, t), f"soft-targets T={t:g}")]
    with_logits = bool(cfg.distill.logit_matching) and not skip_if_done(logits_dir(cfg), "soft-targets logits")
    if not todo and not with_logits:
        return
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    teacher = load_system(Path(cfg.exp_dir), cfg.distill.teacher, device)
    if not isinstance(teacher, EnsembleDNN):
        teacher = EnsembleDNN([teacher])
    store = FeatureStore.load(Path(cfg.exp_dir) / "feats" / "fbank" / "train", mmap=False)
    frames = SplicedFrames(store, teacher.config["left_context"], teacher.config["right_context"], device)
    checksum = current_checksum(cfg)
    probs, logits = teacher_outputs(teacher, frames, todo, with_logits, cfg.eval.batch_size)
    members = len(teacher.members)
    for t in todo:
        SoftTargetStore.from_probs(probs[t], t, cfg.distill.top_k, checksum).save(store_dir(cfg, t))
        log.info("soft-targets T=%g: %d frames x %d pdfs from %d model(s)", t, *probs[t].shape, members)
        mark_done(store_dir(cfg, t))
    if logits is not None:
        TeacherLogits.from_logits(logits, checksum).save(logits_dir(cfg))
        log.info("teacher logits: %d frames x %d pdfs from %d model(s)", *logits.shape, members)
        mark_done(logits_dir(cfg))
