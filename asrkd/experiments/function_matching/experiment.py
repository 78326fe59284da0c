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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import subset_name
from asrkd.distill import soft_targets
from asrkd.distill.losses import soft_cross_entropy
from asrkd.distill.student import Student, TeacherOnTheFly, target_source
from asrkd.errors import StageLocked
from asrkd.evaluate import experiment_scoring
from asrkd.experiments.base import Experiment, Report, dense_only
from asrkd.layout import Layout, System
from asrkd.nnet import ensemble
from asrkd.nnet.train import Model, TrainingSet, load_system, read_history, replicate_name, system_dirs, train_stage
from asrkd.nnet.views import View, ViewSpec
from asrkd.report import percent, saved_figure
from asrkd.schema import ConfigTypes, Kind, NONNEGATIVE, POSITIVE, SHARE
from asrkd.stats import format_interval

log = logging.getLogger(__name__)

KINDS = ("hard", "consistent", "precomputed")


class Run(NamedTuple):
    view: str
    schedule: int  # epochs = schedule x train.epochs
    kind: str  # hard | consistent | precomputed
    replicate: int
    data: str = "train"  # the data dir trained on (the subset rows: train_3pct)
    teacher: str = ""  # another teacher of the headline rows (function_matching.teachers); "": distill.teacher


def run_name(fm, run: Run) -> str:
    """exp/dnn/fm_<view>_x<m>_hard, fm_<view>_x<m>_<kind>_T<T> for students; _<data> off train; _<teacher> for
    another teacher's; _seed<r> for replicates."""
    kind = run.kind if run.kind == "hard" else f"{run.kind}_T{float(fm.temperature):g}"
    data = "" if run.data == "train" else f"_{run.data}"
    teacher = f"_{run.teacher}" if run.teacher else ""
    return replicate_name(f"fm_{run.view}_x{run.schedule}_{kind}{data}{teacher}", run.replicate)


def other_teachers(fm) -> dict[str, int]:
    """``function_matching.teachers``: name -> first_seed of each other ensemble of the headline rows."""
    out: dict[str, int] = {}
    for i, teacher in enumerate(fm.teachers):
        if set(teacher) != {"name", "first_seed"}:
            raise ValueError(f"function_matching.teachers[{i}] = {dict(teacher)}: give each teacher a name and a first_seed, "
                             "e.g. {name: ensemble_b, first_seed: 1001}")
        if str(teacher.name) in out:
            raise ValueError(f"function_matching.teachers names {teacher.name} twice")
        out[str(teacher.name)] = int(teacher.first_seed)
    return out


def teacher_cfg(cfg, name: str):
    """The config that trains another teacher (its ensemble: ``ensemble.name`` = its name, its
    first_seed) and stores its soft targets at the rows' temperature; its students' config too."""
    teachers = other_teachers(cfg.function_matching)
    if name == str(cfg.distill.teacher) or name not in teachers:
        raise ValueError(f"function_matching.teachers: {name} is distill.teacher or not one of them ({', '.join(teachers)}): "
                         "give the other teachers names of their own")
    return OmegaConf.merge(dense_only(cfg, float(cfg.function_matching.temperature), 1, teacher=name),
                           {"ensemble": {"name": name, "first_seed": teachers[name]}})


