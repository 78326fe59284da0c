"""Distillation as function matching (run_function_matching.sh): the student sees what the teacher
sees, for long enough, against baselines that see the same.

Beyer et al. (CVPR 2022): a student matched to its teacher on the very views it trains on
(teacher run on the fly, mixup widening the inputs' support) and trained far longer than
usual matches the teacher; Stanton et al. (NeurIPS 2021): the data a student is matched on
decides how far it agrees with its teacher. Each row here trains one model of the baseline's
architecture (``model.*``) on ``train``:

* ``hard``: the control, cross-entropy on the pdf-ids of the same views (labels mixed under
  mixup), the same epochs, the same learning-rate schedule and the same checkpoint rule
  (``final.pt``) as the students it is compared with;
* ``consistent``: T^2 CE(teacher's softmax(v/T) on the student's own view, softmax(z/T)) +
  hard_weight * the view's CE, the teacher (``distill.teacher``) run on the fly; on the clean
  view (no augmentation) the teacher's outputs on the student's frames are its stored soft
  targets, read instead of recomputed (a 4x512 student then trains as fast as its control);
* ``precomputed``: the same with the stored soft targets of the clean frames (the paper's
  setting; mixed like the inputs under mixup): what consistency adds (trained only when the
  headline view changes the frames).

A row is a view (``function_matching.views``: asrkd.nnet.views), a schedule (a multiple m of
``train.epochs``; the learning rate decays by ``train.lr_decay^(1/m)`` per epoch, so every
schedule ends at the same rate) and a kind. The runs: every view of ``ablation`` at 1x (one
seed); with ``subset``, its view (``subset.view``; null: the headline's) on that share of train
(``seeds`` seeds; the 100% teacher, the gap to the 100% model closed: with 3% of the frames the
views widen what the student is matched on, where on all of them the clean frames lead); the ``headline`` view at every schedule (one seed,
the patience curve, which stops at a validation plateau: ``plateau``); the precomputed student at
the headline view and schedule; the headline view and schedule with ``seeds`` seeds (the headline
rows). With ``teachers`` (other ensembles of the same recipe, other member seeds), the headline's
student is also trained from each of them (``seeds`` seeds, against the same controls): a
teacher is a draw too, and the headline's gain kept then draws the teachers with the speakers
and seeds. Rows share models where they
coincide. The headline view is chosen on the validation accuracy of the ablation's students
(the report says when another view is ahead).

The report scores every complete row (runs take hours on CPU; the stages resume): frame
accuracy with speaker-level intervals (``stats.unit=speaker``: the test set has 10 speakers,
whose utterances are not independent), each student minus its control, the share of the
teacher's gain over the control it keeps, and its fidelity to the teacher on test frames:
top-1 agreement and mean KL(teacher || student).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.distill import soft_targets
from asrkd.distill.losses import soft_cross_entropy
from asrkd.distill.student import Student, TeacherOnTheFly, target_source
from asrkd.errors import StageLocked
from asrkd.experiments.base import Experiment
from asrkd.experiments.function_matching.report import report
from asrkd.experiments.function_matching.runs import KINDS, beyond_plateau, curve_stop, plateau_pending, run_cfg, run_name, runs, teacher_cfg, view_spec
from asrkd.layout import Layout, System
from asrkd.nnet import ensemble
from asrkd.nnet.checkpoints import system_dirs
from asrkd.nnet.train import Model, train_stage
from asrkd.nnet.training_set import TrainingSet
from asrkd.nnet.views import View
from asrkd.schema import ConfigTypes, Kind, NONNEGATIVE, POSITIVE, SHARE

log = logging.getLogger(__name__)


def view_loss(dcfg, logits: torch.Tensor, soft_targets: torch.Tensor, hard: torch.Tensor, view: View, temperature: float) -> torch.Tensor:
    """The paper's objective on a view: soft_weight T^2 CE(soft targets, softmax(z/T)) + hard_weight x the view's CE."""
    return (dcfg.soft_weight * temperature**2 * soft_cross_entropy(logits, soft_targets, temperature)
            + view.hard_cross_entropy(logits, hard, dcfg.hard_weight))


def consistent_loss(cfg, temperature: float):
    """The student's loss with the teacher run on the student's own view of each batch."""

    def make(data, hard):
        teacher = TeacherOnTheFly.of_system(sections.layout(cfg), str(cfg.distill.teacher), data)

        def loss(logits: torch.Tensor, batch: torch.Tensor, view: View | None = None) -> torch.Tensor:
            view = view or View(None)
            return view_loss(cfg.distill, logits, teacher.soft_targets(batch, temperature, view.inputs), hard[batch], view, temperature)

        return loss

    return make


def precomputed_loss(cfg, temperature: float, training: TrainingSet):
    """The student's loss with the stored soft targets of the clean frames, mixed as the view mixed its inputs."""
    make_targets, inputs = target_source(OmegaConf.merge(cfg, {"distill": {"on_the_fly": False}}), Student("dense", temperature, 0), training)

    def make(data, hard):
        targets_of = make_targets(data)

        def loss(logits: torch.Tensor, batch: torch.Tensor, view: View | None = None) -> torch.Tensor:
            view = view or View(None)
            return view_loss(cfg.distill, logits, view.mix(targets_of(batch)), hard[batch], view, temperature)

        return loss

    return make, inputs


