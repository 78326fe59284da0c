"""How a teacher's soft targets are kept on disk and read back (the store the soft-targets stage
writes, :mod:`asrkd.distill.soft_targets`; the forms students read, :mod:`asrkd.distill.forms`).

A store holds the targets twice: dense fp16 (frames x pdfs) and the top-k form (the k largest,
renormalized, ids int16 where pdfs < 32768, plus the mass outside them per frame). Students read
three forms (``TargetRows``): ``dense``; ``topk``, the k renormalized (the mass outside is lost);
``compact``, the k' <= k largest with the mass outside spread evenly over the other pdfs, k'
chosen per T from the residual within a size budget (``distill.compact``). ``header.json`` records T,
k, the number of pdfs and frames and the checksum of the features (and alignment) they were
computed from; loading a store against other features, another T, k or number of pdfs, or
a file cut short fails with the reason instead of training on wrong targets. Arrays are
written batch by batch into memory-mapped files (:class:`ArrayWriter`), so a store may be
larger than RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asrkd.files import new_array, write_json
from asrkd.layout import Layout
from asrkd.nnet.model import gather, resident
from asrkd.stores import load_array


TOPK_ARRAYS = ("topk_ids", "topk_probs", "residual")


DENSE_ARRAYS = ("dense", *TOPK_ARRAYS)


FRAMES_PER_HOUR = 360_000  # at a 10 ms frame shift


def dense_bytes(num_frames: int, num_pdfs: int) -> int:
    """The dense form's bytes on disk: an fp16 probability per pdf per frame."""
    return 2 * num_frames * num_pdfs


def stores_dense(dcfg, num_frames: int, num_pdfs: int) -> bool:
    """Whether a store keeps the dense form: ``distill.store_dense`` (auto: while it takes at most
    ``distill.dense_limit_gb``; at 14,000 pdfs that is 28 kB a frame, 10 GB an hour of audio).
    Without it the store holds the top-k form alone (k int16 ids and fp16 probabilities and the
    residual), from which the topk and compact students learn."""
    if dcfg.store_dense != "auto":
        return bool(dcfg.store_dense)
    return dense_bytes(num_frames, num_pdfs) <= float(dcfg.dense_limit_gb) * 1e9


def store_arrays(header: dict) -> tuple[str, ...]:
    """The arrays a store holds: all forms, or the top-k form alone (``header["dense"]`` false)."""
    return DENSE_ARRAYS if header.get("dense", True) else TOPK_ARRAYS


class SoftTargetMismatch(ValueError):
    """A soft-target store does not fit: other features or alignment, T, k or number of pdfs, or cut short."""


def source_checksum(features_checksum: str, pdf_ids: np.ndarray | None) -> str:
    """What a store depends on: the feature store's content and the alignment's pdf-ids (if any)."""
    digest = hashlib.sha256(features_checksum.encode())
    if pdf_ids is not None:
        digest.update(np.ascontiguousarray(pdf_ids).tobytes())
    return digest.hexdigest()[:16]


def id_dtype(num_pdfs: int) -> str:
    """int16 holds every pdf-id below 32768 (half of int32's bytes); larger trees need int32."""
    return "int16" if num_pdfs < 32768 else "int32"


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, renormalized probabilities, residual mass) of each row's k most likely pdfs."""
    ids = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
    mass = kept.sum(1, keepdims=True)
    return ids.astype(id_dtype(probs.shape[1])), (kept / np.maximum(mass, 1e-12)), (1.0 - mass[:, 0])


class ArrayWriter:
    """Arrays of known shape filled batch by batch in memory-mapped temporary files, renamed
    into place by ``close`` (a kill leaves no half-written array under the final name)."""

    def __init__(self, directory: Path, shapes: dict[str, tuple[tuple[int, ...], str]]):
        directory.mkdir(parents=True, exist_ok=True)
        self.final = {name: directory / f"{name}.npy" for name in shapes}
        self.tmp = {name: directory / f".{name}.npy.partial" for name in shapes}
        self.arrays = {name: new_array(self.tmp[name], dtype, shape) for name, (shape, dtype) in shapes.items()}

    @classmethod
    def reopen(cls, directory: Path, names: list[str]) -> "ArrayWriter":
        """The temporary arrays another process created, opened to fill rows of them (a job's share)."""
        writer = cls.__new__(cls)
        writer.final = {name: directory / f"{name}.npy" for name in names}
        writer.tmp = {name: directory / f".{name}.npy.partial" for name in names}
        writer.arrays = {name: np.lib.format.open_memmap(writer.tmp[name], mode="r+") for name in names}
        return writer

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()

    def close(self) -> None:
        for name, array in self.arrays.items():
            array.flush()
            os.replace(self.tmp[name], self.final[name])