def runs(fm) -> list[Run]:
    """Every run, in training order: the subset rows, the headline rows (every seed; then each other
    teacher's students), the curve over schedules, the ablation over views, the precomputed student (only when the headline view
    changes the frames: on clean frames it is the consistent student). Cheap rows and the headline
    come first, so an interrupted stage has reported what the README quotes."""
    headline, best = str(fm.headline), int(fm.headline_schedule)
    for key, names in (("headline", [headline]), ("ablation", list(fm.ablation)), ("subset.view", [subset_view(fm)] if fm.subset else [])):
        unknown = [n for n in names if n not in fm.views]
        if unknown:
            raise ValueError(f"function_matching.{key} names {', '.join(unknown)}, not in function_matching.views ({', '.join(fm.views)})")
    out = []
    if fm.subset:  # first: a share of the frames, many epochs of it cost little
        subset = subset_name(float(fm.subset.fraction))
        out += [Run(subset_view(fm), int(fm.subset.schedule), kind, r, subset) for r in range(int(fm.seeds)) for kind in ("hard", "consistent")]
    out += [Run(headline, best, kind, r) for r in range(int(fm.seeds)) for kind in ("hard", "consistent")]
    out += [Run(headline, best, "consistent", r, teacher=name) for name in other_teachers(fm) for r in range(int(fm.seeds))]
    out += [Run(headline, int(m), kind, 0) for m in fm.schedules for kind in ("hard", "consistent")]
    ablation = sorted(map(str, fm.ablation), key=lambda view: view != headline)  # the headline view's pair first
    out += [Run(view, 1, kind, 0) for view in ablation for kind in ("hard", "consistent")]
    changes_frames = ViewSpec.of(fm.views[headline]).active
    out += [Run(headline, best, "precomputed", 0)] if fm.precomputed and changes_frames else []
    return list(dict.fromkeys(out))


def curve_stop(cfg) -> dict | None:
    """Where the patience curve stops: at the first schedule whose consistent student (the headline
    view, seed 0) is less than ``function_matching.plateau`` points of validation frame accuracy
    (its final epoch's, the checkpoint every row is scored at) above the previous schedule's.
    Patience is measured until it stops paying on data the test set never sees; None while no
    two consecutive schedules are trained, when each still gains, when the plateau is the last
    schedule, or with ``plateau`` null."""
    fm = cfg.function_matching
    if fm.get("plateau") is None:
        return None
    exp, headline = Path(cfg.exp_dir), str(fm.headline)
    schedules = sorted(map(int, fm.schedules))
    previous, previous_valid = None, 0.0
    for schedule in schedules[:-1]:  # at the last schedule nothing is left to stop
        run = Run(headline, schedule, "consistent", 0)
        if not complete(exp, cfg.function_matching, [run]):
            return None
        valid = float(read_history(Layout(exp).model(run_name(cfg.function_matching, run)))[-1]["valid_frame_accuracy"])
        if previous is not None and (gain := 100 * (valid - previous_valid)) < float(fm.plateau):
            return {"schedule": schedule, "previous": previous, "gain_points": gain, "plateau_points": float(fm.plateau),
                    "skipped": [m for m in schedules if m > schedule]}
        previous, previous_valid = schedule, valid
    return None


def on_the_curve(fm, run: Run) -> bool:
    """A run the plateau can leave out: the patience curve's, never a headline row, a subset row or the ablation's 1x."""
    return run.view == str(fm.headline) and run.data == "train" and run.schedule != int(fm.headline_schedule)


def beyond_plateau(fm, run: Run, stop: dict | None) -> bool:
    """A run of the patience curve past its plateau."""
    return stop is not None and run.schedule in stop["skipped"] and on_the_curve(fm, run)


def plateau_pending(cfg, run: Run) -> bool:
    """Whether the plateau rule may yet leave ``run`` (not trained) out but cannot tell: not past a
    plateau found so far, and the consistent students of the earlier schedules it decides on are
    not all trained."""
    fm = cfg.function_matching
    exp = Path(cfg.exp_dir)
    if fm.get("plateau") is None or not on_the_curve(cfg.function_matching, run) or complete(exp, cfg.function_matching, [run]) or beyond_plateau(cfg.function_matching, run, curve_stop(cfg)):
        return False
    earlier = [Run(str(fm.headline), int(m), "consistent", 0) for m in fm.schedules if int(m) < run.schedule]
    return len(complete(exp, cfg.function_matching, earlier)) < len(earlier)


def subset_view(fm) -> str:
    """The view of the subset rows: ``function_matching.subset.view``, or the headline's when null."""
    return str(fm.subset.get("view") or fm.headline)


def run_cfg(cfg, run: Run):
    """The training config of a run: its data, m x the epochs, the per-epoch decay stretched to end at the same rate;
    another teacher's run, that teacher's config."""
    return OmegaConf.merge(teacher_cfg(cfg, run.teacher) if run.teacher else cfg, {"train": {"data": run.data, "epochs": int(cfg.train.epochs) * run.schedule,
                                           "lr_decay": float(cfg.train.lr_decay) ** (1.0 / run.schedule)}})


