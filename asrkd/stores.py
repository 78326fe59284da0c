"""Containers on disk that every layer shares: a FeatureStore (the frames of many utterances in
one array, with their offsets: fbank and MFCC features, images), arrays read with errors that
name the stage to rerun, Kaldi matrix arks.

Ground layer: numpy and the stage's atomic writes only, nothing of Kaldi's or torch's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import kaldiio
import numpy as np

from asrkd.files import atomic_write, new_array, write_json


@dataclass
class FeatureStore:
    """Frames of many utterances in one array; ``offsets[i]:offsets[i+1]`` is utterance i."""

    utt_ids: list[str]
    offsets: np.ndarray  # int64, len(utt_ids) + 1
    frames: np.ndarray  # (num_frames, dim), possibly a read-only memmap

    FRAMES = "frames.npy"
    INDEX = "index.json"
    CHECKSUM_ROWS = 1 << 16  # rows read at a time where the whole store is scanned

    def __post_init__(self) -> None:
        self._row = {utt: i for i, utt in enumerate(self.utt_ids)}

    @property
    def num_frames(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.frames.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __contains__(self, utt: str) -> bool:
        return utt in self._row

    def span(self, utt: str) -> tuple[int, int]:
        i = self._row[utt]
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def __getitem__(self, utt: str) -> np.ndarray:
        start, end = self.span(utt)
        return self.frames[start:end]

    @classmethod
    def from_arrays(cls, items: dict[str, np.ndarray], dtype: str = "float32") -> "FeatureStore":
        utt_ids = sorted(items)
        lengths = [len(items[u]) for u in utt_ids]
        offsets = np.zeros(len(utt_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        frames = np.concatenate([items[u] for u in utt_ids]).astype(dtype)
        return cls(utt_ids, offsets, frames)

    @classmethod
    def concat(cls, stores: list["FeatureStore"]) -> "FeatureStore":
        """Several stores end to end, in order (utterance ids must differ). Their frames are not
        copied: :class:`ConcatenatedFrames` reads each row from the store that holds it."""
        utt_ids = [u for store in stores for u in store.utt_ids]
        if len(set(utt_ids)) < len(utt_ids):
            raise ValueError("feature stores to combine share utterance ids; use one store that holds them all")
        starts = np.cumsum([0] + [store.num_frames for store in stores[:-1]])
        offsets = np.concatenate([[0]] + [store.offsets[1:] + start for store, start in zip(stores, starts)]).astype(np.int64)
        return cls(utt_ids, offsets, ConcatenatedFrames([store.frames for store in stores]))

    def save(self, directory: Path) -> None:
        FeatureStore.write(directory, {utt: self[utt] for utt in self.utt_ids})

    @classmethod
    def write(cls, directory: Path, items: Mapping[str, np.ndarray]) -> None:
        """Write utterances' frames (one dtype) as a store in ``directory``, in ``items``' order,
        one utterance in memory at a time: ``items`` may map to views of memory-mapped files."""
        directory = Path(directory)
        utt_ids = list(items)
        offsets = np.zeros(len(utt_ids) + 1, dtype=np.int64)
        np.cumsum([len(items[utt]) for utt in utt_ids], out=offsets[1:])
        first = items[utt_ids[0]]
        with atomic_write(directory / cls.FRAMES) as tmp:
            frames = new_array(tmp, first.dtype, (int(offsets[-1]), first.shape[1]))
            for utt, start, end in zip(utt_ids, offsets[:-1], offsets[1:]):
                frames[start:end] = items[utt]
            # hashed as written (the pages are still in memory), not read back from the file
            checksum = cls._checksum(utt_ids, offsets, (frames[start:end] for start, end in zip(offsets[:-1], offsets[1:])))
            frames.flush()
            del frames
        write_json(directory / cls.INDEX, {"utt_ids": utt_ids, "offsets": offsets.tolist(), "checksum": checksum})

    @classmethod
    def load(cls, directory: Path, mmap: bool = True, stage: str = "make-feats") -> "FeatureStore":
        """The store in ``directory``; ``stage`` is the command an error tells to rerun."""
        directory = Path(directory)
        if not (directory / cls.INDEX).is_file():
            raise FileNotFoundError(f"{directory}: no feature store ({cls.INDEX} missing); run {stage}")
        index = json.loads((directory / cls.INDEX).read_text())
        frames = load_array(directory / cls.FRAMES, mmap, stage)
        offsets = np.asarray(index["offsets"], dtype=np.int64)
        if offsets[-1] != len(frames):
            raise ValueError(f"{directory}: index covers {offsets[-1]} frames, array has {len(frames)}")
        return cls(index["utt_ids"], offsets, frames)

    @staticmethod
    def utterances(directory: Path) -> list[str]:
        """The utterance ids of the store in ``directory`` (its index only)."""
        return json.loads((Path(directory) / FeatureStore.INDEX).read_text())["utt_ids"]

    def nonfinite_utterances(self) -> list[str]:
        """The utterances holding a NaN or infinite frame (read a block at a time)."""
        bad: set[int] = set()
        for start in range(0, self.num_frames, self.CHECKSUM_ROWS):
            rows = np.flatnonzero(~np.isfinite(np.asarray(self.frames[start:start + self.CHECKSUM_ROWS], dtype=np.float32)).all(axis=1))
            bad.update((np.searchsorted(self.offsets, start + rows, side="right") - 1).tolist())
        return [self.utt_ids[i] for i in sorted(bad)]

    def checksum(self) -> str:
        """A content hash: later stores (alignments, soft targets) record which features they match."""
        blocks = (self.frames[start:start + self.CHECKSUM_ROWS] for start in range(0, self.num_frames, self.CHECKSUM_ROWS))
        return self._checksum(self.utt_ids, self.offsets, blocks)  # a memory-mapped store is read a block at a time

    @staticmethod
    def _checksum(utt_ids: list[str], offsets: np.ndarray, blocks: Iterable[np.ndarray]) -> str:
        """The hash of ids, offsets and the frames' bytes given as consecutive blocks of rows (any split gives the same)."""
        digest = hashlib.sha256()
        digest.update("\n".join(utt_ids).encode())
        digest.update(offsets.tobytes())
        for block in blocks:
            digest.update(np.ascontiguousarray(block).tobytes())
        return digest.hexdigest()[:16]

    def write_kaldi(self, ark: Path, scp: Path) -> None:
        """Export as a Kaldi float matrix ark + scp, readable by copy-feats and friends."""
        write_kaldi_matrices(ark, scp, ((utt, np.asarray(self[utt], dtype=np.float32)) for utt in self.utt_ids))

    @classmethod
    def read_kaldi(cls, scp: Path, dtype: str = "float32") -> "FeatureStore":
        """Import a Kaldi feature scp (e.g. from a user's own make_fbank.sh)."""
        return cls.from_arrays({utt: np.asarray(m) for utt, m in kaldiio.load_scp(str(scp)).items()}, dtype)