@dataclass
class SoftTargetStore:
    header: dict
    dense: np.ndarray | None  # (frames, pdfs) fp16; None in a store of the top-k form alone (distill.store_dense)
    topk_ids: np.ndarray  # (frames, k) int16 (int32 for >= 32768 pdfs, and in stores written before)
    topk_probs: np.ndarray  # (frames, k) fp16, renormalized to sum to 1
    residual: np.ndarray  # (frames,) fp16: probability mass the top-k form leaves out

    @staticmethod
    def make_header(temperature: float, k: int, num_frames: int, num_pdfs: int, checksum: str, dense: bool = True) -> dict:
        """The store's header; ``dense`` recorded only when the store lacks the dense form (as stores made before it were)."""
        return {"temperature": float(temperature), "k": int(k), "num_pdfs": int(num_pdfs), "num_frames": int(num_frames),
                "source_checksum": checksum, **({} if dense else {"dense": False})}

    @classmethod
    def from_probs(cls, probs: np.ndarray, temperature: float, k: int, checksum: str, dense: bool = True) -> "SoftTargetStore":
        ids, kept, residual = top_k(probs, k)
        header = cls.make_header(temperature, k, probs.shape[0], probs.shape[1], checksum, dense)
        return cls(header, probs.astype(np.float16) if dense else None, ids, kept.astype(np.float16), residual.astype(np.float16))

    @staticmethod
    def writer(directory: Path, header: dict) -> ArrayWriter:
        frames, pdfs, k = header["num_frames"], header["num_pdfs"], header["k"]
        shapes = {"dense": ((frames, pdfs), "float16"), "topk_ids": ((frames, k), id_dtype(pdfs)),
                  "topk_probs": ((frames, k), "float16"), "residual": ((frames,), "float16")}
        return ArrayWriter(directory, {name: shapes[name] for name in store_arrays(header)})

    @staticmethod
    def fill(writer: ArrayWriter, rows: np.ndarray, probs: np.ndarray, k: int) -> None:
        """Write the forms the store holds of ``probs`` into frames ``rows``."""
        ids, kept, residual = top_k(probs, k)
        if "dense" in writer.arrays:
            writer.arrays["dense"][rows] = probs
        writer.arrays["topk_ids"][rows] = ids
        writer.arrays["topk_probs"][rows] = kept
        writer.arrays["residual"][rows] = residual

    def save(self, directory: Path) -> None:

        writer = self.writer(directory, self.header)
        for name in store_arrays(self.header):
            writer.arrays[name][:] = getattr(self, name)
        writer.close()
        write_json(directory / "header.json", self.header)

    @classmethod
    def load(cls, directory: Path, expected_checksum: str, temperature: float | None = None, num_pdfs: int | None = None,
             k: int | None = None) -> "SoftTargetStore":
        header = read_header(directory, expected_checksum, {"temperature": temperature, "num_pdfs": num_pdfs, "k": k})
        arrays = {name: load_array(directory / f"{name}.npy", True, "soft-targets") for name in store_arrays(header)}
        if "dense" in arrays:
            check_shape(directory / "dense.npy", arrays["dense"], (header["num_frames"], header["num_pdfs"]))
        else:
            arrays["dense"] = None
        check_shape(directory / "topk_ids.npy", arrays["topk_ids"], (header["num_frames"], header["k"]))
        return cls(header, **arrays)

    def label_agreement(self, frames: np.ndarray, pdf_ids: np.ndarray) -> tuple[int, float]:
        """Over ``frames`` (labels ``pdf_ids``): how many have the label as their most likely pdf, and
        the probability mass on the label summed. From the dense form when the store holds it, else
        from the top-k form (the argmax is always in it; a label outside the top k counts 0 mass,
        so the sum is low by at most the frames' residual)."""
        if self.dense is not None:
            probs = np.asarray(self.dense[frames], dtype=np.float32)
            return int((probs.argmax(1) == pdf_ids).sum()), float(probs[np.arange(len(frames)), pdf_ids].sum())
        ids, probs = np.asarray(self.topk_ids[frames]), np.asarray(self.topk_probs[frames], dtype=np.float32)
        kept_mass = 1.0 - np.asarray(self.residual[frames], dtype=np.float32)
        agree = int((ids[np.arange(len(frames)), probs.argmax(1)] == pdf_ids).sum())
        return agree, float(((ids == pdf_ids[:, None]) * probs).sum(1).dot(kept_mass))

    def rows(self, form: str, device: torch.device | str = "cpu", compact: dict | None = None,
             pdf_priors: np.ndarray | None = None) -> "TargetRows":
        """The ``form`` of every frame as tensors on ``device`` (read once; a batch is then one
        gather there): ``dense``, ``topk``, ``compact`` or ``compact_prior`` (``compact``: its
        budget and residual; ``pdf_priors``: what ``compact_prior`` spreads the residual by)."""
        if form == "dense":
            if self.dense is None:
                gb = dense_bytes(self.header["num_frames"], self.header["num_pdfs"]) / 1e9
                raise ValueError(f"this soft-target store (T={self.header['temperature']:g}) holds the top-k form alone: its dense form "
                                 f"would take {gb:.1f} GB (distill.store_dense, distill.dense_limit_gb); train the compact or topk "
                                 "students (distill.students), or the dense one with distill.on_the_fly=true")
            return TargetRows("dense", self.header["num_pdfs"], device, dense=self.dense)
        if form == "topk":
            return TargetRows("topk", self.header["num_pdfs"], device, ids=self.topk_ids, probs=self.topk_probs)
        if form in COMPACT_FORMS:
            if form == "compact_prior" and pdf_priors is None:
                raise ValueError("the compact_prior form needs the pdf priors (the training alignment's pdf counts)")
            return TargetRows.compact(self, device, **(compact or {}), pdf_priors=pdf_priors if form == "compact_prior" else None)
        raise ValueError(f"soft-target form must be 'dense', 'topk', 'compact' or 'compact_prior', got {form!r}")


