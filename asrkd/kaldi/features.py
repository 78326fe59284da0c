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

import io
import logging
import struct
import subprocess
import tempfile
from collections.abc import Callable
from functools import partial
from math import gcd
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import soundfile as sf
from omegaconf import OmegaConf
from scipy.signal import resample_poly

from asrkd import sections
from asrkd.data import DataDir
from asrkd.drops import account_dropped
from asrkd.files import atomic_write
from asrkd.jobs import map_jobs, split
from asrkd.progress import progress
from asrkd.stage import plan
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)


class AudioError(ValueError):
    """An utterance's audio cannot be used as it is; the message names it, the file and the fix."""


def check_wav_length(path: str, utt: str) -> None:
    """A RIFF/WAVE file whose data chunk is shorter than its header says was cut short.

    libsndfile reads such a file without a word (it returns the samples that are there), so
    a truncated download or copy would otherwise train on half an utterance.
    """
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return  # not RIFF/WAVE: libsndfile checks its own formats
        size = Path(path).stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise AudioError(f"utterance {utt}: truncated wav ({path}: no data chunk); re-copy the file")
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                present = size - f.tell()
                if length > present and length != 0xFFFFFFFF:  # 0xFFFFFFFF: streamed, length unknown
                    raise AudioError(f"utterance {utt}: truncated wav ({path}: its header declares {length} bytes of audio, "
                                     f"the file holds {present}); re-copy the file")
                return
            f.seek(length + (length & 1), 1)


def piped_audio(command: str, utt: str):
    """The audio a Kaldi extended filename ``<command> |`` writes to stdout (``flac -c -d -s f.flac |``,
    ``sox f.sph -t wav - |``), as a file object; a failing command is an error naming it."""
    result = subprocess.run(command.rstrip()[:-1], shell=True, capture_output=True)
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"no output, exit status {result.returncode}"]
        raise AudioError(f"utterance {utt}: the wav.scp command failed ({command.strip()}: {message[0]})")
    return io.BytesIO(result.stdout)


