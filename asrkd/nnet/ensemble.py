"""Stage: the ensemble, ``ensemble.size`` DNNs identical but for the seed of their initial weights.

Members (``exp/dnn/<ensemble.name>/member-<i>``) train one after another, or with
``ensemble.fused`` all in one step as stacked weights (:class:`asrkd.nnet.model.StackedDNN`), on the
same frame order either way; member i is initialized with seed ``seed + 1 + i`` so none
repeats the baseline (``ensemble.first_seed + i`` for a second ensemble: :func:`member_seeds`). Fused, they differ from sequential members only in dropout's masks
(one random stream for the stack) and float summation order.

Cross-fitted teachers (``ensemble.folds`` = K >= 2): the training speakers are dealt into K
folds and member i never sees fold i mod K. The soft targets of a training utterance then
come only from members that never saw its speaker (:mod:`asrkd.distill.soft_targets`), so they carry
what the ensemble does on unseen voices rather than what it memorized; on test, as a system,
the ensemble still averages all members.
"""

from __future__ import annotations

import logging
from pathlib import Path

from asrkd import sections
from asrkd.data import DataDir, speaker_folds
from asrkd.layout import Layout
from asrkd.nnet.train import Model, train_stage
from asrkd.nnet.training_set import TrainingSet
from asrkd.parallel import pick_device

log = logging.getLogger(__name__)


def member_dirs(layout: Layout, name: str, size: int) -> list[Path]:
    """exp/dnn/<name>/member-<i>: the ``size`` members of ensemble ``name``."""
    return [layout.model(name) / f"member-{i}" for i in range(int(size))]


def member_seeds(options, seed: int) -> list[int]:
    """The seed of each member's initial weights (``options``: the ``ensemble`` section):
    ``ensemble.first_seed + i``, or ``seed + 1 + i`` (a second ensemble from other draws needs
    other seeds, the validation split staying as it is)."""
    first = int(seed) + 1 if options.first_seed is None else int(options.first_seed)
    return [first + i for i in range(int(options.size))]


def held_out_speakers(options, seed: int, full: DataDir, training: TrainingSet) -> list[list[str]]:
    """Per member, the training speakers it must not see (empty lists without cross-fitting;
    ``options``: the ``ensemble`` section; ``full``: the train data dir)."""
    folds = int(options.folds)
    if folds == 0:
        return [[] for _ in range(options.size)]
    speakers = speaker_folds([full.utt2spk[u] for u in training.train_utts if u in full.utt2spk], folds, int(seed))
    return [speakers[i % folds] for i in range(options.size)]


def fused(options, device: str) -> bool:
    """``ensemble.fused`` (``options``: the ``ensemble`` section): true, false, or auto (fused on a
    GPU, ``device`` being ``train.device``; one after another on CPU, where the fused step is no
    faster: results/bench/train_throughput_cpu.json). Cross-fitted members train on different
    frames, so they never fuse."""
    setting = str(options.fused).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"ensemble.fused must be auto, true or false, got {options.fused!r}")
    if int(options.folds):
        if setting == "true":
            log.warning("ensemble.folds=%s: cross-fitted members see different frames and train one after another", options.folds)
        return False
    if setting == "auto":
        return pick_device(device).type == "cuda"
    return setting == "true"


def run(cfg) -> None:
    """Stage (run_distill.sh): train every member that is not complete, fused or one after another."""
    training, layout, options = TrainingSet(cfg), sections.layout(cfg), cfg.ensemble
    full = DataDir.read(layout.data_dir("train"))
    data = DataDir.read(layout.data_dir(str(cfg.train.data)))
    members = zip(member_dirs(layout, options.name, options.size), held_out_speakers(options, cfg.seed, full, training),
                  member_seeds(options, cfg.seed))
    models = []
    for i, (out_dir, held_out, seed) in enumerate(members):
        hidden = set(held_out)
        model = Model(f"train-ensemble {cfg.ensemble.name} member {i}", out_dir, init_seed=seed,
                      values={"member": i, "held_out_speakers": held_out})
        if hidden:
            member = training.without(lambda utt: full.utt2spk.get(data.source(utt)) in hidden)
            train_stage(cfg, [model], member, keys=("ensemble.folds",))
        else:
            models.append(model)
    if models:
        train_stage(cfg, models, training, keys=("ensemble.folds",), fused=fused(options, cfg.train.device))