def view_spec(fm, seed: int, run: Run) -> ViewSpec:
    """The run's view (of ``function_matching.views``), drawn from a seed of its own replicate
    (``seed`` + 100 r: replicates see other views)."""
    return ViewSpec.of({**OmegaConf.to_container(fm.views[run.view]), "seed": int(seed) + 100 * run.replicate})


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
    while run := next((run for run in remaining if not plateau_pending(cfg, run)), None):  # the first in order that can be decided
        remaining.remove(run)
        name = run_name(cfg.function_matching, run)
        if beyond_plateau(cfg.function_matching, run, stop := curve_stop(cfg)):
            log.info("%s: not trained, the patience curve stopped at %dx (validation +%.2f points over %dx, below function_matching.plateau=%g)",
                     name, stop["schedule"], stop["gain_points"], stop["previous"], stop["plateau_points"])
            continue
        values = {"view": run.view, "schedule": run.schedule, "kind": run.kind}
        model = Model(f"train-function-matching {name}", Layout(exp).model(name), run.replicate, values=values, views=view_spec(cfg.function_matching, cfg.seed, run))
        rcfg = run_cfg(cfg, run)
        if run.teacher and run.teacher not in ready:  # its ensemble and soft targets first (each resumes; both skip when complete)
            ensemble.run(teacher_cfg(cfg, run.teacher))
            soft_targets.run(teacher_cfg(cfg, run.teacher))
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


def complete(exp: Path, fm, run_list: list[Run]) -> list[str]:
    """The runs of ``run_list`` trained (``fm``: the ``function_matching`` section)."""
    names = [run_name(fm, r) for r in run_list]
    return [n for n in names if (Layout(exp).model(n) / "stage.json").is_file()]


