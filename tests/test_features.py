import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from asrkd.data import DataDir
from asrkd.stores import FeatureStore
from asrkd.kaldi.features import apply_speaker_cmvn, compute_fbank, make_features, read_waveform

CFG = OmegaConf.create({"sample_rate": 16000, "frame_length_ms": 25, "frame_shift_ms": 10, "dither": 0.0, "num_mel_bins": 40,
                        "num_ceps": 13, "cmvn_norm_vars": {"fbank": False, "mfcc": False},
                        "storage_dtype": {"fbank": "float16", "mfcc": "float32"}, "channel": None, "resample": False})


def reference_fbank(samples: np.ndarray, num_bins: int = 40, rate: int = 16000) -> np.ndarray:
    """Kaldi's compute-fbank-feats written out in numpy (defaults, no dither, snip_edges)."""
    length, shift, fft = 400, 160, 512
    count = 1 + (len(samples) - length) // shift
    frames = np.stack([samples[i * shift : i * shift + length] for i in range(count)]).astype(np.float64)
    frames -= frames.mean(1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] -= 0.97 * frames[:, 0]
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames, fft)) ** 2
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    edges = np.linspace(mel(20.0), mel(rate / 2), num_bins + 2)
    bin_mel = mel(np.arange(fft // 2) * rate / fft)
    weights = np.zeros((num_bins, fft // 2 + 1))
    for b in range(num_bins):
        left, center, right = edges[b : b + 3]
        up, down = (bin_mel - left) / (center - left), (right - bin_mel) / (right - center)
        weights[b, : fft // 2] = np.where((bin_mel > left) & (bin_mel < right), np.minimum(up, down), 0.0)
    return np.log(np.maximum(power @ weights.T, np.finfo(np.float32).eps))


def test_fbank_matches_a_reference_implementation(an4: Path) -> None:
    wav = next((an4 / "wav" / "an4_clstk").rglob("*.wav"))
    samples = read_waveform(str(wav), "utt", 16000)
    ours = compute_fbank(samples, CFG)
    reference = reference_fbank(samples)
    assert ours.shape == reference.shape == (1 + (len(samples) - 400) // 160, 40)
    assert np.abs(ours - reference).max() < 1e-3


def test_store_round_trip_and_kaldi_export(tmp_path: Path, monkeypatch) -> None:
    items = {"b": np.arange(12, dtype=np.float32).reshape(4, 3), "a": np.ones((2, 3), dtype=np.float32)}
    store = FeatureStore.from_arrays(items)
    assert store.utt_ids == ["a", "b"] and store.offsets.tolist() == [0, 2, 6]
    store.save(tmp_path / "store")
    loaded = FeatureStore.load(tmp_path / "store")
    np.testing.assert_array_equal(loaded["b"], items["b"])
    # the index's checksum (hashed while writing, an utterance at a time) is the one read back in blocks of any size
    recorded = json.loads((tmp_path / "store" / FeatureStore.INDEX).read_text())["checksum"]
    monkeypatch.setattr(FeatureStore, "CHECKSUM_ROWS", 5)
    assert recorded == loaded.checksum() == store.checksum()
    assert FeatureStore.from_arrays({**items, "a": items["a"] + 1}).checksum() != recorded
    store.write_kaldi(tmp_path / "feats.ark", tmp_path / "feats.scp")
    imported = FeatureStore.read_kaldi(tmp_path / "feats.scp")
    np.testing.assert_array_equal(imported.frames, store.frames)


def test_cmvn_zeroes_each_speakers_mean() -> None:
    rng = np.random.default_rng(0)
    items = {"s1-a": rng.normal(5, 1, (50, 4)), "s1-b": rng.normal(5, 1, (30, 4)), "s2-a": rng.normal(-3, 2, (40, 4))}
    apply_speaker_cmvn(items, {"s1-a": "s1", "s1-b": "s1", "s2-a": "s2"}, norm_vars=False)
    np.testing.assert_allclose(np.concatenate([items["s1-a"], items["s1-b"]]).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(items["s2-a"].mean(0), 0, atol=1e-5)


def test_unreadable_audio_is_dropped_with_its_reason(an4: Path, tmp_path: Path) -> None:
    wav = next((an4 / "wav" / "an4_clstk").rglob("*.wav"))
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000garbage")
    data = DataDir(
        wav_scp={"s-good": str(wav), "s-missing": str(tmp_path / "nope.wav"), "s-broken": str(tmp_path / "broken.wav")},
        text={"s-good": "A", "s-missing": "A", "s-broken": "A"},
        utt2spk={"s-good": "s", "s-missing": "s", "s-broken": "s"},
    )
    store, dropped = make_features(data, CFG, "fbank", tmp_path / "fbank")
    assert store.utt_ids == ["s-good"] and store.frames.dtype == np.float16
    assert set(dropped) == {"s-missing", "s-broken"}
    assert "utterance s-missing: unreadable audio" in dropped["s-missing"] and "No such file" in dropped["s-missing"]
    with pytest.raises(ValueError, match="sample rate 16000 .*features.sample_rate is 8000.*features.resample=true"):
        read_waveform(str(wav), "utt", 8000)
