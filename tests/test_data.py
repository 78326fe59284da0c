from pathlib import Path

import pytest
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import DataDir, DataDirError, speaker_balanced_subset, split_by_speaker
from asrkd.layout import Layout


def make_data(num_speakers: int = 5, per_speaker: int = 10) -> DataDir:
    data = DataDir()
    for s in range(num_speakers):
        for u in range(per_speaker):
            utt = f"spk{s}-utt{u:02d}"
            data.wav_scp[utt], data.text[utt], data.utt2spk[utt] = f"/x/{utt}.wav", "HELLO WORLD", f"spk{s}"
    return data


def test_round_trip_writes_sorted_kaldi_files(tmp_path: Path) -> None:
    data = make_data()
    data.write(tmp_path)
    again = DataDir.read(tmp_path)
    assert again == data
    assert (tmp_path / "spk2utt").read_text().splitlines()[0].split()[:2] == ["spk0", "spk0-utt00"]


def test_validation_names_the_offending_entry(tmp_path: Path) -> None:
    data = make_data()
    data.text["spk0-utt03"] = "   "
    with pytest.raises(DataDirError, match="spk0-utt03.*empty transcript"):
        data.validate()
    data = make_data()
    data.utt2spk["spk0-utt03"] = "other"
    with pytest.raises(DataDirError, match="does not start with its speaker"):
        data.validate()
    data = make_data()
    del data.wav_scp["spk1-utt01"]
    with pytest.raises(DataDirError, match="wav.scp.*missing.*spk1-utt01"):
        data.validate()


def test_read_rejects_unsorted_files(tmp_path: Path) -> None:
    make_data().write(tmp_path)
    lines = (tmp_path / "text").read_text().splitlines()
    (tmp_path / "text").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(DataDirError, match="text: not sorted"):
        DataDir.read(tmp_path)


def test_subset_is_deterministic_and_speaker_balanced() -> None:
    data = make_data(num_speakers=20, per_speaker=10)
    subset = speaker_balanced_subset(data, 0.05, seed=1)
    assert subset == speaker_balanced_subset(data, 0.05, seed=1)
    assert subset != speaker_balanced_subset(data, 0.05, seed=2)
    assert len(subset) == 10
    speakers = [data.utt2spk[u] for u in subset]
    assert len(set(speakers)) == 10  # no speaker gives two before all have given one
    subset = speaker_balanced_subset(data, 0.3, seed=1)
    counts = {s: sum(data.utt2spk[u] == s for u in subset) for s in data.spk2utt}
    assert set(counts.values()) == {3}


def test_validation_split_holds_out_whole_speakers() -> None:
    data = make_data(num_speakers=10)
    train, valid = split_by_speaker(data, 0.2, seed=0)
    assert {data.utt2spk[u] for u in train}.isdisjoint({data.utt2spk[u] for u in valid})
    assert len(valid) == 20 and len(train) + len(valid) == len(data.utt2spk)


def test_the_layout_names_each_stage_output_as_kaldi_would() -> None:
    layout = Layout(Path("exp"), Path("data"))
    assert layout.alignment("train_sp") == Path("exp/tri/ali_train_sp")
    assert layout.pdf_counts == Path("exp/tri/ali_train/pdf_counts.npy")
    assert layout.model("student_T2@best") == Path("exp/dnn/student_T2")  # a system's checkpoint choice is no directory
    assert layout.export("ensemble/member-0") == Path("exp/export/ensemble_member-0")
    assert layout.lang == Path("data/lang")
    assert sections.layout(OmegaConf.create({"exp_dir": "x/exp", "data_dir": "x/data"})).fbank("test") == Path("x/exp/feats/fbank/test")
