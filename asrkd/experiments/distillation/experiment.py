"""Distillation results (the paper's §4, Table 1) with intervals: baseline / ensemble / distilled,
the students over T, the top-k cost, and the levers of :mod:`asrkd.experiments.distillation.levers`.

After ``train-ensemble``, ``soft-targets`` and ``train-student``: ``decode-distill`` decodes
the ensemble (its members' averaged posteriors), every student and the baseline's replicates;
``report-distill`` scores them all and writes

* Table 1: the baseline (the recipe's one model, and the mean ± std of every single model
  trained with its recipe: its replicates and the ensemble's members), the ensemble and the
  distilled model (the dense students at the T with the best *validation* frame accuracy
  averaged over their seeds), each with its 95% interval (:mod:`asrkd.stats`); the share of
  the ensemble's gain the student keeps, against the one baseline and against the mean of
  single models, with its interval;
* the paired differences the tables state (ensemble − baseline, student − baseline, top-k −
  dense, best T − runner-up on validation), with P(difference > 0);
* one row per temperature, the top-k and logit-matching students;
* the levers (students on other transfer sets, cross-fitted teachers, more epochs), each
  against its same-data baseline, and ``distillation_levers.png`` (gain kept per lever);
* ``distillation.md``, ``distillation_curves.png``, ``distillation_temperature.png`` and the
  systems "ensemble", "distilled", "distilled_<form>_T<T>", "lever_<name>" in ``report.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.distill.forms import LOGITS
from asrkd.distill.soft_targets import current_checksum, pdf_priors
from asrkd.distill.student import student_systems
from asrkd.distill.target_store import COMPACT_FORMS, SoftTargetStore, store_dir
from asrkd.evaluate import Evaluation, bootstrap_key
from asrkd.experiments.base import Experiment, Report
from asrkd.experiments.distillation.levers import baseline_replicates, baseline_systems, chosen_temperature, levers
from asrkd.layout import Layout, System
from asrkd.nnet.checkpoints import read_history
from asrkd.nnet.cost import system_cost
from asrkd.nnet.ensemble import member_dirs
from asrkd.nnet.training_set import TrainingSet
from asrkd.report import percent, recipe_command, resampled, saved_figure
from asrkd.report import with_ci as with_ci_on
from asrkd.stage import is_complete
from asrkd.stats import Bootstrap, UtteranceCounts, format_interval, mean_std
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)

# Hinton, Vinyals & Dean (2015), Table 1: test frame accuracy and WER on ~2000 h of Voice Search
PAPER = {"baseline": {"frame_accuracy": 0.589, "wer": 0.109}, "ensemble": {"frame_accuracy": 0.611, "wer": 0.107},
         "distilled": {"frame_accuracy": 0.608, "wer": 0.107}}


class StudentRow(NamedTuple):
    form: str  # dense | topk | logits
    temperature: float | None  # None: logit matching
    systems: list[str]  # exp/dnn/<system> of each replicate


def student_rows(dcfg, tcfg) -> dict[str, StudentRow]:
    """Row name (``<form>_T<T>``, ``logits``) -> every student the config asks for, with its replicates."""
    rows: dict[str, StudentRow] = {}
    for student in student_systems(dcfg, tcfg.data):
        label = LOGITS if student.form == LOGITS else f"{student.form}_T{student.temperature:g}"
        row = rows.setdefault(label, StudentRow(student.form, student.temperature, []))
        row.systems.append(student.name)
    return rows


def systems(cfg) -> list[System]:
    """Stage 4 decodes and stage 5 scores: the baseline's replicates (the baseline itself is the main
    recipe's), the ensemble, every student (the levers' are :mod:`asrkd.experiments.distillation.levers`')."""
    return [*baseline_systems(cfg.train, cfg.distill), System(str(cfg.distill.teacher), "teacher"), *student_systems(cfg.distill, cfg.train.data)]


