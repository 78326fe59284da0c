"""Function matching's report (run_function_matching.sh stage 3): every complete row scored on the
first eval set with speaker-level intervals, each student minus its control, the share of its
teacher's gain it keeps (with the teacher drawn too where there are several), its fidelity to the
teacher, the views' effect on the plain baseline, the patience curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from asrkd.data import subset_name
from asrkd.evaluate import experiment_scoring
from asrkd.experiments.base import Report
from asrkd.experiments.function_matching.runs import Run, beyond_plateau, complete, curve_stop, other_teachers, run_name, runs, subset_view
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import load_system, read_history
from asrkd.report import percent, saved_figure
from asrkd.stats import format_interval


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
    stop = curve_stop(fm, exp)
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
        row["gain_kept"] = {**evaluation.frames.share(row["label"], control, row_teacher_key(row, teacher)), "unit": "speaker"}
        row["teacher_minus_control"] = evaluation.frames.difference(row_teacher_key(row, teacher), control)
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
                row["gain_kept_over_baseline"] = {**evaluation.frames.share(row["label"], "baseline", row_teacher_key(row, teacher)), "unit": "speaker"}
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
        "gain_kept_teachers": headline_teachers(evaluation.frames, fm, teacher, by_label, headline),
    }
    # with a subset row, the 3%-data table's function-matching row too, beside what run_3pct.sh reported
    return Report(result, markdown(result, str(cfg.corpus)), {"function_matching.png": plot},
                  rows_elsewhere={"three_percent": {"function_matching": subset}} if subset else {},
                  aligned=evaluation.frame_accuracy_utterances)


def row_label(view: str, schedule: int, kind: str, data: str, teacher: str = "") -> str:
    return f"{view} x{schedule} {kind}" + ("" if data == "train" else f" {data}") + (f" ({teacher})" if teacher else "")


def teacher_key(other: str) -> str:
    """The bootstrap key of a row's teacher: "teacher" (distill.teacher) or "teacher <name>"."""
    return f"teacher {other}" if other else "teacher"


def row_teacher_key(row: dict, teacher: str) -> str:
    """The bootstrap key of the teacher a student row learned from (``teacher``: distill.teacher)."""
    return teacher_key(other_of(row, teacher))


def other_of(row: dict, teacher: str) -> str:
    """A row's other teacher ("" for distill.teacher's students and for the controls, which have none)."""
    return "" if row.get("teacher", teacher) == teacher else row["teacher"]


def headline_teachers(frames, fm, teacher: str, by_label: dict, headline: dict | None) -> dict | None:
    """The headline's gain kept with the teacher drawn too: every teacher's headline students
    (distill.teacher's and function_matching.teachers') against their one control, the (students,
    teacher) pairs drawn with the speakers and seeds (``teacher``: distill.teacher). None without
    another teacher's complete row."""
    labels = [row_label(str(fm.headline), int(fm.headline_schedule), "consistent", "train", other) for other in other_teachers(fm)]
    others = [by_label[label] for label in labels if "gain_kept" in by_label.get(label, {})]
    if headline is None or not others:
        return None
    rows = [headline, *others]
    pairs = [(row["label"], row_teacher_key(row, teacher)) for row in rows]
    return {**frames.share_drawn(pairs, headline["control"]), "unit": "speaker, seed and teacher", "rows": [row["label"] for row in rows],
            "teachers": [row["teacher"] for row in rows], "seeds": [row["seeds"] for row in rows],
            "per_teacher": {row["teacher"]: {"estimate": row["gain_kept"]["estimate"], "ci": row["gain_kept"]["ci"]} for row in rows}}


def fallen(result: dict, effect: dict) -> list[str]:
    """The controls that lose more than half the teacher's gain against the plain baseline (the
    check of ``views_effect`` looks up: whether the views alone do the teacher's work)."""
    gain = effect["teacher_minus_baseline"]["estimate"]
    return [label for label in effect["controls_above_half_the_gain"] if result["rows"][label]["minus_baseline"]["estimate"] < -0.5 * gain]


def markdown(result: dict, corpus: str) -> str:
    test = result["test_set"]
    teacher = result["teacher"]
    lines = [f"# Function matching on {corpus}: students that see what the teacher sees", "",
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