@torch.no_grad()
def log_posteriors(exp: Path, system: str, frames, indices: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    """A system's log-softmax on ``indices``' frames, batch by batch."""
    device = frames.device
    model = load_system(exp, system, device).eval()
    return [torch.log_softmax(model(frames.context(torch.from_numpy(indices[start : start + batch_size]).to(device))).float(), -1)
            for start in range(0, len(indices), batch_size)]


@torch.no_grad()
def fidelity(exp: Path, teacher: list[torch.Tensor], students: list[str], frames, indices: np.ndarray, batch_size: int) -> dict:
    """Top-1 agreement with the teacher (its ``log_posteriors``, computed once per report) and mean
    KL(teacher || student) (nats) on ``indices``' frames, averaged over the students' seeds."""
    agreement, divergence = [], []
    for name in students:
        same, kl = 0.0, 0.0
        for log_p, log_q in zip(teacher, log_posteriors(exp, name, frames, indices, batch_size)):
            same += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            kl += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
        agreement.append(same / len(indices))
        divergence.append(kl / len(indices))
    return {"top1_agreement": float(np.mean(agreement)), "kl_teacher_student": float(np.mean(divergence)), "seeds": len(students)}


def report(cfg) -> Report:
    """Stage: every complete row scored on the first eval set; gain kept, differences, fidelity, the curve."""
    exp, fm = Path(cfg.exp_dir), cfg.function_matching
    scfg = OmegaConf.merge(cfg, {"stats": {"unit": "speaker"}})
    evaluation, sets, command = experiment_scoring(scfg, "asrkd report-function-matching")
    test = evaluation.primary
    data, indices = evaluation.scorer.eval[test]
    teacher = str(cfg.distill.teacher)
    entries = {"teacher": evaluation.entry([teacher], sets, key="teacher")}
    posteriors = {"": log_posteriors(exp, teacher, data.frames, indices, int(cfg.eval.batch_size))}  # per teacher of the rows ("": distill.teacher)
    stop = curve_stop(cfg)
    groups: dict[tuple[str, int, str, str, str], list[Run]] = {}
    for run in runs(cfg.function_matching):
        if beyond_plateau(cfg.function_matching, run, stop) and not complete(exp, cfg.function_matching, [run]):
            continue  # past the plateau and never trained: not missing (one trained before stays a row)
        groups.setdefault((run.view, run.schedule, run.kind, run.data, run.teacher), []).append(run)
    rows, missing = [], []
    for (view, schedule, kind, data_dir, other), members in groups.items():
        names = complete(exp, cfg.function_matching, members)
        missing += [run_name(cfg.function_matching, r) for r in members if run_name(cfg.function_matching, r) not in names]
        if not names:
            continue
        label = row_label(view, schedule, kind, data_dir, other)
        entry = evaluation.entry(names, sets, key=label)
        row = {"label": label, "view": view, "schedule": schedule, "epochs": int(cfg.train.epochs) * schedule, "kind": kind, "data": data_dir,
               "systems": names, "seeds": len(names), "frame_accuracy": entry["frame_accuracy"],
               "frame_accuracy_ci": entry["frame_accuracy_ci"],
               "train_seconds": float(np.mean([sum(h["seconds"] for h in read_history(Layout(exp).model(n))) for n in names]))}
        if kind != "hard":
            if other not in posteriors:  # another teacher's students: scored against that teacher, which is then a row of the table's head
                entries[teacher_key(other)] = evaluation.entry([other], sets, key=teacher_key(other))
                posteriors[other] = log_posteriors(exp, other, data.frames, indices, int(cfg.eval.batch_size))
            row["teacher"] = other or teacher
            row["fidelity"] = fidelity(exp, posteriors[other], names, data.frames, indices, int(cfg.eval.batch_size))
        entries[label] = entry
        rows.append(row)
    by_label = {row["label"]: row for row in rows}
    for row in rows:
        control = row_label(row["view"], row["schedule"], "hard", row["data"])
        if row["kind"] == "hard" or control not in by_label:
            continue
        row["control"] = control
        row["minus_control"] = evaluation.frames.difference(row["label"], control)
        row["gain_kept"] = {**evaluation.frames.share(row["label"], control, teacher_key(other_of(row, teacher))), "unit": "speaker"}
        row["teacher_minus_control"] = evaluation.frames.difference(teacher_key(other_of(row, teacher)), control)
    views_effect = None
    baseline = str(cfg.train.name)
    if (Layout(exp).model(baseline) / "stage.json").is_file():  # do the views alone move the plain baseline by half the teacher's gain?
        entries["baseline"] = evaluation.entry([baseline], sets, key="baseline")
        teacher_gain = evaluation.frames.difference("teacher", "baseline")
        controls = {}
        for row in (row for row in rows if row["data"] == "train"):  # every row beside the plain baseline too
            row["minus_baseline"] = evaluation.frames.difference(row["label"], "baseline")
            if row["kind"] == "hard":
                controls[row["label"]] = row["minus_baseline"]["estimate"] > 0.5 * teacher_gain["estimate"]
            else:  # the share of the teacher's gain over the plain baseline: the paper's measure, whatever the views did to the control
                row["gain_kept_over_baseline"] = {**evaluation.frames.share(row["label"], "baseline", teacher_key(other_of(row, teacher))), "unit": "speaker"}
        views_effect = {"baseline": baseline, "teacher_minus_baseline": teacher_gain, "controls_above_half_the_gain": controls,
                        "teacher_on_views_needed": any(controls.values())}
    headline = by_label.get(row_label(str(fm.headline), int(fm.headline_schedule), "consistent", "train"))
    headline = headline if headline and "gain_kept" in headline else None
    curve = [{"schedule": row["schedule"], "epochs": row["epochs"], "kind": row["kind"], "test": row["frame_accuracy"][test],
              "valid": row["frame_accuracy"]["valid"], **({"gain_kept": row["gain_kept"]["estimate"], **row["fidelity"]} if "gain_kept" in row else {})}
             for row in rows if row["view"] == str(fm.headline) and row["kind"] in ("hard", "consistent") and row["data"] == "train"
             and other_of(row, teacher) == ""]
    ablation = {row["view"]: row["frame_accuracy"]["valid"] for row in rows
                if row["schedule"] == 1 and row["kind"] == "consistent" and row["data"] == "train" and row["view"] in fm.ablation}
    view_choice = ({"valid_frame_accuracy": ablation, "best_on_valid": max(ablation, key=ablation.get), "headline": str(fm.headline),
                    "complete": set(ablation) == set(map(str, fm.ablation))} if ablation else None)
    subset = None
    if fm.subset:
        label = row_label(subset_view(fm), int(fm.subset.schedule), "consistent", subset_name(float(fm.subset.fraction)))
        if "gain_kept" in by_label.get(label, {}):
            evaluation.entry([str(cfg.train.name)], sets, key="full baseline")
            row = by_label[label]
            row["gap_closed"] = evaluation.frames.share(label, row["control"], "full baseline")
            subset = {"row": label, "gap_closed": row["gap_closed"]["estimate"], "gap_closed_ci": row["gap_closed"]["ci"], "unit": "speaker",
                      "seeds": row["seeds"], "full_baseline": str(cfg.train.name)}
    result = {
        "command": command, "test_set": test, "bootstrap_unit": "speaker", "teacher": {"system": teacher, **entries["teacher"]},
        "temperature": float(fm.temperature), "rows": {row["label"]: row for row in rows}, "missing": missing,
        "gain_kept": ({"row": headline["label"], "estimate": headline["gain_kept"]["estimate"], "ci": headline["gain_kept"]["ci"],
                       "unit": "speaker", "seeds": headline["seeds"]} if headline else None),
        "gain_kept_over_baseline": ({"row": headline["label"], **headline["gain_kept_over_baseline"], "seeds": headline["seeds"]}
                                    if headline and "gain_kept_over_baseline" in headline else None),
        "fidelity": {row["label"]: row["fidelity"] for row in rows if "fidelity" in row},
        "curve": sorted(curve, key=lambda c: (c["schedule"], c["kind"])), "subset": subset, "views_effect": views_effect,
        "view_choice": view_choice, "plateau": stop,
        "teachers": {name: entries[teacher_key(name)] for name in posteriors if name},
        "gain_kept_teachers": headline_teachers(evaluation.frames, cfg, by_label, headline),
    }
    # with a subset row, the 3%-data table's function-matching row too, beside what run_3pct.sh reported
    return Report(result, markdown(result, cfg), {"function_matching.png": plot},
                  rows_elsewhere={"three_percent": {"function_matching": subset}} if subset else {},
                  aligned=evaluation.frame_accuracy_utterances)


def row_label(view: str, schedule: int, kind: str, data: str, teacher: str = "") -> str:
    return f"{view} x{schedule} {kind}" + ("" if data == "train" else f" {data}") + (f" ({teacher})" if teacher else "")


def teacher_key(other: str) -> str:
    """The bootstrap key of a row's teacher: "teacher" (distill.teacher) or "teacher <name>"."""
    return f"teacher {other}" if other else "teacher"


def other_of(row: dict, teacher: str) -> str:
    """A row's other teacher ("" for distill.teacher's students and for the controls, which have none)."""
    return "" if row.get("teacher", teacher) == teacher else row["teacher"]


def headline_teachers(frames, cfg, by_label: dict, headline: dict | None) -> dict | None:
    """The headline's gain kept with the teacher drawn too: every teacher's headline students
    (distill.teacher's and function_matching.teachers') against their one control, the (students,
    teacher) pairs drawn with the speakers and seeds. None without another teacher's complete row."""
    fm = cfg.function_matching
    labels = [row_label(str(fm.headline), int(fm.headline_schedule), "consistent", "train", other) for other in other_teachers(fm)]
    others = [by_label[label] for label in labels if "gain_kept" in by_label.get(label, {})]
    if headline is None or not others:
        return None
    rows = [headline, *others]
    pairs = [(row["label"], teacher_key(other_of(row, str(cfg.distill.teacher)))) for row in rows]
    return {**frames.share_drawn(pairs, headline["control"]), "unit": "speaker, seed and teacher", "rows": [row["label"] for row in rows],
            "teachers": [row["teacher"] for row in rows], "seeds": [row["seeds"] for row in rows],
            "per_teacher": {row["teacher"]: {"estimate": row["gain_kept"]["estimate"], "ci": row["gain_kept"]["ci"]} for row in rows}}


def fallen(result: dict, effect: dict) -> list[str]:
    """The controls that lose more than half the teacher's gain against the plain baseline (the
    check of ``views_effect`` looks up: whether the views alone do the teacher's work)."""
    gain = effect["teacher_minus_baseline"]["estimate"]
    return [label for label in effect["controls_above_half_the_gain"] if result["rows"][label]["minus_baseline"]["estimate"] < -0.5 * gain]


def markdown(result: dict, cfg) -> str:
    test = result["test_set"]
    teacher = result["teacher"]
    lines = [f"# Function matching on {cfg.corpus}: students that see what the teacher sees", "",
             f"Teacher: {teacher['system']} ({teacher['model']}), {test} frame accuracy {percent(teacher['frame_accuracy'][test])}; "
             f"T = {result['temperature']:g}. Every student is compared with its control: the same view, epochs, learning-rate "
             "schedule and checkpoint (final.pt), trained on the pdf-ids."
             + "".join(f" Other teacher: {name} ({entry['model']}), {test} frame accuracy {percent(entry['frame_accuracy'][test])}."
                       for name, entry in result.get("teachers", {}).items()), "",
             f"| row | seeds | epochs | valid frame acc. | {test} frame acc. [95% CI] | − control [95% CI] | gain kept [95% CI] "
             "| − plain baseline [95% CI] | gain kept over it [95% CI] | top-1 agreement | KL(teacher‖student) | CPU min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in result["rows"].items():
        acc = format_interval({"estimate": row["frame_accuracy"][test], "ci": row["frame_accuracy_ci"][test]})
        minus = format_interval(row["minus_control"], signed=True) if "minus_control" in row else "–"
        kept = format_interval(row["gain_kept"]) if "gain_kept" in row else "–"
        minus_baseline = format_interval(row["minus_baseline"], signed=True) if "minus_baseline" in row else "–"
        kept_over_baseline = format_interval(row["gain_kept_over_baseline"]) if "gain_kept_over_baseline" in row else "–"
        fid = row.get("fidelity")
        agreement = percent(fid["top1_agreement"]) if fid else "–"
        divergence = f"{fid['kl_teacher_student']:.3f}" if fid else "–"
        lines.append(f"| {label} | {row['seeds']} | {row['epochs']} | {percent(row['frame_accuracy']['valid'])} | {acc} | {minus} | {kept} | {minus_baseline} | {kept_over_baseline} "
                     f"| {agreement} | {divergence} | "
                     f"{row['train_seconds'] / 60:.0f} |")
    lines += ["", f"Command: `{result['command']}`", "",
              f"[95% CI]: bootstrap over the {test} set's speakers (stats.unit=speaker; their utterances are not independent); rows "
              "with several seeds give the mean over seeds, and their interval resamples the seeds too; one seed: single-seed claims.",
              "gain kept = (student − control) / (teacher − control); over the plain baseline (train.name, trained on clean frames "
              "for train.epochs): (student − baseline) / (teacher − baseline), the paper's measure. Fidelity on the test frames, mean over seeds."]
    effect = result.get("views_effect")
    if effect and effect["controls_above_half_the_gain"]:
        gain = effect["teacher_minus_baseline"]
        moved = [f"{label} {format_interval(result['rows'][label]['minus_baseline'], signed=True)}" for label in effect["controls_above_half_the_gain"]]
        lines += ["", f"Controls − the plain baseline ({effect['baseline']}, {test} frame accuracy, points): {'; '.join(moved)}; the teacher's "
                  f"gain over that baseline: {format_interval(gain, signed=True)}. "
                  + ("Some control rises by more than half of it: the views alone do much of what the teacher does, so a teacher whose "
                     "members trained on those views too is the fair one (not trained here yet)."
                     if effect["teacher_on_views_needed"] else "No control rises by half of it: the teacher trained on clean frames stays the reference.")
                  + "".join(f" {', '.join(falling)} {'falls' if len(falling) == 1 else 'fall'} by more than half of it: "
                            f"{'that view costs' if len(falling) == 1 else 'those views cost'} the plain model accuracy."
                            for falling in [fallen(result, effect)] if falling)]
    choice = result.get("view_choice")
    if choice:
        ranked = sorted(choice["valid_frame_accuracy"].items(), key=lambda item: -item[1])
        lines += ["", f"Views at 1x{'' if choice['complete'] else ' trained so far (not every view of the ablation yet)'}, by their "
                  "students' validation frame accuracy (the choice of a view never sees the test set): "
                  + ", ".join(f"{view} {percent(acc)}" for view, acc in ranked)
                  + f". The headline view ({choice['headline']}) is "
                  + ("the best of them." if choice["best_on_valid"] == choice["headline"] else
                     f"not the best: {choice['best_on_valid']} is; function_matching.headline={choice['best_on_valid']} makes it the "
                     "headline's view (its seeds and curve then train).")]
    if result["gain_kept"]:
        kept, over = result["gain_kept"], result.get("gain_kept_over_baseline")
        lines += ["", f"Headline ({kept['row']}, {kept['seeds']} seed(s)): gain kept {format_interval(kept)} over its control"
                  + (f", {format_interval(over)} over the plain baseline." if over else ".")]
    drawn = result.get("gain_kept_teachers")
    if drawn:
        each = "; ".join(f"{name} {format_interval(value)}" for name, value in drawn["per_teacher"].items())
        lines += ["", f"The teacher drawn too ({len(drawn['teachers'])} ensembles of the same recipe, other member seeds, each teaching "
                  f"{'/'.join(map(str, drawn['seeds']))} student seed(s) against the same control): gain kept {format_interval(drawn)}, "
                  f"the (students, teacher) pairs resampled with the speakers and seeds. Each teacher alone: {each}."]
    if result["subset"]:
        subset = result["subset"]
        lines += ["", f"{subset['row']} ({subset['seeds']} seed(s)): the gap between its control and the 100% model "
                  f"({subset['full_baseline']}) closed by {format_interval({'estimate': subset['gap_closed'], 'ci': subset['gap_closed_ci']})}."]
    if result.get("plateau"):
        stop = result["plateau"]
        lines += ["", f"Patience: the curve stops at {stop['schedule']}x, whose student's validation frame accuracy is {stop['gain_points']:+.2f} "
                  f"points over {stop['previous']}x's, below function_matching.plateau = {stop['plateau_points']:g}; "
                  f"{', '.join(f'{m}x' for m in stop['skipped'])} not trained (a row trained before stays in the table)."]
    if result["missing"]:
        lines += ["", f"Not trained yet (the stage resumes): {', '.join(result['missing'])}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    curve = [c for c in result["curve"] if c["kind"] == "consistent" and "gain_kept" in c]
    with saved_figure(out, (6.4, 4.0), "student epochs", "share / agreement", "Function matching: patience", loc="best") as ax:
        if curve:
            epochs = [c["epochs"] for c in curve]
            ax.plot(epochs, [c["gain_kept"] for c in curve], "o-", label="gain kept over the same-schedule control")
            ax.plot(epochs, [c["top1_agreement"] for c in curve], "s--", label="top-1 agreement with the teacher")
            ax.set_xscale("log", base=2)
        for label, row in result["rows"].items():
            if row["schedule"] == 1 and "gain_kept" in row:
                ax.plot([row["epochs"]], [row["gain_kept"]["estimate"]], "x", label=f"{row['view']} ({row['kind']})")


# the types of function_matching.* that its defaults (function_matching.yaml) do not show
CONFIG_TYPES = ConfigTypes(
    {"function_matching.subset.view": Kind((str,), nullable=True),
     "function_matching.teachers": Kind((list,), item=Kind((dict,))),
     "function_matching.plateau": Kind((int, float), nullable=True),
     "function_matching.train_kinds": Kind((list,), item=Kind((str,), choices=("hard", "consistent", "precomputed")))},
    (("function_matching.subset.fraction", SHARE), ("function_matching.*schedule*", POSITIVE), ("function_matching.plateau", NONNEGATIVE)),
    ("function_matching.views.",))

EXPERIMENT = Experiment("function-matching", "function_matching", systems, train=train, report=report, decodes=False, config=CONFIG_TYPES)