def plot_curves(exp: Path, members: list[Path], systems: dict[str, str], out: Path) -> None:
    """Validation frame accuracy per epoch: the baseline, every member, every student (first seed)."""
    title = "Training curves: baseline, ensemble members, distilled students"
    with saved_figure(out, (8, 5), "epoch", "validation frame accuracy (%)", title, fontsize=8, ncol=2) as ax:
        for i, member in enumerate(members):
            history = read_history(member)
            ax.plot([h["epoch"] + 1 for h in history], [100 * h["valid_frame_accuracy"] for h in history], color="0.75",
                    linewidth=0.8, label="ensemble members" if i == 0 else None)
        for label, system in {"baseline": "baseline", **systems}.items():
            history = read_history(Layout(exp).model(system))
            ax.plot([h["epoch"] + 1 for h in history], [100 * h["valid_frame_accuracy"] for h in history],
                    linewidth=2 if label == "baseline" else 1.2, color="black" if label == "baseline" else None,
                    linestyle="--" if label.startswith("topk") or label == "logits" else "-", label=label)


def plot_temperature(rows: list[dict], baseline: dict, ensemble: dict, out: Path, test: str) -> None:
    """Student frame accuracy (validation, and test with its interval) against T, with the baseline and the ensemble."""
    title = "Distilled students vs temperature (dense soft targets, mean over seeds)"
    with saved_figure(out, (7, 4.5), "temperature T", "frame accuracy (%)", title, fontsize=8) as ax:
        temperatures = [r["temperature"] for r in rows]
        ax.plot(temperatures, [100 * r["frame_accuracy"]["valid"] for r in rows], "o-", color="tab:blue", label="student, valid")
        accuracy = [100 * r["frame_accuracy"][test] for r in rows]
        errors = [[t - 100 * r["frame_accuracy_ci"][test][0] for t, r in zip(accuracy, rows)],
                  [100 * r["frame_accuracy_ci"][test][1] - t for t, r in zip(accuracy, rows)]]
        ax.errorbar(temperatures, accuracy, yerr=errors, fmt="o-", color="tab:red", capsize=3, label=f"student, {test} (95% CI)")
        for split, color in (("valid", "tab:blue"), (test, "tab:red")):
            ax.axhline(100 * baseline[split], color=color, linestyle=":", label=f"baseline, {split}")
            ax.axhline(100 * ensemble[split], color=color, linestyle="--", label=f"ensemble, {split}")
        ax.set_xscale("log")
        ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])


def plot_levers(levers: list[dict], out: Path) -> None:
    """Gain kept per lever (test frame accuracy) with its 95% interval, against the 80% target."""
    title = "Share of the ensemble's gain the student keeps, per lever (test frame accuracy)"
    with saved_figure(out, (7, 4.5), "lever", "gain kept (%)", title, fontsize=8) as ax:
        names = [lever["name"] for lever in levers]
        kept = [lever["gain_kept"] for lever in levers]
        values = [100 * k["estimate"] if k["estimate"] is not None else float("nan") for k in kept]
        lows = [100 * k["ci"][0] if k["ci"][0] is not None else v for k, v in zip(kept, values)]
        highs = [100 * k["ci"][1] if k["ci"][1] is not None else v for k, v in zip(kept, values)]
        ax.errorbar(range(len(names)), values, yerr=[[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]],
                    fmt="o", color="tab:red", capsize=4, label="student vs same-data baseline (95% CI)")
        ax.axhline(100, color="tab:green", linestyle="--", label="the ensemble")
        ax.axhline(80, color="0.5", linestyle=":", label="target: 80%")
        ax.axhline(0, color="black", linewidth=0.8, label="the same-data baseline")
        ax.set_xticks(range(len(names)), names)


