"""Stages 6-10 of run_distill.sh: what moves the share of the ensemble's gain a student keeps.

On AN4 the teacher has memorized its own training frames (the ensemble scores ~81% on them
and ~58% on test), so its soft targets there say little more than the labels. Each lever
trains students at the temperature chosen on validation (:func:`chosen_temperature`),
``levers.seeds`` seeds each (null: ``distill.seeds.dense``), and names the baseline it must beat, trained on the same
data, so that no lever wins by a weaker comparison:

* ``train``: the reference, the students of stage 3 on ``train``, against the baseline;
* ``train_sp`` (``levers.speed_perturbed``): students on the speed-perturbed copies
  ``train_sp`` (the ensemble's soft targets there), against a baseline trained on
  ``train_sp`` with hard labels;
* ``epochs <E>`` (``levers.student_epochs``): students trained for E epochs, against a
  baseline trained for E epochs too (``<name>_e<E>``: longer training alone is not credited to
  the soft targets);
* ``cross-fitted`` (``levers.cross_fitted``, the dearest, so trained last): a second ensemble
  whose members never see one fold of the training speakers; each utterance's soft targets
  come from the members that never saw its speaker; against the baseline.

Every lever's gain kept is measured against the same ensemble (``distill.teacher``, trained
on ``train``) and its own same-data baseline; the report is :mod:`asrkd.experiments.distillation.experiment`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import OmegaConf

from asrkd.distill import soft_targets, student
from asrkd.distill.student import student_systems
from asrkd.experiments.base import Experiment, dense_only
from asrkd.layout import Layout, System, names
from asrkd.nnet import ensemble
from asrkd.nnet import train as train_dnn
from asrkd.nnet.checkpoints import read_history
from asrkd.nnet.train import replicate_systems, replicates
from asrkd.schema import ConfigTypes, INTEGER, Kind


class Lever(NamedTuple):
    name: str
    description: str
    students: list[str]  # exp/dnn systems: the student's replicates
    baselines: list[str]  # the same-data baseline's replicates
    teacher: str  # the ensemble whose soft targets the student learned from
    student_cfg: object  # the config that trains the students
    baseline_cfg: object | None  # the config that trains the baseline (None: the main recipe's)


def dense_seeds(dcfg) -> int:
    """Replicates of each dense student of stage 3, and of the baseline (stage 0)."""
    return int(dcfg.seeds.get("dense", 1))


def baseline_systems(tcfg, dcfg) -> list[System]:
    """The baseline's replicates run_distill.sh stage 0 trains (``train.seeds=${distill.seeds.dense}``)."""
    return replicate_systems(OmegaConf.merge(tcfg, {"seeds": dense_seeds(dcfg)}))


def baseline_replicates(tcfg, dcfg) -> list[str]:
    """The names of the baseline's replicates (``train`` and ``distill`` sections)."""
    return names(baseline_systems(tcfg, dcfg))


def dense_students(dcfg, tcfg) -> dict[float, list[str]]:
    """T -> the dense students' replicates of the main sweep (stage 3)."""
    out: dict[float, list[str]] = {}
    for spec in student_systems(dcfg, tcfg.data):
        if spec.form == "dense":
            out.setdefault(spec.temperature, []).append(spec.name)
    return out


def validation_accuracy(exp: Path, systems: list[str]) -> float:
    """The mean over replicates of the last epoch's validation frame accuracy."""
    return float(np.mean([read_history(Layout(exp).model(s))[-1]["valid_frame_accuracy"] for s in systems]))


def chosen_temperature(exp_dir, dcfg, tcfg) -> float:
    """The T whose dense students have the best validation frame accuracy, averaged over their seeds."""
    exp = Path(exp_dir)
    by_t = {t: validation_accuracy(exp, systems) for t, systems in dense_students(dcfg, tcfg).items()}
    return max(by_t, key=by_t.get)


def lever_seeds(lcfg, dcfg) -> int:
    """Replicates of each lever's students and same-data baseline: ``levers.seeds``, else the dense students'."""
    seeds = lcfg.get("seeds")
    return dense_seeds(dcfg) if seeds is None else int(seeds)


