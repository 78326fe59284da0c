"""Stage: distilled students, same architecture and training recipe as a member.

``distill.students`` maps a soft-target form to the temperatures of the students trained on
it: ``dense`` (the stored fp16 averages) or ``topk`` (the compact form, to measure what it
costs); ``distill.seeds`` gives how many replicates of each form train (seed + 100 r). Their
loss is the paper's T^2 * CE(soft targets at T, softmax(z/T)) + hard_weight * CE(pdf-ids,
softmax(z)). With ``distill.logit_matching``, one more student matches the teacher's
zero-mean logits instead (§2.1, the objective's high-T limit).

The student trains on the labeled utterances of ``train.data`` and, with ``distill.transfer``,
on the frames of those data dirs too, with the soft term alone (no alignment needed: unlabeled
audio works). ``distill.epochs`` sets its epochs apart from the baseline's. Its soft targets
are the teacher's on the feature store that holds all those utterances (stage soft-targets).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd.distill import distillation_loss, logit_distillation_loss
from asrkd.soft_targets import SoftTargetStore, TeacherLogits, current_checksum, logits_dir, store_dir
from asrkd.train import TrainingSet, replicate_name, train_stage

LOGITS = "logits"  # the form name of the logit-matching student


class Student(NamedTuple):
    form: str  # dense | topk | logits
    temperature: float | None  # None: logit matching
    replicate: int


def student_name(teacher: str, temperature: float | None, form: str, data: str = "train", transfer: list[str] | tuple = (),
                 epochs: int | None = None, replicate: int = 0) -> str:
    """exp/dnn/student_<teacher>_T<T>_<form> (student_<teacher>_logits for logit matching),
    then _<data> when trained on other data than train, _via_<transfer> with a transfer set,
    _e<epochs> with its own epochs and _seed<r> for replicate r > 0."""
    name = f"student_{teacher}_{LOGITS}" if form == LOGITS else f"student_{teacher}_T{temperature:g}_{form}"
    name += "" if data == "train" else f"_{data}"
    name += f"_via_{'+'.join(transfer)}" if transfer else ""
    name += f"_e{epochs}" if epochs else ""
    return replicate_name(name, replicate)


def students(cfg) -> list[Student]:
    """Every student the config asks for, in training order (replicates after the first of each)."""
    seeds = cfg.distill.seeds
    out = [Student(form, float(t), 0) for form, temperatures in cfg.distill.students.items() for t in temperatures]
    out += [Student(LOGITS, None, 0)] if cfg.distill.logit_matching else []
    out += [Student(s.form, s.temperature, r) for s in list(out) for r in range(1, int(seeds.get(s.form, 1)))]
    return out


def student_cfg(cfg):
    """The training config of a student: train.epochs replaced by distill.epochs when set."""
    return OmegaConf.merge(cfg, {"train": {"epochs": cfg.distill.epochs}}) if cfg.distill.epochs else cfg


def dense_only(cfg, temperature: float, seeds: int, **distill):
    """A config whose students are ``seeds`` dense students at ``temperature`` alone (no top-k, no
    logit matching), with ``distill`` overrides: a lever's students, a subset run's."""
    merged = OmegaConf.merge(cfg, {"distill": {"temperatures": [temperature], "logit_matching": False, **distill}})
    merged.distill.students = {"dense": [temperature]}  # replaced, not merged: no top-k student
    merged.distill.seeds = {"dense": seeds}
    return merged


def name_of(cfg, student: Student) -> str:
    return student_name(cfg.distill.teacher, student.temperature, student.form, cfg.train.data, list(cfg.distill.transfer),
                        cfg.distill.epochs, student.replicate)


class StoreParts:
    """The soft targets (or teacher logits) of a training set's frames: a store per feature store
    the set spans, each at the frame where its part starts (``TrainingSet.parts``)."""

    def __init__(self, parts: list[tuple[int, SoftTargetStore | TeacherLogits]]):
        self.parts = [(start, start + store.header["num_frames"], store) for start, store in parts]

    def batch(self, indices: np.ndarray, *form: str) -> torch.Tensor:
        if len(self.parts) == 1 and self.parts[0][0] == 0:
            return self.parts[0][2].batch(indices, *form)
        out = None
        for start, end, store in self.parts:
            inside = (indices >= start) & (indices < end)
            if inside.any():
                rows = store.batch(indices[inside] - start, *form)
                out = torch.zeros(len(indices), rows.shape[1]) if out is None else out
                out[torch.from_numpy(inside)] = rows
        return out


def run(cfg) -> None:
    """Stage: every student of ``students(cfg)`` that is not complete."""
    dcfg = cfg.distill
    scfg = student_cfg(cfg)
    training = TrainingSet(scfg, list(dcfg.transfer))
    exp = Path(cfg.exp_dir)
    for student in students(cfg):
        name = name_of(cfg, student)
        form, temperature = student.form, student.temperature
        targets = {store: logits_dir(cfg, store) if form == LOGITS else store_dir(cfg, temperature, store) for store in training.stores}

        def loss(data, hard, form=form, temperature=temperature, targets=targets):
            def load(store: str):
                checksum = current_checksum(exp, store)
                if form == LOGITS:
                    return TeacherLogits.load(targets[store], checksum, data.num_pdfs)
                return SoftTargetStore.load(targets[store], checksum, temperature, data.num_pdfs)

            parts = StoreParts([(training.parts[store], load(store)) for store in training.stores])
            if form == LOGITS:
                return lambda logits, batch: logit_distillation_loss(
                    logits, parts.batch(batch.cpu().numpy()).to(logits.device), hard[batch], dcfg.soft_weight, dcfg.hard_weight)
            return lambda logits, batch: distillation_loss(
                logits, parts.batch(batch.cpu().numpy(), form).to(logits.device), hard[batch], temperature, dcfg.soft_weight, dcfg.hard_weight)

        inputs = {("soft targets" if i == 0 else f"soft targets {store}"): path for i, (store, path) in enumerate(targets.items())}
        train_stage(scfg, f"train-student {name}", exp / "dnn" / name, training, loss=loss,
                    keys=("distill.soft_weight", "distill.hard_weight"), inputs=inputs,
                    values={"teacher": dcfg.teacher, "form": form, "temperature": temperature, "transfer": list(dcfg.transfer)},
                    replicate=student.replicate)