class ConcatenatedFrames:
    """Arrays of rows (memory-mapped stores) read as one, end to end, without a copy: rows by
    slice or by index array, each taken from the array that holds it (a transfer set in a store
    of its own beside the training set's). ``np.asarray`` copies it whole (to put it on a GPU)."""

    def __init__(self, parts: list[np.ndarray]):
        dtypes = {part.dtype for part in parts}
        if len(dtypes) > 1 or len({part.shape[1] for part in parts}) > 1:
            raise ValueError(f"feature stores to combine differ in dtype or dimension ({', '.join(f'{p.dtype} x {p.shape[1]}' for p in parts)})")
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])  # part i: rows starts[i]:starts[i + 1]
        self.dtype = dtypes.pop()
        self.shape = (int(self.starts[-1]), parts[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        shape = np.shape(rows)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # an index array of any shape (a batch of windows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)})")
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for i, part in enumerate(self.parts):
            mine = part_of == i
            if mine.any():
                out[mine] = part[rows[mine] - self.starts[i]]
        return out.reshape(*shape, self.shape[1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate([np.asarray(part) for part in self.parts])
        return whole if dtype is None else whole.astype(dtype)


def write_kaldi_matrices(ark: Path, scp: Path, items) -> None:
    """(utt, matrix) pairs as a Kaldi ark + scp (kaldiio), both written atomically; the scp
    points at the ark's final name."""
    with atomic_write(ark) as tmp_ark, atomic_write(scp) as tmp_scp:
        with kaldiio.WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer:
            for utt, matrix in items:
                writer(utt, matrix)
        tmp_scp.write_text(tmp_scp.read_text().replace(str(tmp_ark), str(ark)))


def index_dtype(num_rows: int) -> type:
    """The integer type of indices into ``num_rows`` rows: int32 while it holds them (4 bytes an index), else int64."""
    return np.int32 if num_rows < 2**31 else np.int64


def load_array(path: Path, mmap: bool, stage: str, writable: bool = False) -> np.ndarray:
    """np.load with an error that names the file and the stage to rerun when it is cut short or corrupt.
    ``writable`` maps it copy-on-write (a torch tensor can share it; the file is never written)."""
    try:
        return np.load(path, mmap_mode=("c" if writable else "r") if mmap else None)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}); rerun {stage} with redo=true") from err