def levers(cfg, temperature: float | None = None) -> list[Lever]:
    """Every lever the config asks for, with its systems (trained or not), named by the same
    functions that train them (:func:`asrkd.distill.student.student_systems`, :func:`asrkd.nnet.train.replicates`)."""
    t = chosen_temperature(cfg.exp_dir, cfg.distill, cfg.train) if temperature is None else temperature
    seeds, baselines = lever_seeds(cfg.levers, cfg.distill), baseline_replicates(cfg.train, cfg.distill)
    reference = dense_only(cfg, t, dense_seeds(cfg.distill))  # stage 3's students at T
    out = [Lever("train", "students on train (stage 3)", names(student_systems(reference.distill, reference.train.data)), baselines, cfg.distill.teacher, reference, None)]
    if cfg.levers.speed_perturbed:
        sp = f"{cfg.perturb.source}_sp"
        student_cfg = OmegaConf.merge(dense_only(cfg, t, seeds), {"train": {"data": sp}})
        baseline_cfg = OmegaConf.merge(cfg, {"train": {"data": sp, "name": f"{cfg.train.name}_sp", "seeds": seeds}})
        out.append(Lever(sp, f"students and baseline on {sp} (speeds {', '.join(f'{s:g}' for s in cfg.perturb.speeds)})",
                         names(student_systems(student_cfg.distill, student_cfg.train.data)), replicates(baseline_cfg.train), cfg.distill.teacher, student_cfg, baseline_cfg))
    for epochs in cfg.levers.student_epochs:
        student_cfg = dense_only(cfg, t, seeds, epochs=int(epochs))
        baseline_cfg = OmegaConf.merge(cfg, {"train": {"epochs": int(epochs), "name": f"{cfg.train.name}_e{epochs}", "seeds": seeds}})
        out.append(Lever(f"epochs {epochs}", f"students and baseline trained {epochs} epochs (the main baseline: {cfg.train.epochs})",
                         names(student_systems(student_cfg.distill, student_cfg.train.data)), replicates(baseline_cfg.train), cfg.distill.teacher, student_cfg, baseline_cfg))
    if cfg.levers.cross_fitted:
        xfit = cfg.levers.cross_fitted
        student_cfg = OmegaConf.merge(dense_only(cfg, t, seeds, teacher=xfit.name), {"ensemble": {"name": xfit.name, "folds": xfit.folds}})
        out.append(Lever("cross-fitted", f"soft targets from {xfit.folds}-fold cross-fitted members ({xfit.name})",
                         names(student_systems(student_cfg.distill, student_cfg.train.data)), baselines, xfit.name, student_cfg, None))
    return out


def train(cfg) -> None:
    """Stage 8: every lever's baseline, teacher, soft targets and students that are not complete."""
    for lever in levers(cfg)[1:]:
        if lever.baseline_cfg is not None:
            train_dnn.run(lever.baseline_cfg)
        if lever.teacher != cfg.distill.teacher:
            ensemble.run(lever.student_cfg)
        soft_targets.run(lever.student_cfg)
        student.run(lever.student_cfg)


def systems(cfg) -> list[System]:
    """Stage 9 decodes every lever's students, baselines and teacher (the distillation report scores them)."""
    out = []
    for lever in levers(cfg)[1:]:
        out += student_systems(lever.student_cfg.distill, lever.student_cfg.train.data)
        out += replicate_systems(lever.baseline_cfg.train) if lever.baseline_cfg is not None else baseline_systems(cfg.train, cfg.distill)
        out.append(System(lever.teacher, "teacher"))
    return out


# the types of levers.* that its defaults (levers.yaml) do not show
CONFIG_TYPES = ConfigTypes({"levers.cross_fitted": Kind((dict,), nullable=True), "levers.seeds": Kind((int,), nullable=True),
                            "levers.student_epochs": Kind((list,), item=INTEGER)})

EXPERIMENT = Experiment("levers", "levers", systems, train=train, config=CONFIG_TYPES)
