"""Stage: distilled students, same architecture and training recipe as a member.

``distill.students`` maps a soft-target form to the temperatures of the students trained on
it: ``dense`` (the stored fp16 averages), ``topk`` (the k largest renormalized, to measure what
dropping the rest costs), ``compact`` or ``compact_prior`` (the k' largest with the rest spread
evenly or by the pdf priors: the forms for a scale where dense does not fit;
:class:`asrkd.distill.soft_targets.TargetRows`); ``distill.seeds`` gives how many replicates of each form train (seed + 100 r). Their
loss is the paper's T^2 * CE(soft targets at T, softmax(z/T)) + hard_weight * CE(pdf-ids,
softmax(z)), or with ``distill.loss`` another registered soft term in CE's place, on any form
(``reverse_kl``: :mod:`asrkd.distill.losses`; its students are named ``..._<loss>``). With
``distill.logit_matching``, one more student matches the teacher's zero-mean logits instead
(§2.1, the objective's high-T limit).

The student trains on the labeled utterances of ``train.data`` and, with ``distill.transfer``,
on the frames of those data dirs too, with the soft term alone (no alignment needed: unlabeled
audio works). ``distill.epochs`` sets its epochs apart from the baseline's. Its soft targets
are the teacher's on the feature store that holds all those utterances (stage soft-targets),
held on the training device, or with ``distill.on_the_fly`` the teacher's own outputs
computed in each step (no store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from asrkd import sections
from asrkd.distill.forms import LOGITS, TargetForm, form_of
from asrkd.distill.losses import DEFAULT_SOFT_TERM, distillation_loss, logit_distillation_loss, soft_term_of
from asrkd.distill.soft_targets import current_checksum, load_teacher, teacher_groups
from asrkd.distill.target_store import TargetRows
from asrkd.layout import Layout, System
from asrkd.nnet.checkpoints import system_dirs
from asrkd.nnet.model import StackedDNN, average_softmax, average_zero_mean_logits
from asrkd.nnet.train import Model, replicate_name, train_stage
from asrkd.nnet.training_set import TrainingSet


class Student(NamedTuple):
    form: str  # a registered target form (asrkd.distill.forms): dense | topk | compact | compact_prior | logits | ...
    temperature: float | None  # None: logit matching
    replicate: int


def student_name(teacher: str, temperature: float | None, form: str, data: str = "train", transfer: list[str] | tuple = (),
                 epochs: int | None = None, replicate: int = 0, loss: str = DEFAULT_SOFT_TERM) -> str:
    """exp/dnn/student_<teacher>_T<T>_<form> (student_<teacher>_logits for logit matching),
    then _<loss> with another soft term than the paper's cross-entropy, _<data> when trained on
    other data than train, _via_<transfer> with a transfer set, _e<epochs> with its own epochs and
    _seed<r> for replicate r > 0."""
    name = f"student_{teacher}_{LOGITS}" if form == LOGITS else f"student_{teacher}_T{temperature:g}_{form}"
    name += "" if loss == DEFAULT_SOFT_TERM or form == LOGITS else f"_{loss}"
    name += "" if data == "train" else f"_{data}"
    name += f"_via_{'+'.join(transfer)}" if transfer else ""
    name += f"_e{epochs}" if epochs else ""
    return replicate_name(name, replicate)


def students(dcfg) -> list[Student]:
    """Every student the ``distill`` section asks for, in training order (replicates after the first of each)."""
    seeds = dcfg.seeds
    out = [Student(form, float(t), 0) for form, temperatures in dcfg.students.items() for t in temperatures]
    out += [Student(LOGITS, None, 0)] if dcfg.logit_matching else []
    out += [Student(s.form, s.temperature, r) for s in list(out) for r in range(1, int(seeds.get(s.form, 1)))]
    return out


def name_of(dcfg, data: str, student: Student) -> str:
    """exp/dnn/<name> of ``student`` as the ``distill`` section trains it on ``data`` (``train.data``)."""
    return student_name(dcfg.teacher, student.temperature, student.form, str(data), list(dcfg.transfer), dcfg.epochs, student.replicate,
                        str(dcfg.loss))


def student_system(dcfg, data: str, student: Student) -> System:
    """The spec of ``student`` as the ``distill`` section trains it on ``data``: its name (:func:`name_of`) and what the name encodes."""
    return System(name_of(dcfg, data, student), "student", teacher=str(dcfg.teacher), form=student.form, temperature=student.temperature,
                  data=str(data), seed=student.replicate)


def student_systems(dcfg, data: str) -> list[System]:
    """Every student train-student makes with the ``distill`` section on ``data`` (``train.data``), in training order."""
    return [student_system(dcfg, data, student) for student in students(dcfg)]


class StoreParts:
    """The soft targets (or teacher logits) of a training set's frames, resident on the training
    device: a store per feature store the set spans, each at the frame where its part starts
    (``TrainingSet.parts``); ``batch`` gathers a batch's rows there."""

    def __init__(self, parts: list[tuple[int, TargetRows]]):
        self.parts = [(start, start + rows.num_frames, rows) for start, rows in parts]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1 and self.parts[0][0] == 0:
            return self.parts[0][2].batch(indices)
        out = torch.zeros(len(indices), self.parts[0][2].num_pdfs, device=indices.device)
        for start, end, rows in self.parts:
            inside = (indices >= start) & (indices < end)
            out[inside] = rows.batch(indices[inside] - start)
        return out


