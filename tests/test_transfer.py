"""Transfer sets: speed-perturbed copies, cross-fitted teachers, unlabeled audio."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asrkd import sections
from asrkd.nnet import ensemble
from asrkd.nnet.checkpoints import load_model
from asrkd.nnet.training_set import FrameData, TrainingSet

from asrkd.kaldi import features, gmm, perturb

from asrkd.data import DataDir
from asrkd.distill import soft_targets, student
from asrkd.distill.losses import hard_term
from asrkd.distill.soft_targets import current_checksum
from asrkd.distill.target_store import SoftTargetStore, store_dir
from asrkd.stage import read_record

from conftest import tiny_config
from .test_reliability import clone


def test_change_speed_scales_duration_and_pitch() -> None:
    rate, frequency = 16000, 500.0
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * frequency * t)
    for factor in (0.9, 1.1):
        out = perturb.change_speed(tone, factor)
        assert abs(len(out) - rate / factor) <= 1
        spectrum = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(len(out) - 2000)))
        peak = np.argmax(spectrum) * rate / (len(out) - 2000)
        assert abs(peak - frequency * factor) < 3  # sox speed: the pitch moves with the speed


def test_speed_perturbed_data_dir_features_alignment_and_split(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root)
    perturb.run(cfg)
    train_data, sp = DataDir.read(root / "data" / "train"), DataDir.read(root / "data" / "train_sp")
    assert len(sp.utt_ids) == 3 * len(train_data.utt_ids)
    utt = train_data.utt_ids[0]
    assert sp.utt2uniq[f"sp0.9-{utt}"] == utt and sp.utt2spk[f"sp1.1-{utt}"] == f"sp1.1-{train_data.utt2spk[utt]}"
    assert sp.text[f"sp0.9-{utt}"] == train_data.text[utt]
    original = sf.info(train_data.wav_scp[utt]).frames
    assert abs(sf.info(sp.wav_scp[f"sp0.9-{utt}"]).frames - original / 0.9) <= 1
    subset = DataDir.read(root / "data" / "train_10pct_sp")
    assert {subset.source(u) for u in subset.utt_ids} == set(DataDir.read(root / "data" / "train_10pct").utt_ids)
    sp_cfg = tiny_config(root, "features.sets=[train_sp]", "train.data=train_sp")
    features.run(sp_cfg)
    gmm.run_align(sp_cfg)
    ali = json.loads((root / "exp" / "tri" / "ali_train_sp" / "index.json").read_text())
    assert ali["aligned_utterances"] >= 0.9 * ali["utterances"]
    train_utts, valid_utts = sections.split(sp_cfg).utterances()
    valid_speakers = {train_data.utt2spk[u] for u in valid_utts}
    assert not {train_data.utt2spk[sp.source(u)] for u in train_utts} & valid_speakers  # copies of validation voices stay out
    assert len(train_utts) == 3 * len(sections.split(cfg).utterances()[0])
    assert TrainingSet(sp_cfg).stores == ["train_sp"]  # one store holds train_sp and the validation utterances


def test_cross_fitted_soft_targets_come_from_members_that_never_saw_the_speaker(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, "train.epochs=1", "ensemble.name=xfit", "ensemble.size=2", "ensemble.folds=2", "distill.teacher=xfit",
                      "distill.temperatures=[2]", "distill.logit_matching=false")
    ensemble.run(cfg)
    held_out = [set(read_record(root / "exp" / "dnn" / "xfit" / f"member-{i}")["config"]["held_out_speakers"]) for i in range(2)]
    assert held_out[0] and held_out[1] and not held_out[0] & held_out[1]
    soft_targets.run(cfg)
    store = SoftTargetStore.load(store_dir(sections.layout(cfg), cfg.distill.teacher, 2.0), current_checksum(root / "exp", "train"))
    data = FrameData.load(root / "exp", "train", cfg.model, torch.device("cpu"))
    full = DataDir.read(root / "data" / "train")
    _, valid = sections.split(cfg).utterances()
    members = [load_model(root / "exp" / "dnn" / "xfit" / f"member-{i}" / "final.pt", torch.device("cpu")).eval() for i in range(2)]
    for utt in (u for u in full.utt_ids[::7]):
        frames = torch.from_numpy(data.indices([utt]))
        with torch.no_grad():
            probs = [torch.softmax(m(data.frames.context(frames)) / 2.0, -1).numpy() for m in members]
        speaker = full.utt2spk[utt]
        expected = probs[0] if speaker in held_out[0] else probs[1] if speaker in held_out[1] else (probs[0] + probs[1]) / 2
        assert utt in valid or speaker in held_out[0] | held_out[1]
        np.testing.assert_allclose(np.asarray(store.dense[frames.numpy()], dtype=np.float32), expected, atol=2e-3)


def test_hard_term_is_masked_where_frames_have_no_alignment() -> None:
    logits = torch.randn(6, 5)
    targets = torch.tensor([1, -1, 3, -1, 0, 2])
    labeled = targets >= 0
    expected = 0.5 * torch.nn.functional.cross_entropy(logits[labeled], targets[labeled])
    torch.testing.assert_close(hard_term(logits, targets, 0.5), expected)
    assert float(hard_term(logits, torch.full((6,), -1), 0.5)) == 0.0


def test_unlabeled_audio_is_a_transfer_set(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    train_data = DataDir.read(root / "data" / "train")
    _, valid = sections.split(tiny_config(root)).utterances()
    source = [u for u in train_data.utt_ids if u not in set(valid)][:6]
    unlabeled = DataDir()  # audio alone: no transcript, no alignment (here copies of training audio under new ids)
    for i, utt in enumerate(source):
        new = f"extra-{i:02d}"
        shutil.copyfile(train_data.wav_scp[utt], tmp_path / f"{new}.wav")
        unlabeled.wav_scp[new], unlabeled.utt2spk[new] = str(tmp_path / f"{new}.wav"), "extra"
    unlabeled.write(root / "data" / "extra")
    assert not (root / "data" / "extra" / "text").exists() and DataDir.read(root / "data" / "extra").utt_ids == unlabeled.utt_ids
    features.run(tiny_config(root, "features.sets=[extra]"))
    cfg = tiny_config(root, "distill.teacher=baseline", "distill.temperatures=[2]", "distill.students.dense=[2]", "distill.students.topk=[]",
                      "distill.logit_matching=false", "distill.seeds.dense=1", "distill.transfer=[extra]", "train.epochs=1")
    training = TrainingSet(cfg, ["extra"])
    assert training.stores == ["train", "extra"]
    data, train_idx, _, hard = training.load()
    extra = np.arange(training.parts["extra"], data.frames.store.num_frames)
    assert np.isin(extra, train_idx).all() and (hard[torch.from_numpy(extra)] == -1).all()  # soft term only
    soft_targets.run(cfg)
    student.run(cfg)
    name = "student_baseline_T2_dense_via_extra"
    record = read_record(root / "exp" / "dnn" / name)
    assert record["config"]["transfer"] == ["extra"] and "soft targets extra" in record["inputs"]
    assert len(json.loads((root / "exp" / "dnn" / name / "history.json").read_text())) == 1