def soft_target_diagnostics(layout: Layout, teacher: str, store: str, temperature: float, groups: dict[str, list[str]]) -> dict:
    """What a teacher's soft targets say beyond the labels, per group of utterances of a store:
    how often their argmax is the aligned pdf, and the mean probability they give it. A teacher
    that memorized its training frames agrees with the labels there far more than on voices it
    never heard: its soft targets there are nearly the hard labels again."""
    targets = SoftTargetStore.load(layout.soft_targets(teacher, store) / f"T{temperature:g}", current_checksum(layout.exp, store))
    pdf_ids = np.load(layout.alignment(store) / "pdf_ids.npy")
    features = FeatureStore.load(layout.fbank(store))
    out = {}
    for group, utts in groups.items():
        frames = np.concatenate([np.arange(*features.span(u)) for u in utts if u in features])
        frames = frames[pdf_ids[frames] >= 0]
        agree, mass = 0, 0.0
        for start in range(0, len(frames), 65536):
            chunk = frames[start : start + 65536]
            chunk_agree, chunk_mass = targets.label_agreement(chunk, pdf_ids[chunk])
            agree, mass = agree + chunk_agree, mass + chunk_mass
        out[group] = {"frames": int(len(frames)), "argmax_is_label": agree / len(frames), "mass_on_label": mass / len(frames)}
    return out


def p_above_zero(difference: dict | None) -> str:
    return "–" if not difference else f"{difference['p_above_zero']:.2f}"


def word_errors(entry: dict, test: str) -> str:
    details = (entry.get("wer_details") or {}).get(test)
    if not details:
        return "–"
    return f"{details['substitutions'] + details['deletions'] + details['insertions']} / {details['words']}"


def cost_cells(entry: dict) -> str:
    """'parameters | ms' of a row that has a measured cost (a system's), else dashes (a mean over models)."""
    cost = entry.get("cost")
    return f"{cost['parameters']:,} | {cost['ms_per_1000_frames']:.1f}" if cost else "– | –"


