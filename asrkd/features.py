"""Acoustic features: Kaldi-compatible fbank (for the DNN) and MFCC+deltas (for the GMM).

Features live in a :class:`FeatureStore`: one contiguous ``(num_frames, dim)`` array plus
per-utterance offsets. Training gathers frames from it with one vectorized index per batch,
and the array can be memory-mapped, so a store as large as RAM costs nothing to open.
Kaldi users can export it to ark/scp (and import theirs) through kaldiio.

Why kaldi-native-fbank and not torchaudio: it computes Kaldi's fbank exactly (it matched
``torchaudio.compliance.kaldi.fbank`` to 3e-4 and is ~4x faster), and torchaudio's wheels
cannot be installed beside the CPU build of torch (they are CUDA-linked, and its load() now
needs torchcodec + FFmpeg).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import soundfile as sf

from asrkd.data import DataDir

log = logging.getLogger(__name__)


@dataclass
class FeatureStore:
    """Frames of many utterances in one array; ``offsets[i]:offsets[i+1]`` is utterance i."""

    utt_ids: list[str]
    offsets: np.ndarray  # int64, len(utt_ids) + 1
    frames: np.ndarray  # (num_frames, dim), possibly a read-only memmap

    FRAMES = "frames.npy"
    INDEX = "index.json"

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

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / self.FRAMES, self.frames)
        index = {"utt_ids": self.utt_ids, "offsets": self.offsets.tolist(), "checksum": self.checksum()}
        (directory / self.INDEX).write_text(json.dumps(index))

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> "FeatureStore":
        directory = Path(directory)
        if not (directory / cls.INDEX).is_file():
            raise FileNotFoundError(f"{directory}: no feature store ({cls.INDEX} missing)")
        index = json.loads((directory / cls.INDEX).read_text())
        frames = np.load(directory / cls.FRAMES, mmap_mode="r" if mmap else None)
        offsets = np.asarray(index["offsets"], dtype=np.int64)
        if offsets[-1] != len(frames):
            raise ValueError(f"{directory}: index covers {offsets[-1]} frames, array has {len(frames)}")
        return cls(index["utt_ids"], offsets, frames)

    def checksum(self) -> str:
        """A content hash: later stores (alignments, soft targets) record which features they match."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.utt_ids).encode())
        digest.update(self.offsets.tobytes())
        digest.update(np.ascontiguousarray(self.frames).tobytes())
        return digest.hexdigest()[:16]

    def write_kaldi(self, ark: Path, scp: Path) -> None:
        """Export as a Kaldi float matrix ark + scp, readable by copy-feats and friends."""
        import kaldiio

        with kaldiio.WriteHelper(f"ark,scp:{ark},{scp}") as writer:
            for utt in self.utt_ids:
                writer(utt, np.asarray(self[utt], dtype=np.float32))

    @classmethod
    def read_kaldi(cls, scp: Path, dtype: str = "float32") -> "FeatureStore":
        """Import a Kaldi feature scp (e.g. from a user's own make_fbank.sh)."""
        import kaldiio

        return cls.from_arrays({utt: np.asarray(m) for utt, m in kaldiio.load_scp(str(scp)).items()}, dtype)


def read_waveform(path: str, utt: str, sample_rate: int) -> np.ndarray:
    """Read mono audio on Kaldi's int16 scale; errors name the utterance and the file."""
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for missing/corrupt files
        raise ValueError(f"utterance {utt}: cannot read audio {path}: {err}") from err
    if rate != sample_rate:
        raise ValueError(f"utterance {utt}: {path} has sample rate {rate}, config expects {sample_rate}")
    if samples.shape[0] == 0:
        raise ValueError(f"utterance {utt}: {path} is empty")
    return samples[:, 0] * 32768.0


def _frame_options(cfg) -> knf.FrameExtractionOptions:
    opts = knf.FrameExtractionOptions()
    opts.samp_freq = float(cfg.sample_rate)
    opts.frame_length_ms = float(cfg.frame_length_ms)
    opts.frame_shift_ms = float(cfg.frame_shift_ms)
    opts.dither = float(cfg.dither)
    opts.snip_edges = True
    return opts