COMPACT_FORMS = ("compact", "compact_prior")


def compact_bytes(k: int) -> int:
    """Bytes per frame of the compact form: k int16 ids, k fp16 probabilities, the fp16 residual."""
    return 4 * k + 2


def compact_k(sorted_probs: np.ndarray, residual: np.ndarray, num_pdfs: int, budget: float, max_residual: float) -> int:
    """The compact form's k for one store: the smallest k whose mean mass outside the top k is
    at most ``max_residual``, but never more bytes than ``budget`` x the dense fp32 row (4 bytes
    per pdf), nor more than the k the store keeps. ``sorted_probs``: the stored top-k, largest
    first, renormalized; ``residual``: the mass outside them."""
    kept = sorted_probs.shape[1]
    within_budget = min(kept, int((budget * 4 * num_pdfs - 2) // 4))
    if within_budget < 1:
        raise ValueError(f"distill.compact.budget={budget} leaves no room for one pdf of {num_pdfs} (4 bytes each + 2)")
    mass = np.cumsum(sorted_probs.astype(np.float64), axis=1) * (1.0 - residual.astype(np.float64))[:, None]
    mean_outside = 1.0 - mass.mean(0)  # mean residual with the top 1, 2, ... kept
    enough = np.flatnonzero(mean_outside <= max_residual)
    return int(min(within_budget, enough[0] + 1 if len(enough) else kept))


class TargetRows:
    """Soft targets (or teacher logits) of every frame of a store, resident on one device; ``batch``
    gathers a batch's rows there and returns them as (B, pdfs) float32, so a training step makes
    no round trip through the host.

    Forms: ``dense`` (the row), ``topk`` (k probabilities renormalized: the rest is dropped),
    ``compact`` (the k largest with their true mass; the residual spread evenly over the other
    pdfs, so every row still sums to one and no pdf's probability is zeroed), ``compact_prior``
    (the residual spread over the other pdfs in proportion to their priors, so rare pdfs are
    not lifted above what they are worth: the decoder divides by the priors), ``logits``.
    """

    def __init__(self, form: str, num_pdfs: int, device: torch.device | str, *, dense=None, ids=None, probs=None, residual=None,
                 pdf_priors=None):
        self.form, self.num_pdfs, self.device = form, num_pdfs, torch.device(device)
        self.pdf_priors = None if pdf_priors is None else torch.as_tensor(pdf_priors, dtype=torch.float32, device=self.device)
        as_rows = lambda a: None if a is None else resident(a, self.device)  # noqa: E731  (mapped on the CPU, else read onto the device)
        self.dense, self.ids, self.probs, self.residual = as_rows(dense), as_rows(ids), as_rows(probs), as_rows(residual)
        self.k = None if ids is None else int(ids.shape[1])
        self.num_frames = len(dense if dense is not None else ids)

    @classmethod
    def compact(cls, store: SoftTargetStore, device, budget: float = 0.05, max_residual: float = 0.01,
                pdf_priors: np.ndarray | None = None) -> "TargetRows":
        probs = np.asarray(store.topk_probs, dtype=np.float32)
        order = np.argsort(-probs, axis=1, kind="stable")
        probs = np.take_along_axis(probs, order, axis=1)
        residual = np.asarray(store.residual, dtype=np.float32)
        num_pdfs = store.header["num_pdfs"]
        k = compact_k(probs, residual, num_pdfs, budget, max_residual)
        ids = np.take_along_axis(np.asarray(store.topk_ids), order[:, :k], axis=1).astype(id_dtype(num_pdfs))
        mass = (probs[:, :k] * (1.0 - residual)[:, None]).astype(np.float16)  # the true probabilities, not renormalized
        left = np.clip(1.0 - mass.astype(np.float32).sum(1), 0.0, 1.0).astype(np.float16)
        return cls("compact" if pdf_priors is None else "compact_prior", num_pdfs, device, ids=ids, probs=mass, residual=left,
                   pdf_priors=pdf_priors)

    def bytes_per_frame(self) -> int:
        """What one frame of this form takes as stored (the compact form: int16 ids, fp16 mass and residual)."""
        if self.form in COMPACT_FORMS:
            return compact_bytes(self.k)
        if self.dense is not None:
            return self.dense.dtype.itemsize * self.num_pdfs
        return self.k * (self.ids.dtype.itemsize + self.probs.dtype.itemsize)

    def mean_residual(self) -> float:
        """Mean probability mass outside the rows the form keeps (0 for dense)."""
        if self.form in COMPACT_FORMS:
            return float(self.residual.double().mean())
        return 0.0

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, pdfs) float32 rows of frames ``indices`` (a tensor on this device)."""
        if self.dense is not None:
            return gather(self.dense, indices).float()
        ids = gather(self.ids, indices).long()
        if self.form == "compact":
            spread = gather(self.residual, indices).float() / (self.num_pdfs - self.k)
            out = spread[:, None].expand(len(indices), self.num_pdfs).clone()
        elif self.form == "compact_prior":
            out = self.pdf_priors[None].expand(len(indices), self.num_pdfs).clone().scatter_(1, ids, 0.0)
            out *= gather(self.residual, indices).float()[:, None] / out.sum(1, keepdim=True).clamp(min=1e-12)
        else:
            out = torch.zeros(len(indices), self.num_pdfs, device=self.device)
        return out.scatter_(1, ids, gather(self.probs, indices).float())


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

    def rows(self, device: torch.device | str = "cpu") -> TargetRows:
        return TargetRows("logits", self.header["num_pdfs"], device, dense=self.logits)


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


def teacher_dir(layout: Layout, teacher: str, store: str) -> Path:
    """exp/soft_targets/<teacher>/<store>: the soft targets ``teacher`` gives the frames of ``store``."""
    return layout.soft_targets(teacher, store)


def store_dir(layout: Layout, teacher: str, temperature: float, store: str = "train") -> Path:
    return teacher_dir(layout, teacher, store) / f"T{temperature:g}"


def logits_dir(layout: Layout, teacher: str, store: str = "train") -> Path:
    return teacher_dir(layout, teacher, store) / "logits"