def markdown(result: dict) -> str:
    test = result["eval_set"]

    def with_ci(entry: dict, metric: str) -> str:
        return with_ci_on(entry, metric, test)

    table = result["table1"]
    seeds = result["seeds"]
    units = resampled(result.get("bootstrap_unit"))
    lines = [f"# {result['corpus']}: distillation (Hinton, Vinyals & Dean 2015, Table 1)", "",
             "| system | seeds | test frame accuracy [95% CI] | test WER [95% CI] | test word errors | parameters | scoring ms / 1000 frames | paper frame accuracy | paper WER |",
             "|---|---|---|---|---|---|---|---|---|"]
    labels = {"baseline": "baseline", "single_models": "single models (mean ± std)", "ensemble": f"{result['ensemble_size']}x ensemble",
              "distilled": f"distilled single model (T = {result['temperature']:g})"}
    for row, label in labels.items():
        entry = table[row]
        paper = PAPER.get("baseline" if row == "single_models" else row, {})
        accuracy = with_ci(entry, "frame_accuracy")
        if row == "single_models":
            spread = entry["spread"]
            accuracy += f" (± {100 * spread['std']:.2f})"
        lines.append(f"| {label} | {entry['seeds']} | {accuracy} | {with_ci(entry, 'wer')} | {word_errors(entry, test) if entry['seeds'] == 1 else '–'} "
                     f"| {cost_cells(entry)} | {percent(paper.get('frame_accuracy'))} | {percent(paper.get('wer'))} |")
    gain = result["gain_kept"]
    cost = table["baseline"]["cost"]
    lines += ["", f"Command: `{result['command']}`. Cost: parameters (an ensemble's: all its members') and the time to score 1000 test frames "
              f"(`asrkd/nnet/cost.py`, measured once per system on {cost['device']}, {cost['threads']} threads, batch {cost['batch_size']}).", "",
              "Share of the ensemble's test frame-accuracy gain the distilled model keeps ((student − baseline) / (ensemble − baseline)):",
              f"{format_interval(gain['vs_baseline'])} against the baseline, {format_interval(gain['vs_single_models'])} against the mean of "
              f"single models; of the WER gain: {format_interval(result['wer_gain_kept']['vs_baseline']) if result['wer_gain_kept']['vs_baseline'] else '–'} against the baseline.",
              f"Single models: the baseline's {seeds} replicates and the {result['ensemble_size']} ensemble members, "
              f"{percent(table['single_models']['spread']['min'])}–{percent(table['single_models']['spread']['max'])} test frame accuracy.",
              temperature_sentence(result, seeds),
              "", f"Paired differences (test, points of frame accuracy / WER; bootstrap over test {units}, seeds resampled too):", "",
              "| difference | frame accuracy [95% CI] | P(> 0) | WER [95% CI] | P(> 0) |", "|---|---|---|---|---|"]
    for name, difference in result["differences"].items():
        acc, wer = difference["frame_accuracy"], difference.get("wer")
        lines.append(f"| {name} | {format_interval(acc, signed=True)} | {acc['p_above_zero']:.2f} "
                     f"| {format_interval(wer, signed=True) if wer else '–'} | {p_above_zero(wer)} |")
    lines += ["", "Every student, by soft-target form and temperature (seeds: the mean over them):", "",
              "| student | T | seeds | frame acc. train | frame acc. valid | frame acc. test [95% CI] | WER test [95% CI] | student − baseline [95% CI] | P(> 0) | parameters | scoring ms / 1000 frames |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["students"].items():
        acc = row["frame_accuracy"]
        temperature = "∞ (logit matching)" if row["temperature"] is None else f"{row['temperature']:g}"
        lines.append(f"| {name} | {temperature} | {row['seeds']} | {percent(acc['train'])} | {percent(acc['valid'])} | {with_ci(row, 'frame_accuracy')} "
                     f"| {with_ci(row, 'wer')} | {format_interval(row['minus_baseline'], signed=True)} | {row['minus_baseline']['p_above_zero']:.2f} "
                     f"| {cost_cells(row)} |")
    if result["compact_forms"]:
        lines += ["", "The compact soft-target forms against the dense one at the same T (same seeds; size per frame against the dense fp32 "
                  "row, 4 bytes per pdf): `topk` renormalizes the k largest (the rest is lost), `compact` keeps their true mass and "
                  "spreads the rest evenly over the other pdfs, `compact_prior` spreads it by the pdf priors; k chosen per T from the "
                  "residual within `distill.compact.budget`.", "",
                  "| form | T | k | seeds | dense test acc. | form test acc. | form − dense [95% CI] | P(> 0) | WER form − dense [95% CI] | bytes / frame | of dense fp32 | mass outside the k (mean) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["compact_forms"]:
            lines.append(f"| {row['form']} | {row['temperature']:g} | {row['k']} | {row['seeds']} | {percent(row['dense'])} | {percent(row['accuracy'])} "
                         f"| {format_interval(row['difference'], signed=True)} | {row['difference']['p_above_zero']:.2f} "
                         f"| {format_interval(row['wer_difference'], signed=True) if row['wer_difference'] else '–'} | {row['bytes_per_frame']} "
                         f"| {percent(row['of_dense_fp32'])} | {percent(row['mean_residual'])} |")
    if result.get("levers"):
        lines += ["", f"Levers (T = {result['temperature']:g}; gain kept against the {result['ensemble_size']}x ensemble "
                  f"({percent(table['ensemble']['frame_accuracy'][test])}) and the baseline trained on the same data; "
                  "a row over one seed is a single-seed claim):", "",
                  "| lever | student seeds | student test acc. [95% CI] | same-data baseline | baseline test acc. [95% CI] | student − baseline [95% CI] "
                  "| P(> 0) | gain kept [95% CI] | student WER [95% CI] | baseline WER [95% CI] |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for lever in result["levers"].values():
            lines.append(f"| {lever['name']} | {len(lever['students'])} | {with_ci(lever['student'], 'frame_accuracy')} | {lever['baseline_name']} "
                         f"| {with_ci(lever['baseline'], 'frame_accuracy')} | {format_interval(lever['minus_baseline'], signed=True)} "
                         f"| {lever['minus_baseline']['p_above_zero']:.2f} | {format_interval(lever['gain_kept'])} "
                         f"| {with_ci(lever['student'], 'wer')} | {with_ci(lever['baseline'], 'wer')} |")
        if result.get("teacher_diagnostics"):
            lines += ["", f"What the soft targets (T = {result['temperature']:g}) say beyond the labels: how often their argmax is the aligned pdf, "
                      "and the mean probability they give it, on the training speakers' frames (what the student learns from) "
                      "and on the validation speakers' (voices no member trained on):", "",
                      "| teacher | store | argmax = label, training speakers | argmax = label, validation speakers | mass on label, training | mass on label, validation |",
                      "|---|---|---|---|---|---|"]
            for row in result["teacher_diagnostics"]:
                train_group, valid_group = row["groups"]["training speakers"], row["groups"]["validation speakers"]
                lines.append(f"| {row['teacher']} | {row['store']} | {percent(train_group['argmax_is_label'])} | {percent(valid_group['argmax_is_label'])} "
                             f"| {percent(train_group['mass_on_label'])} | {percent(valid_group['mass_on_label'])} |")
        lines += ["", "Levers: " + "; ".join(f"{lever['name']}: {lever['description']}" for lever in result["levers"].values()) + "."]
        lines += ["Target: a lever that keeps at least 80% with (student − baseline) above zero at 95%: "
                  + (", ".join(name for name, lever in result["levers"].items() if lever["meets_target"]) or "none on this run") + "."]
    lines += ["", "Frame accuracy: argmax pdf-id vs the triphone GMM's forced alignment. WER: Kaldi WFST decoding, LM weight",
              "chosen on the validation speakers; the ensemble decodes its members' averaged posteriors.",
              f"[95% CI]: percentile bootstrap over whole test {units} (asrkd/stats.py); rows over several seeds resample the seeds too,",
              f"one-seed rows hold the test-set variation only. Differences and gains kept are paired (the same {result.get('bootstrap_unit') or 'utterance'} draws).",
              "Paper: ~2000 h of Voice Search, 8x2560 DNNs, 14000 tied states; here: AN4 with the config in report.json.",
              "Plots: distillation_curves.png (validation accuracy per epoch), distillation_temperature.png (accuracy vs T)"
              + (", distillation_levers.png (gain kept per lever)." if result.get("levers") else "."), ""]
    return "\n".join(lines)


def temperature_sentence(result: dict, seeds: int) -> str:
    """How T was chosen: best on validation against the runner-up, or the only one trained."""
    choice = result["temperature_choice"]
    if choice["runner_up"] is None:
        return f"T = {result['temperature']:g} is the only temperature the dense students were trained at (distill.students.dense): no choice made."
    return (f"T = {result['temperature']:g} has the best validation frame accuracy of the dense students (mean over {seeds} seeds); "
            f"against the runner-up (T = {choice['runner_up']:g}) by {format_interval(choice['difference'], signed=True)} points on "
            f"validation, P(> 0) = {choice['difference']['p_above_zero']:.2f}: "
            + ("significant." if choice["significant"] else "not significant (the choice of T is within noise)."))


def choose_temperature(temperature: float, stats, evaluation, sets: dict[str, list[str]], dense: dict[float, list[str]]) -> dict:
    """Whether ``temperature``, the T whose dense students have the best validation frame accuracy
    (mean over seeds: :func:`chosen_temperature`), beats the runner-up: a paired bootstrap over
    validation utterances and seeds (``stats``: the ``stats`` section)."""
    tables = {t: [evaluation.scorer.score(s, sets)["valid"]["utterances"] for s in systems] for t, systems in dense.items()}
    boot = Bootstrap(sorted(tables[temperature][0]), stats.replicates, stats.confidence, stats.seed)
    for t, replicates in tables.items():
        boot.add(f"T{t:g}", UtteranceCounts.from_tables(replicates))
    ranked = sorted(dense, key=lambda t: -boot.estimates[f"T{t:g}"])
    runner_up = ranked[1] if len(ranked) > 1 else None  # one T trained: nothing was chosen
    difference = boot.difference(f"T{temperature:g}", f"T{runner_up:g}") if runner_up is not None else None
    return {"temperature": temperature, "runner_up": runner_up, "difference": difference,
            "significant": difference is not None and difference["ci"][0] is not None and difference["ci"][0] > 0,
            "valid_frame_accuracy": {f"{t:g}": boot.estimates[f"T{t:g}"] for t in dense}}


def compact_forms(layout: Layout, dcfg, prior_floor: float, evaluation, entry, rows_cfg: dict[str, StudentRow],
                  rows: dict[str, dict]) -> list[dict]:
    """Each top-k and compact student against the dense students of its T (as many seeds of each,
    the first ones; the bootstrap resamples each system's seeds on its own), with the form's
    bytes per frame and the mass it leaves outside its k (``dcfg``: the ``distill`` section;
    ``prior_floor``: ``decode.prior_floor``, the compact_prior form's)."""
    frames, out = evaluation.frames, []
    for label, row in rows_cfg.items():
        dense_label = f"dense_T{row.temperature:g}" if row.form in ("topk", *COMPACT_FORMS) else None
        if dense_label not in rows_cfg:
            continue
        seeds = min(len(row.systems), len(rows_cfg[dense_label].systems))  # as many seeds of each
        systems, dense = row.systems[:seeds], rows_cfg[dense_label].systems[:seeds]
        entry(systems)
        entry(dense)
        store = SoftTargetStore.load(store_dir(layout, dcfg.teacher, row.temperature), current_checksum(layout.exp, "train"))
        priors = pdf_priors(layout, float(prior_floor)) if row.form == "compact_prior" else None
        targets = store.rows(row.form, "cpu", OmegaConf.to_container(dcfg.compact), priors)
        residual = targets.mean_residual() if row.form in COMPACT_FORMS else float(np.asarray(store.residual, dtype=np.float64).mean())
        out.append({"form": row.form, "temperature": row.temperature, "k": targets.k, "seeds": seeds,
                    "dense": frames.estimates[bootstrap_key(dense)], "accuracy": frames.estimates[bootstrap_key(systems)],
                    "difference": frames.difference(bootstrap_key(systems), bootstrap_key(dense)),
                    "wer_difference": (evaluation.words.difference(bootstrap_key(systems), bootstrap_key(dense))
                                       if {bootstrap_key(systems), bootstrap_key(dense)} <= set(evaluation.words.samples) else None),
                    "bytes_per_frame": targets.bytes_per_frame(), "dense_fp32_bytes_per_frame": 4 * store.header["num_pdfs"],
                    "of_dense_fp32": targets.bytes_per_frame() / (4 * store.header["num_pdfs"]), "mean_residual": residual})
    return out


def lever_results(cfg, evaluation, entry, temperature: float, replicates: list[str]) -> tuple[dict, dict, list[dict]]:
    """Every lever whose models are trained: its students against its same-data baseline and the
    ensemble (difference, gain kept, both with intervals), the report rows, and what its
    teacher's soft targets say beyond the labels."""
    exp, frames = Path(cfg.exp_dir), evaluation.frames
    results, systems, diagnostics = {}, {}, []
    _, valid_utts = sections.split(cfg).utterances()
    for lever in levers(cfg, temperature):
        if not all(is_complete(Layout(exp).model(s)) for s in [*lever.students, *lever.baselines]):
            log.info("lever %s: not all its models are trained (run_distill.sh stage 8); left out", lever.name)
            continue
        row = lever.name.replace(" ", "_")
        student_entry, baseline_entry = entry(lever.students), entry(lever.baselines)
        if lever.name != "train":  # the reference lever's students are the distilled row
            systems[f"lever_{row}"] = student_entry
        systems[f"{cfg.train.name}_seeds" if lever.baselines == replicates else f"lever_{row}_baseline"] = baseline_entry
        minus = frames.difference(bootstrap_key(lever.students), bootstrap_key(lever.baselines))
        kept = frames.share(bootstrap_key(lever.students), bootstrap_key(lever.baselines), cfg.distill.teacher)
        results[lever.name] = {"name": lever.name, "description": lever.description, "teacher": lever.teacher,
                               "students": lever.students, "baselines": lever.baselines,
                               "baseline_name": lever.baselines[0] + (f" ({len(lever.baselines)} seeds)" if len(lever.baselines) > 1 else ""),
                               "student": student_entry, "baseline": baseline_entry, "minus_baseline": minus, "gain_kept": kept,
                               "gain_kept_ci": kept["ci"],
                               "meets_target": bool(kept["whole_gain_significant"] and kept["estimate"] is not None and kept["estimate"] >= 0.8
                                                    and minus["ci"][0] > 0)}
        training = TrainingSet(lever.student_cfg)
        if not any(d["teacher"] == lever.teacher and d["store"] == training.stores[0] for d in diagnostics):
            groups = {"training speakers": training.train_utts, "validation speakers": valid_utts}
            diagnostics.append({"teacher": lever.teacher, "store": training.stores[0], "lever": lever.name,
                                "groups": soft_target_diagnostics(sections.layout(cfg), lever.teacher, training.stores[0], temperature, groups)})
    return results, systems, diagnostics


def report(cfg) -> Report:
    """Stage 5 (and 10): Table 1 with intervals, the differences, the table over T, top-k vs dense,
    the levers whose systems exist, plots; the "distillation" section and systems of report.json."""
    exp = Path(cfg.exp_dir)
    train_utts, valid_utts = sections.split(cfg).utterances()
    sets = {"train": train_utts, "valid": valid_utts}
    evaluation = Evaluation(cfg)
    frames, words = evaluation.frames, evaluation.words
    command = recipe_command("asrkd report-distill")
    rows_cfg = student_rows(cfg.distill, cfg.train)

    def entry(systems: list[str], train_sets: dict = sets, **extra) -> dict:
        return evaluation.entry(systems, train_sets, command=command, **extra)

    def differences(a: str, b: str) -> dict:
        return {"frame_accuracy": frames.difference(a, b), **({"wer": words.difference(a, b)} if a in words.samples and b in words.samples else {})}

    members = member_dirs(sections.layout(cfg), cfg.distill.teacher, cfg.ensemble.size)
    replicates = baseline_replicates(cfg.train, cfg.distill)
    baseline = entry([cfg.train.name])
    ensemble = entry([cfg.distill.teacher], members=len(members), train_seconds=sum(h["seconds"] for d in members for h in read_history(d)))
    single_models = entry([*replicates, *(f"{cfg.distill.teacher}/{d.name}" for d in members)], {}, key="single models")
    test = evaluation.primary
    per_seed = single_models["per_seed"][f"{test}_frame_accuracy"]
    single_models["spread"] = mean_std(per_seed)
    rows = {label: entry(row.systems, temperature=row.temperature,
                         train_seconds=float(np.mean([sum(h["seconds"] for h in read_history(Layout(exp).model(s))) for s in row.systems])))
            for label, row in rows_cfg.items()}
    for label, row in rows.items():
        row["minus_baseline"] = frames.difference(bootstrap_key(rows_cfg[label].systems), cfg.train.name)
        row["cost"] = system_cost(cfg, rows_cfg[label].systems[0])
    baseline["cost"], ensemble["cost"] = system_cost(cfg, cfg.train.name), system_cost(cfg, cfg.distill.teacher)

    dense = {row.temperature: row.systems for row in rows_cfg.values() if row.form == "dense"}
    choice = choose_temperature(chosen_temperature(cfg.exp_dir, cfg.distill, cfg.train), cfg.stats, evaluation, sets, dense)
    temperature = choice.pop("temperature")
    distilled_label = f"dense_T{temperature:g}"
    distilled = bootstrap_key(rows_cfg[distilled_label].systems)
    gain_kept = {"vs_baseline": frames.share(distilled, cfg.train.name, cfg.distill.teacher),
                 "vs_single_models": frames.share(distilled, "single models", cfg.distill.teacher)}
    wer_gain_kept = {"vs_baseline": words.share(distilled, cfg.train.name, cfg.distill.teacher) if distilled in words.samples else None}
    diffs = {"ensemble − baseline": differences(cfg.distill.teacher, cfg.train.name),
             "ensemble − single models (mean)": differences(cfg.distill.teacher, "single models"),
             f"distilled (T = {temperature:g}) − baseline": differences(distilled, cfg.train.name),
             f"distilled (T = {temperature:g}) − single models (mean)": differences(distilled, "single models")}
    levers, lever_systems, diagnostics = lever_results(cfg, evaluation, entry, temperature, replicates)
    result = {
        "corpus": cfg.corpus, "command": command, "ensemble_size": len(members), "teacher": cfg.distill.teacher, "seeds": len(replicates),
        "top_k": int(cfg.distill.top_k), "soft_weight": float(cfg.distill.soft_weight), "hard_weight": float(cfg.distill.hard_weight),
        "temperature": temperature, "temperature_choice": choice, "bootstrap_unit": cfg.stats.unit,
        "table1": {"baseline": baseline, "single_models": single_models, "ensemble": ensemble, "distilled": rows[distilled_label]},
        "gain_kept": gain_kept, "gain_kept_ci": gain_kept["vs_baseline"]["ci"], "wer_gain_kept": wer_gain_kept, "differences": diffs,
        "baseline_seeds": {"systems": replicates, f"{test}_frame_accuracy": per_seed[: len(replicates)]},
        "members": {f"{test}_frame_accuracy": per_seed[len(replicates):]}, "eval_set": test,
        "students": {row_cfg.systems[0]: rows[label] for label, row_cfg in rows_cfg.items()},
        "compact_forms": compact_forms(sections.layout(cfg), cfg.distill, cfg.decode.prior_floor, evaluation, entry, rows_cfg, rows), "levers": levers, "teacher_diagnostics": diagnostics,
    }
    by_temperature = [rows[f"dense_T{t:g}"] for t in sorted(dense)]
    figures = {"distillation_curves.png": lambda _, out: plot_curves(exp, members, {label: row.systems[0] for label, row in rows_cfg.items()}, out),
               "distillation_temperature.png": lambda _, out: plot_temperature(by_temperature, baseline["frame_accuracy"],
                                                                               ensemble["frame_accuracy"], out, test)}
    if levers:
        figures["distillation_levers.png"] = lambda _, out: plot_levers(list(levers.values()), out)
    systems = {"ensemble": ensemble, "distilled": {**rows[distilled_label], "gain_kept": gain_kept["vs_baseline"]["estimate"]},
               **{("distilled_logits" if label == LOGITS else f"distilled_{label}"): row for label, row in rows.items()}, **lever_systems}
    log.info("distillation: %s frame acc baseline %.4f, ensemble %.4f, distilled (T=%g) %.4f; gain kept %s", test,
             baseline["frame_accuracy"][test], ensemble["frame_accuracy"][test], temperature, rows[distilled_label]["frame_accuracy"][test],
             format_interval(gain_kept["vs_baseline"]))
    return Report(result, markdown(result), figures, systems, aligned=evaluation.frame_accuracy_utterances)


EXPERIMENT = Experiment("distill", "distillation", systems, report=report, markdown=markdown)
