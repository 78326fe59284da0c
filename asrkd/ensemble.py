"""Stage: the ensemble, ``ensemble.size`` DNNs identical but for the seed of their initial weights.

Members train one after another (``exp/dnn/<ensemble.name>/member-<i>``), each resumable;
member i is initialized with seed ``seed + 1 + i`` so none repeats the baseline.

Cross-fitted teachers (``ensemble.folds`` = K >= 2): the training speakers are dealt into K
folds and member i never sees fold i mod K. The soft targets of a training utterance then
come only from members that never saw its speaker (:mod:`asrkd.soft_targets`), so they carry
what the ensemble does on unseen voices rather than what it memorized; on test, as a system,
the ensemble still averages all members.
"""

from __future__ import annotations

from pathlib import Path

from asrkd.data import DataDir, speaker_folds
from asrkd.train import TrainingSet, train_stage


def member_dirs(cfg, name: str | None = None) -> list[Path]:
    return [Path(cfg.exp_dir) / "dnn" / (name or cfg.ensemble.name) / f"member-{i}" for i in range(cfg.ensemble.size)]


def held_out_speakers(cfg, training: TrainingSet) -> list[list[str]]:
    """Per member, the training speakers it must not see (empty lists without cross-fitting)."""
    folds = int(cfg.ensemble.folds)
    if folds == 0:
        return [[] for _ in range(cfg.ensemble.size)]
    full = DataDir.read(Path(cfg.data_dir) / "train")
    speakers = speaker_folds([full.utt2spk[u] for u in training.train_utts if u in full.utt2spk], folds, int(cfg.seed))
    return [speakers[i % folds] for i in range(cfg.ensemble.size)]


def run(cfg) -> None:
    """Stage (run_distill.sh): train every member that is not complete."""
    training = TrainingSet(cfg)
    full = DataDir.read(Path(cfg.data_dir) / "train")
    data = DataDir.read(Path(cfg.data_dir) / cfg.train.data)
    for i, (out_dir, held_out) in enumerate(zip(member_dirs(cfg), held_out_speakers(cfg, training))):
        hidden = set(held_out)
        member = training.without(lambda utt: full.utt2spk.get(data.source(utt)) in hidden) if hidden else training
        train_stage(cfg, f"train-ensemble {cfg.ensemble.name} member {i}", out_dir, member, keys=("ensemble.folds",),
                    values={"member": i, "held_out_speakers": held_out}, init_seed=cfg.seed + 1 + i)