def read_waveform(path: str, utt: str, sample_rate: int, channel: int | None = None, resample: bool = False) -> np.ndarray:
    """Read one channel of audio on Kaldi's int16 scale; errors name the utterance, the file and the fix.

    ``path`` is a file soundfile reads (wav, flac, ...) or, as in Kaldi's wav.scp, a command
    ending in ``|`` whose output is such a file.

    Multi-channel audio needs ``channel`` (Kaldi too refuses it unless wav.scp picks one);
    another sample rate needs ``resample`` (polyphase, scipy), as features assume one rate.
    """
    try:
        if path.rstrip().endswith("|"):
            samples, rate = sf.read(piped_audio(path, utt), dtype="float32", always_2d=True)
        else:
            check_wav_length(path, utt)
            samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as err:  # a missing file, or one soundfile cannot decode
        raise AudioError(f"utterance {utt}: unreadable audio ({path}: {getattr(err, 'strerror', None) or err})") from err
    channels = samples.shape[1]
    if channels > 1 and channel is None:
        raise AudioError(f"utterance {utt}: {channels} channels ({path}); set features.channel=<0..{channels - 1}> "
                         "to use one (Kaldi would need `sox ... remix N |` in wav.scp)")
    if channel is not None and not 0 <= channel < channels:
        raise AudioError(f"utterance {utt}: {channels} channel(s) ({path}); features.channel={channel} is not one of them")
    samples = samples[:, channel or 0]
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"utterance {utt}: sample rate {rate} ({path}; features.sample_rate is {sample_rate}); "
                             "set features.resample=true to resample it")


        g = gcd(int(rate), int(sample_rate))
        samples = resample_poly(samples, int(sample_rate) // g, int(rate) // g).astype(np.float32)
    if samples.shape[0] == 0:
        raise AudioError(f"utterance {utt}: zero-length audio ({path})")
    if not np.isfinite(samples).all():
        raise AudioError(f"utterance {utt}: NaN or infinite samples ({path})")
    return samples * 32768.0


def _frame_options(options) -> knf.FrameExtractionOptions:
    opts = knf.FrameExtractionOptions()
    opts.samp_freq = float(options.sample_rate)
    opts.frame_length_ms = float(options.frame_length_ms)
    opts.frame_shift_ms = float(options.frame_shift_ms)
    opts.dither = float(options.dither)
    opts.snip_edges = True
    return opts


def _run_online(computer, samples: np.ndarray, sample_rate: int) -> np.ndarray:
    computer.accept_waveform(float(sample_rate), samples)
    computer.input_finished()
    return np.array([computer.get_frame(i) for i in range(computer.num_frames_ready)], dtype=np.float32)


def compute_fbank(samples: np.ndarray, options) -> np.ndarray:
    """40-d log-mel filterbank with Kaldi's defaults (povey window, pre-emphasis 0.97); ``options``: the ``features`` section."""
    opts = knf.FbankOptions()
    opts.frame_opts = _frame_options(options)
    opts.mel_opts.num_bins = int(options.num_mel_bins)
    return _run_online(knf.OnlineFbank(opts), samples, options.sample_rate)


def compute_mfcc_deltas(samples: np.ndarray, options) -> np.ndarray:
    """13 MFCCs + deltas + delta-deltas: the GMM's classic input (Kaldi's add-deltas)."""
    opts = knf.MfccOptions()
    opts.frame_opts = _frame_options(options)
    opts.num_ceps = int(options.num_ceps)
    mfcc = _run_online(knf.OnlineMfcc(opts), samples, options.sample_rate)
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


def speaker_parts(data: DataDir, nj: int) -> list[list[str]]:
    """The utterances in at most ``nj`` parts of whole speakers (as Kaldi's split_data.sh splits
    by speaker): CMVN needs a speaker's utterances together, so a job normalizes its own."""
    by_speaker: dict[str, list[str]] = {}
    for utt in data.utt_ids:
        by_speaker.setdefault(data.utt2spk[utt], []).append(utt)
    return [[u for speaker in part for u in by_speaker[speaker]] for part in split(list(by_speaker), nj)]


def compute_part(job: tuple[dict, dict, dict, str, list[str], str]) -> tuple[list[tuple[str, int]], int, dict[str, str]]:
    """One job of make_features: (wav.scp entries, utt2spk, features config, kind, utterances of
    whole speakers, frames file) -> the utterances written with their frame counts, in the order
    written, the features' dimension, and the utterances dropped.

    Features are computed a speaker at a time, normalized (CMVN) and appended to the job's frames
    file in the store's dtype, so a job holds one speaker's frames, never its whole split."""
    wav_scp, utt2spk, options, kind, utts, frames_path = job
    options = OmegaConf.create(options)
    compute = {"fbank": compute_fbank, "mfcc": compute_mfcc_deltas}[kind]
    dtype = np.dtype(options.storage_dtype[kind])
    by_speaker: dict[str, list[str]] = {}
    for utt in utts:
        by_speaker.setdefault(utt2spk[utt], []).append(utt)
    written: list[tuple[str, int]] = []
    dropped: dict[str, str] = {}
    dim = 0
    with atomic_write(frames_path) as tmp, open(tmp, "wb") as out:  # a full disk: the one-line error naming the file
        for speaker_utts in progress(list(by_speaker.values()), f"{kind} features", unit="speakers"):
            items: dict[str, np.ndarray] = {}
            for utt in speaker_utts:
                try:
                    samples = read_waveform(wav_scp[utt], utt, options.sample_rate, options.channel, options.resample)
                    feats = compute(samples, options)
                except AudioError as err:
                    dropped[utt] = str(err)
                    log.warning("%s", err)
                    continue
                if len(feats) < 1:
                    dropped[utt] = f"utterance {utt}: audio shorter than one frame"
                    continue
                if not np.isfinite(feats).all():
                    dropped[utt] = f"utterance {utt}: NaN or infinite {kind} features (audio {wav_scp[utt]})"
                    continue
                items[utt] = feats
            apply_speaker_cmvn(items, utt2spk, norm_vars=bool(options.cmvn_norm_vars[kind]))
            for utt, feats in items.items():
                out.write(np.ascontiguousarray(feats, dtype=dtype).tobytes())
                written.append((utt, len(feats)))
                dim = feats.shape[1]
    return written, dim, dropped


def make_features(data: DataDir, options, kind: str, out_dir: Path, run_jobs=None, nj: int = 1,
                  accept_dropped: Callable[[dict[str, str]], None] | None = None) -> tuple[FeatureStore, dict[str, str]]:
    """Compute ``kind`` ('fbank' or 'mfcc'; ``options``: the ``features`` section) for every utterance with readable audio into the
    store in ``out_dir``, in ``nj`` jobs of whole speakers (``run_jobs``: :func:`asrkd.jobs.map_jobs`
    bound to a stage), each writing its frames to a file of its own, merged in utterance order.

    Memory is one speaker's frames in a job and one utterance's in the merge, whatever the
    corpus's hours. Returns the store (memory-mapped) and the utterances that were dropped with
    the reason for each; ``accept_dropped`` (the caller's judgement of that loss) sees them before
    the store is written, so a stage it refuses leaves no store behind.
    """
    settings = OmegaConf.to_container(options, resolve=True)
    dtype = np.dtype(options.storage_dtype[kind])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{kind}-jobs-", dir=out_dir) as work:
        parts = speaker_parts(data, nj)
        job_files = [str(Path(work) / f"frames.{j + 1}") for j in range(len(parts))]
        jobs = [({u: data.wav_scp[u] for u in part}, {u: data.utt2spk[u] for u in part}, settings, kind, part, path)
                for part, path in zip(parts, job_files)]
        results = run_jobs(compute_part, jobs) if run_jobs else [compute_part(job) for job in jobs]
        dropped: dict[str, str] = {}
        located: dict[str, tuple[int, int, int]] = {}  # utterance -> (job, first row in its file, frames)
        job_frames: list[np.ndarray | None] = []
        for j, ((written, dim, part_dropped), path) in enumerate(zip(results, job_files)):
            dropped |= part_dropped
            job_frames.append(np.memmap(path, dtype=dtype, mode="r").reshape(-1, dim) if written else None)
            row = 0
            for utt, length in written:
                located[utt] = (j, row, length)
                row += length
        if not located:
            raise AudioError(f"no utterance produced {kind} features ({len(dropped)} dropped, e.g. {next(iter(dropped.values()), '')})")
        if accept_dropped:
            accept_dropped(dropped)
        FeatureStore.write(out_dir, {utt: job_frames[located[utt][0]][located[utt][1]:sum(located[utt][1:])] for utt in sorted(located)})
        del job_frames
    return FeatureStore.load(out_dir), dropped


# the config keys that decide a feature store (features.sets only says which stores to make)
FEATURE_KEYS = ("features.write_kaldi_ark", "features.sample_rate", "features.frame_length_ms", "features.frame_shift_ms",
                "features.dither", "features.num_mel_bins", "features.num_ceps", "features.cmvn_norm_vars",
                "features.storage_dtype", "features.channel", "features.resample")


def run(cfg) -> None:
    """Stage 2: fbank (DNN) and MFCC+deltas (GMM) for every set of ``features.sets`` (default: train and
    the evaluation sets), in ``jobs.nj`` jobs."""
    data_sets, layout, jobs, settings = sections.data_sets(cfg), sections.layout(cfg), sections.jobs(cfg), sections.settings(cfg, FEATURE_KEYS)
    for name in data_sets.processed():
        data_path = layout.data_dir(name)
        data = DataDir.read(data_path)
        for kind in ("fbank", "mfcc"):
            out_dir = layout.features(kind, name)
            stage = plan(f"make-feats {kind} {name}", out_dir, settings, {"data": data_path}, {"kind": kind})
            if stage.up_to_date:
                continue
            scored_only = data_sets.scoring_only(name)  # a set only scored trains nothing: its drops are counted and listed, never fatal
            accept = partial(account_dropped, f"make-feats {kind} {name}" + (" (scored only: drops never stop the stage)" if scored_only else ""),
                             len(data.utt2spk), max_fraction=1.0 if scored_only else cfg.prep.max_drop_fraction,
                             report=out_dir / "dropped.json")
            store, dropped = make_features(data, cfg.features, kind, out_dir, partial(map_jobs, jobs, stage=f"make-feats {kind} {name}"), jobs.nj,
                                           accept_dropped=accept)
            if cfg.features.write_kaldi_ark:
                store.write_kaldi(out_dir / "feats.ark", out_dir / "feats.scp")
            log.info("make-feats %s %s: %d utterances, %d frames x %d", kind, name, len(store.utt_ids), store.num_frames, store.dim)
            stage.commit(utterances=len(store.utt_ids), frames=store.num_frames, dropped=len(dropped))