class TeacherOnTheFly:
    """The teacher's targets computed inside the student's step (``distill.on_the_fly``) instead of
    read from a store: its models stacked (one batched matmul per layer), each frame averaged
    over the members allowed to score it (a cross-fitted teacher's ``teacher_groups``). At the
    paper's scale a dense store would be frames x pdfs; this costs a teacher forward per step."""

    def __init__(self, members: list, frames, group_of: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        """``members``: the teacher's models; ``group_of`` (frames,) and ``weights`` (groups, members):
        which members average for each frame (default: all, equally)."""
        device = frames.device
        self.net = (StackedDNN(members) if len(members) > 1 else members[0]).eval().requires_grad_(False)
        self.frames = frames
        self.group_of = torch.zeros(frames.store.num_frames, dtype=torch.long, device=device) if group_of is None else group_of
        self.weights = torch.full((1, len(members)), 1.0 / len(members), device=device) if weights is None else weights

    @classmethod
    def of_system(cls, layout: Layout, teacher: str, data) -> "TeacherOnTheFly":
        """``teacher`` (``distill.teacher``: an ensemble's members or one DNN) over ``data``'s frames,
        with a cross-fitted teacher's members restricted as its soft-target store would be."""
        device = data.pdf_ids.device
        members = list(load_teacher(layout.exp, teacher, device).members)
        store = data.frames.store
        groups = teacher_groups(layout.data, store.utt_ids, store.offsets, system_dirs(layout.exp, teacher))
        group_of = torch.zeros(store.num_frames, dtype=torch.long)
        weights = torch.zeros(len(groups), len(members))
        for g, (indices, chosen) in enumerate(groups):
            group_of[torch.from_numpy(indices)] = g
            weights[g, chosen] = 1.0 / len(chosen)
        return cls(members, data.frames, group_of.to(device), weights.to(device))

    @torch.no_grad()
    def member_logits(self, indices: torch.Tensor, inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(members, B, pdfs) logits of the batch (its frames' windows, or ``inputs``: the view the
        student sees) and (members, B) averaging weights."""
        logits = self.net(self.frames.context(indices) if inputs is None else inputs).float()
        return (logits if logits.dim() == 3 else logits[None]), self.weights[self.group_of[indices]].t()

    def soft_targets(self, indices: torch.Tensor, temperature: float, inputs: torch.Tensor | None = None) -> torch.Tensor:
        logits, weights = self.member_logits(indices, inputs)
        return average_softmax(logits, temperature, weights)

    def zero_mean_logits(self, indices: torch.Tensor) -> torch.Tensor:
        logits, weights = self.member_logits(indices)
        return average_zero_mean_logits(logits, weights)


def target_source(cfg, student: Student, training: TrainingSet) -> tuple[Callable, dict[str, Path]]:
    """What gives a student its targets per batch, and the inputs its fingerprint records: the
    stores of its form (loaded onto the device once), or the teacher itself on the fly."""
    dcfg, exp = cfg.distill, Path(cfg.exp_dir)
    form, temperature = form_of(cfg.distill, student.form), student.temperature
    if dcfg.on_the_fly:
        if form.on_the_fly is None:
            raise ValueError(f"distill.on_the_fly computes dense targets (or logits), not the {form.name} form; "
                             f"train the {form.name} student from its store (distill.on_the_fly=false)")

        def make(data):
            return form.on_the_fly(TeacherOnTheFly.of_system(sections.layout(cfg), str(dcfg.teacher), data), temperature)

        return make, {f"teacher {d.name}": d for d in system_dirs(exp, dcfg.teacher)}
    targets = {store: form.store(cfg, temperature, store) for store in training.stores}

    def make(data):
        def load(store: str) -> TargetRows:
            return form.rows(cfg, targets[store], current_checksum(exp, store), temperature, data.num_pdfs, data.pdf_ids.device)

        return StoreParts([(training.parts[store], load(store)) for store in training.stores]).batch

    return make, {("soft targets" if i == 0 else f"soft targets {store}"): path for i, (store, path) in enumerate(targets.items())}


def batch_loss_of(dcfg, form: TargetForm, temperature: float | None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(student logits, the batch's targets in ``form``, its pdf-ids) -> the loss: the soft term
    ``distill.loss`` names on probabilities of any form, stored or on the fly; logit matching on
    the teacher's logits (the logits form: T -> inf, no soft term to choose)."""
    if form.logits:
        return lambda logits, targets, hard: logit_distillation_loss(logits, targets, hard, dcfg.soft_weight, dcfg.hard_weight)
    term = soft_term_of(str(dcfg.loss))
    return lambda logits, targets, hard: distillation_loss(logits, targets, hard, temperature, dcfg.soft_weight, dcfg.hard_weight, term)


def run(cfg) -> None:
    """Stage: every student of :func:`students` that is not complete."""
    dcfg = cfg.distill
    training = TrainingSet(cfg, list(dcfg.transfer))
    layout = sections.layout(cfg)
    for student in students(dcfg):
        name = name_of(dcfg, cfg.train.data, student)
        form = form_of(cfg.distill, student.form)
        make_targets, inputs = target_source(cfg, student, training)

        def loss(data, hard, batch_loss=batch_loss_of(dcfg, form, student.temperature), make_targets=make_targets):
            targets = make_targets(data)
            return lambda logits, batch: batch_loss(logits, targets(batch), hard[batch])

        values = {"teacher": dcfg.teacher, "form": student.form, "temperature": student.temperature, "transfer": list(dcfg.transfer)}
        values |= {"on_the_fly": True} if dcfg.on_the_fly else {}
        values |= {"loss": str(dcfg.loss)} if str(dcfg.loss) != DEFAULT_SOFT_TERM and not form.logits else {}
        values |= form.values(cfg)
        train_stage(cfg, [Model(f"train-student {name}", layout.model(name), student.replicate, values=values)], training, loss=loss,
                    keys=("distill.soft_weight", "distill.hard_weight"), inputs=inputs, epochs=dcfg.epochs or None)
