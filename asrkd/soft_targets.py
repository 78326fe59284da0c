"""Stage: a teacher's soft targets, stored once per temperature (``exp/soft_targets/<teacher>/T<T>``).

For every frame of the training feature store and each T in ``distill.temperatures``, the
average over the teacher's models of softmax(z/T): the ensemble's members, or one DNN (the
3%-data experiment's 100% model). A store holds them twice: dense fp16 (frames x pdfs)
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

from asrkd.nnet import HybridDNN, SplicedFrames

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
        header = json.loads((directory / "header.json").read_text())
        if header["source_checksum"] != expected_checksum:
            raise SoftTargetMismatch(
                f"{directory}: soft targets were computed from features/alignment {header['source_checksum']}, "
                f"the current ones are {expected_checksum}; rerun the soft-targets stage"
            )
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("dense", "topk_ids", "topk_probs", "residual")}
        if arrays["dense"].shape != (header["num_frames"], header["num_pdfs"]):
            raise SoftTargetMismatch(f"{directory}: dense.npy has shape {arrays['dense'].shape}, header says "
                                     f"({header['num_frames']}, {header['num_pdfs']})")
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


@torch.no_grad()
def ensemble_soft_targets(members: list[HybridDNN], frames: SplicedFrames, temperatures: list[float], batch_size: int) -> dict[float, np.ndarray]:
    """For every frame of the store, the members' average softmax(z/T) for each T (float32)."""
    num_frames, num_pdfs = frames.store.num_frames, members[0].config["num_pdfs"]
    out = {t: np.zeros((num_frames, num_pdfs), dtype=np.float32) for t in temperatures}
    for member in members:
        member.eval()
    device = frames.frames.device
    for start in range(0, num_frames, batch_size):
        batch = torch.arange(start, min(start + batch_size, num_frames), device=device)
        spliced = frames.context(batch)
        logits = [member(spliced).float() for member in members]
        for t in temperatures:
            mean = torch.stack([torch.softmax(z / t, dim=-1) for z in logits]).mean(0)
            out[t][start : start + len(batch)] = mean.cpu().numpy()
    return out


def store_dir(cfg, temperature: float) -> Path:
    return Path(cfg.exp_dir) / "soft_targets" / cfg.distill.teacher / f"T{temperature:g}"


def teacher_dirs(cfg) -> list[Path]:
    """The ensemble's members, or the one DNN ``exp/dnn/<distill.teacher>`` (e.g. the 100% model)."""
    from asrkd.ensemble import member_dirs

    if cfg.distill.teacher == cfg.ensemble.name:
        return member_dirs(cfg)
    return [Path(cfg.exp_dir) / "dnn" / cfg.distill.teacher]


def current_checksum(cfg) -> str:
    """The checksum a store must carry to be used with today's features and alignment."""
    from asrkd.features import FeatureStore

    exp = Path(cfg.exp_dir)
    features = FeatureStore.load(exp / "feats" / "fbank" / "train")
    return source_checksum(features.checksum(), np.load(exp / "tri" / "ali_train" / "pdf_ids.npy"))


def run(cfg) -> None:
    """Stage: the teacher's (average) softmax(z/T) for every training frame, per T."""
    from asrkd.features import FeatureStore
    from asrkd.nnet import pick_device
    from asrkd.stage import mark_done, skip_if_done
    from asrkd.train import load_model

    temperatures = [float(t) for t in cfg.distill.temperatures]
    todo = [t for t in temperatures if not skip_if_done(store_dir(cfg, t), f"soft-targets T={t:g}")]
    if not todo:
        return
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    members = [load_model(d / "final.pt", device) for d in teacher_dirs(cfg)]
    store = FeatureStore.load(Path(cfg.exp_dir) / "feats" / "fbank" / "train", mmap=False)
    frames = SplicedFrames(store, members[0].config["left_context"], members[0].config["right_context"], device)
    checksum = current_checksum(cfg)
    probs = ensemble_soft_targets(members, frames, todo, cfg.eval.batch_size)
    for t in todo:
        SoftTargetStore.from_probs(probs[t], t, cfg.distill.top_k, checksum).save(store_dir(cfg, t))
        log.info("soft-targets T=%g: %d frames x %d pdfs from %d members", t, *probs[t].shape, len(members))
        mark_done(store_dir(cfg, t))