def _run_online(computer, samples: np.ndarray, sample_rate: int) -> np.ndarray:
    computer.accept_waveform(float(sample_rate), samples)
    computer.input_finished()
    return np.array([computer.get_frame(i) for i in range(computer.num_frames_ready)], dtype=np.float32)


def compute_fbank(samples: np.ndarray, cfg) -> np.ndarray:
    """40-d log-mel filterbank with Kaldi's defaults (povey window, pre-emphasis 0.97)."""
    opts = knf.FbankOptions()
    opts.frame_opts = _frame_options(cfg)
    opts.mel_opts.num_bins = int(cfg.num_mel_bins)
    return _run_online(knf.OnlineFbank(opts), samples, cfg.sample_rate)


def compute_mfcc_deltas(samples: np.ndarray, cfg) -> np.ndarray:
    """13 MFCCs + deltas + delta-deltas: the GMM's classic input (Kaldi's add-deltas)."""
    opts = knf.MfccOptions()
    opts.frame_opts = _frame_options(cfg)
    opts.num_ceps = int(cfg.num_ceps)
    mfcc = _run_online(knf.OnlineMfcc(opts), samples, cfg.sample_rate)
    return np.asarray(knf.compute_deltas(knf.DeltaOptions(order=2, window=2), mfcc))


def apply_speaker_cmvn(items: dict[str, np.ndarray], utt2spk: dict[str, str], norm_vars: bool) -> None:
    """Per-speaker mean (and optionally variance) normalization, in place, as apply-cmvn does."""
    by_speaker: dict[str, list[str]] = {}
    for utt in items:
        by_speaker.setdefault(utt2spk[utt], []).append(utt)
    for utts in by_speaker.values():
        stacked = np.concatenate([items[u] for u in utts]).astype(np.float64)
        mean = stacked.mean(axis=0)
        std = np.sqrt(np.maximum(stacked.var(axis=0), 1e-10)) if norm_vars else 1.0
        for u in utts:
            items[u] = ((items[u] - mean) / std).astype(np.float32)


def make_features(data: DataDir, cfg, kind: str) -> tuple[FeatureStore, dict[str, str]]:
    """Compute ``kind`` ('fbank' or 'mfcc') for every utterance with readable audio.

    Returns the store and the utterances that were dropped with the reason for each; the
    caller decides whether the loss is acceptable.
    """
    compute = {"fbank": compute_fbank, "mfcc": compute_mfcc_deltas}[kind]
    items: dict[str, np.ndarray] = {}
    dropped: dict[str, str] = {}
    min_frames = 1
    for utt in data.utt_ids:
        try:
            samples = read_waveform(data.wav_scp[utt], utt, cfg.sample_rate)
            feats = compute(samples, cfg)
        except ValueError as err:
            dropped[utt] = str(err)
            log.warning("%s", err)
            continue
        if len(feats) < min_frames:
            dropped[utt] = f"utterance {utt}: audio shorter than one frame"
            continue
        items[utt] = feats
    if not items:
        raise ValueError(f"no utterance produced {kind} features ({len(dropped)} dropped)")
    apply_speaker_cmvn(items, data.utt2spk, norm_vars=bool(cfg.cmvn_norm_vars[kind]))
    dtype = cfg.storage_dtype[kind]
    return FeatureStore.from_arrays(items, dtype), dropped


def run(cfg) -> None:
    """Stage: fbank (DNN) and MFCC+deltas (GMM) for every set in ``features.sets``."""
    from asrkd.stage import account_dropped, mark_done, skip_if_done

    for name in cfg.features.sets:
        data = DataDir.read(Path(cfg.data_dir) / name)
        for kind in ("fbank", "mfcc"):
            out_dir = Path(cfg.exp_dir) / "feats" / kind / name
            if skip_if_done(out_dir, f"make-feats {kind} {name}"):
                continue
            store, dropped = make_features(data, cfg.features, kind)
            account_dropped(f"make-feats {kind} {name}", len(data.utt2spk), dropped, cfg.prep.max_drop_fraction, out_dir / "dropped.json")
            store.save(out_dir)
            if cfg.features.write_kaldi_ark:
                store.write_kaldi(out_dir / "feats.ark", out_dir / "feats.scp")
            log.info("make-feats %s %s: %d utterances, %d frames x %d", kind, name, len(store.utt_ids), store.num_frames, store.dim)
            mark_done(out_dir)
