"""Function matching's runs (run_function_matching.sh stage 2 trains them, stage 3 reports them):
what each row is (a view, a schedule, a kind, a replicate, a data dir, a teacher), its name under
exp/dnn, its training config, and the patience curve's plateau rule that decides which runs of
the curve are trained at all. The experiment's design is in :mod:`.experiment`'s docstring."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

from asrkd.data import subset_name
from asrkd.experiments.base import dense_only
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import read_history
from asrkd.nnet.train import replicate_name
from asrkd.nnet.views import ViewSpec


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


def curve_stop(fm, exp: Path) -> dict | None:
    """Where the patience curve stops: at the first schedule whose consistent student (the headline
    view, seed 0) is less than ``function_matching.plateau`` points of validation frame accuracy
    (its final epoch's, the checkpoint every row is scored at) above the previous schedule's.
    Patience is measured until it stops paying on data the test set never sees; None while no
    two consecutive schedules are trained, when each still gains, when the plateau is the last
    schedule, or with ``plateau`` null. ``fm``: the ``function_matching`` section; ``exp``: the exp dir."""
    if fm.get("plateau") is None:
        return None
    headline = str(fm.headline)
    schedules = sorted(map(int, fm.schedules))
    previous, previous_valid = None, 0.0
    for schedule in schedules[:-1]:  # at the last schedule nothing is left to stop
        run = Run(headline, schedule, "consistent", 0)
        if not complete(exp, fm, [run]):
            return None
        valid = float(read_history(Layout(exp).model(run_name(fm, run)))[-1]["valid_frame_accuracy"])
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


def plateau_pending(fm, exp: Path, run: Run) -> bool:
    """Whether the plateau rule may yet leave ``run`` (not trained) out but cannot tell: not past a
    plateau found so far, and the consistent students of the earlier schedules it decides on are
    not all trained."""
    if fm.get("plateau") is None or not on_the_curve(fm, run) or complete(exp, fm, [run]) or beyond_plateau(fm, run, curve_stop(fm, exp)):
        return False
    earlier = [Run(str(fm.headline), int(m), "consistent", 0) for m in fm.schedules if int(m) < run.schedule]
    return len(complete(exp, fm, earlier)) < len(earlier)


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


def complete(exp: Path, fm, run_list: list[Run]) -> list[str]:
    """The runs of ``run_list`` trained (``fm``: the ``function_matching`` section)."""
    names = [run_name(fm, r) for r in run_list]
    return [n for n in names if (Layout(exp).model(n) / "stage.json").is_file()]