def systems(cfg) -> list[System]:
    """Every run's system, in training order: the controls (hard) and the students of the teacher."""
    temperature = float(cfg.function_matching.temperature)
    return [System(run_name(cfg.function_matching, run), "control", data=run.data, seed=run.replicate) if run.kind == "hard" else
            System(run_name(cfg.function_matching, run), "student", teacher=run.teacher or str(cfg.distill.teacher), form="dense", temperature=temperature, data=run.data,
                   seed=run.replicate) for run in runs(cfg.function_matching)]


def train(cfg) -> None:
    """Stage: every run of :func:`runs` of ``function_matching.train_kinds`` that is not complete (each
    resumes from its last epoch). The controls (``hard``) need no teacher: with ``train_kinds=[hard]``
    they train while the ensemble does, on another core or machine; several processes of the stage
    share its runs (a run another one is training is passed over). A run of the patience curve that
    the plateau rule may yet leave out waits (the next run in order that can be decided trains
    first), and is left for a later run of the stage if the students it is decided on are still
    missing at the end (a controls-only run would otherwise train the longest control, maybe for
    nothing)."""
    exp, fm = Path(cfg.exp_dir), cfg.function_matching
    temperature = float(fm.temperature)
    trainings: dict[str, TrainingSet] = {}
    ready: set[str] = set()  # the other teachers trained, with their soft targets
    kinds = set(map(str, fm.train_kinds))  # words of KINDS (the config's schema refuses others)
    remaining = [run for run in runs(cfg.function_matching) if run.kind in kinds]
    while run := next((run for run in remaining if not plateau_pending(cfg.function_matching, exp, run)), None):  # the first in order that can be decided
        remaining.remove(run)
        name = run_name(cfg.function_matching, run)
        if beyond_plateau(cfg.function_matching, run, stop := curve_stop(cfg.function_matching, exp)):
            log.info("%s: not trained, the patience curve stopped at %dx (validation +%.2f points over %dx, below function_matching.plateau=%g)",
                     name, stop["schedule"], stop["gain_points"], stop["previous"], stop["plateau_points"])
            continue
        values = {"view": run.view, "schedule": run.schedule, "kind": run.kind}
        model = Model(f"train-function-matching {name}", Layout(exp).model(name), run.replicate, values=values, views=view_spec(cfg.function_matching, cfg.seed, run))
        rcfg = run_cfg(cfg, run)
        if run.teacher and run.teacher not in ready:  # its ensemble and soft targets first (each resumes; both skip when complete)
            other = teacher_cfg(cfg, run.teacher)
            ensemble.run(other)
            soft_targets.run(other)
            ready.add(run.teacher)
        if run.data not in trainings:
            trainings[run.data] = TrainingSet(rcfg)  # frames loaded once per data dir
        training = trainings[run.data]
        try:
            if run.kind == "hard":
                train_stage(rcfg, [model], training)
                continue
            values |= {"teacher": rcfg.distill.teacher, "temperature": temperature}
            if run.kind == "consistent" and view_spec(cfg.function_matching, cfg.seed, run).active:
                loss, inputs = consistent_loss(rcfg, temperature), {f"teacher {d.name}": d for d in system_dirs(exp, rcfg.distill.teacher)}
            else:  # the paper's stored targets; on clean frames also the consistent student's: the teacher's outputs on them, read, not recomputed
                loss, inputs = precomputed_loss(rcfg, temperature, training)
            train_stage(rcfg, [model], training, loss=loss, keys=("distill.soft_weight", "distill.hard_weight"), inputs=inputs)
        except StageLocked as locked:  # another process of this stage is training it: this one goes on with the next run
            log.info("%s; going on with the next run", locked)
    for run in remaining:
        log.info("%s: not trained yet, the plateau rule decides it once the consistent students of the earlier schedules are trained "
                 "(function_matching.train_kinds=%s): rerun the stage then", run_name(cfg.function_matching, run), sorted(kinds))


# ----------------------------------------------------------------------------- report

# the types of function_matching.* that its defaults (function_matching.yaml) do not show
CONFIG_TYPES = ConfigTypes(
    {"function_matching.subset.view": Kind((str,), nullable=True),
     "function_matching.teachers": Kind((list,), item=Kind((dict,))),
     "function_matching.plateau": Kind((int, float), nullable=True),
     "function_matching.train_kinds": Kind((list,), item=Kind((str,), choices=KINDS))},
    (("function_matching.subset.fraction", SHARE), ("function_matching.*schedule*", POSITIVE), ("function_matching.plateau", NONNEGATIVE)),
    ("function_matching.views.",))

EXPERIMENT = Experiment("function-matching", "function_matching", systems, train=train, report=report, decodes=False, config=CONFIG_TYPES)
