"""The 3%-data experiment (the paper's §6 table): soft targets as a regularizer, with intervals.

For each fraction in ``three_percent.fractions`` (3% by default, 10% and 30% for a curve), on
the seeded speaker-balanced subset ``data/train_<pct>pct`` and with the baseline's
architecture and config:

* ``hard_<pct>pct``: cross-entropy on the alignment; its last epoch is the run without early
  stopping, ``hard_<pct>pct@best`` (best validation epoch) the run with it;
* ``student_baseline_T<T>_dense_train_<pct>pct``: the paper's loss with soft targets from the
  100% model at T = ``three_percent.temperature``, no early stopping;
* with an ensemble's soft targets on disk, also ``student_ensemble_...`` as an extra row;
* with ``three_percent.speed_perturbed``, the same hard and soft runs on the subset's
  speed-perturbed copies (``train_<pct>pct_sp``, made by the speed-perturb stage): the
  transfer set that adds no audio but the subset's own.

Every row trains ``three_percent.seeds`` replicates (``<name>_seed<r>``; the row is their mean,
and the bootstrap resamples them with the test utterances or speakers). Every test number has
its 95% interval, the gap closed ((soft − hard) / (100% − hard)) too, and the soft − hard
differences their P(> 0) (:mod:`asrkd.stats`). The first fraction's rows make the table, decoded
for WER; the other fractions are points of the curve, scored on frames alone and never decoded.

Commands: ``train-3pct``, ``decode-3pct``, ``report-3pct`` (``recipes/an4/run_3pct.sh``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import fraction_tag, subset_name
from asrkd.distill import soft_targets, student
from asrkd.distill.student import student_systems
from asrkd.distill.target_store import store_dir
from asrkd.evaluate import Evaluation, bootstrap_key
from asrkd.experiments.base import Experiment, Report, dense_only
from asrkd.layout import Layout, System, names
from asrkd.nnet import train as train_dnn
from asrkd.nnet.checkpoints import read_history
from asrkd.nnet.train import replicate_systems
from asrkd.report import percent, recipe_command, resampled, saved_figure, with_ci
from asrkd.schema import ConfigTypes, SHARE
from asrkd.stage import is_complete
from asrkd.stats import format_interval

log = logging.getLogger(__name__)

PAPER = {"full_hard": {"train": 0.634, "test": 0.589}, "sub_hard": {"train": 0.673, "test": 0.445},
         "sub_soft": {"train": 0.654, "test": 0.570}}


def subset_cfg(cfg, fraction: float, teacher: str | None = None, perturbed: bool = False):
    """The config of one subset run: same model and training knobs, the subset's data (or its _sp
    copies), ``three_percent.seeds`` replicates of the hard run and of the student."""
    suffix, seeds = "_sp" if perturbed else "", int(cfg.three_percent.seeds)
    students = dense_only(cfg, cfg.three_percent.temperature, seeds, teacher=teacher or "baseline", transfer=[], epochs=None)
    return OmegaConf.merge(students, {"train": {"data": subset_name(fraction) + suffix, "name": f"hard_{fraction_tag(fraction)}{suffix}",
                                                "epochs": cfg.three_percent.epochs, "seeds": seeds}})


def teachers(layout: Layout, ensemble: str, temperature: float) -> list[str]:
    """The 100% model, plus the ensemble ``ensemble`` when its soft targets at ``temperature`` exist."""
    has_ensemble = is_complete(store_dir(layout, ensemble, float(temperature)))
    return ["baseline"] + ([ensemble] if has_ensemble else [])


def rows_by_fraction(cfg) -> dict[float, dict[str, list[System]]]:
    """Row name -> the row's replicates (exp/dnn/<name>[_seed<r>][@best]: the hard runs are the
    controls) for each fraction, named by the functions that train them."""

    def hard(fraction: float, perturbed: bool = False, best: bool = False) -> list[System]:
        systems = replicate_systems(subset_cfg(cfg, fraction, perturbed=perturbed).train, role="control")
        return [replace(s, name=f"{s.name}@best") for s in systems] if best else systems

    def soft(fraction: float, teacher: str, perturbed: bool = False) -> list[System]:
        students = subset_cfg(cfg, fraction, teacher, perturbed)
        return student_systems(students.distill, students.train.data)

    out = {}
    for fraction in map(float, cfg.three_percent.fractions):
        rows = {"sub_hard": hard(fraction), "sub_hard_early_stop": hard(fraction, best=True), "sub_soft": soft(fraction, "baseline")}
        for teacher in teachers(sections.layout(cfg), str(cfg.ensemble.name), cfg.three_percent.temperature)[1:]:
            rows[f"sub_soft_{teacher}"] = soft(fraction, teacher)
        if cfg.three_percent.speed_perturbed:
            rows["sub_hard_sp"] = hard(fraction, perturbed=True)
            rows["sub_soft_sp"] = soft(fraction, "baseline", perturbed=True)
        out[fraction] = rows
    return out


def train(cfg) -> None:
    """Stage: soft targets of the 100% model, then the hard and soft runs of every fraction."""
    variants = [False, True] if cfg.three_percent.speed_perturbed else [False]
    for fraction in cfg.three_percent.fractions:
        for perturbed in variants:
            train_dnn.run(subset_cfg(cfg, fraction, perturbed=perturbed))
            for teacher in teachers(sections.layout(cfg), str(cfg.ensemble.name), cfg.three_percent.temperature) if not perturbed else ["baseline"]:
                sub = subset_cfg(cfg, fraction, teacher, perturbed)
                soft_targets.run(sub)
                student.run(sub)


def with_full_model(fractions: list[dict[str, list[System]]]) -> list[System]:
    """The 100% model (the main recipe's baseline), then every row's systems of ``fractions``."""
    return [System("baseline", "baseline"), *(system for rows in fractions for row in rows.values() for system in row)]


def systems(cfg) -> list[System]:
    """Every row's system: the 100% model, then each fraction's hard runs (controls) and students."""
    return with_full_model(list(rows_by_fraction(cfg).values()))


def decoded(cfg) -> list[System]:
    """The systems whose WER the report gives, which the decode stage decodes: the 100% model and the
    rows of the first fraction (the table's). The other fractions are points of the curve, scored on
    frames alone: decoding them cost time and no number used it."""
    return with_full_model(list(rows_by_fraction(cfg).values())[:1])


def plot_curves(exp: Path, rows: dict[str, list[System]], fraction: float, out: Path) -> None:
    """Train and validation frame accuracy per epoch, hard vs soft targets (the over-fitting curve; the first seed's)."""
    with saved_figure(out, (7, 4.5), "epoch", "frame accuracy (%)", f"{100 * fraction:g}% of the training data: hard vs soft targets") as ax:
        for row, style in (("sub_hard", "tab:red"), ("sub_soft", "tab:blue")):
            history = read_history(Layout(exp).model(rows[row][0].name))
            epochs = [h["epoch"] + 1 for h in history]
            ax.plot(epochs, [100 * h["train_frame_accuracy"] for h in history], color=style, linestyle="--", label=f"{row} train")
            ax.plot(epochs, [100 * h["valid_frame_accuracy"] for h in history], color=style, label=f"{row} valid")


def markdown(result: dict) -> str:
    main = result["rows"]
    lines = [f"# {result['corpus']}: {100 * result['fraction']:g}% of the training data, hard vs soft targets", "",
             "| row | system | train frame acc. | test frame acc. [95% CI] | test WER [95% CI] | paper train | paper test |",
             "|---|---|---|---|---|---|---|"]
    for row, entry in main.items():
        paper = PAPER.get(row)
        quoted = [f"{100 * paper[k]:.1f}%" if paper else "–" for k in ("train", "test")]
        lines.append(f"| {row} | {entry['system']} | {percent(entry['frame_accuracy']['train'])} | {with_ci(entry, 'frame_accuracy', result['eval_set'])} "
                     f"| {with_ci(entry, 'wer', result['eval_set'])} | {quoted[0]} | {quoted[1]} |")
    lines += ["", f"Command: `{result['command']}`", "",
              f"Share of the gap closed by soft targets (test frame accuracy): {format_interval(result['gap_closed_interval'])} "
              "((sub_soft − sub_hard) / (full_hard − sub_hard))"
              + (f"; on the speed-perturbed copies: {format_interval(result['gap_closed_sp'])} ((sub_soft_sp − sub_hard_sp) / (full_hard − sub_hard_sp))."
                 if result.get("gap_closed_sp") else "."),
              "", "Test frame accuracy by fraction of the training data, and what soft targets add:", ""]
    columns = [c for c in result["curve"][0]["rows"]]
    differences = list(result["curve"][0]["differences"])
    lines += ["| fraction | " + " | ".join(columns) + " | " + " | ".join(f"{d} [95% CI] (P > 0)" for d in differences) + " |",
              "|---" * (len(columns) + len(differences) + 1) + "|"]
    for entry in result["curve"]:
        cells = [format_interval(entry["rows"][c]) for c in columns]
        cells += [f"{format_interval(entry['differences'][d], signed=True)} ({entry['differences'][d]['p_above_zero']:.2f})" for d in differences]
        lines.append(f"| {100 * entry['fraction']:g}% | " + " | ".join(cells) + " |")
    lines += ["", f"Soft targets: the 100% model (sub_soft) or the ensemble (sub_soft_ensemble) at T = {result['temperature']:g}; "
              "_sp rows train on the subset and its speed-perturbed copies (0.9, 1.1); train accuracy is on each row's own "
              "(unperturbed) training frames.",
              f"[95% CI]: bootstrap over whole test {resampled(result.get('bootstrap_unit'))} (asrkd/stats.py); "
              + (f"{result['seeds']} seeds per row (the row is their mean; the bootstrap resamples them too)."
                 if result.get("seeds", 1) > 1 else "one seed per row: test-set variation only."),
              "Paper: Hinton, Vinyals & Dean (2015), §6 (a speech model on 3% of ~2000 h).", ""]
    return "\n".join(lines)


def report(cfg) -> Report:
    """Stage: the §6 table with intervals, the gap closed, a curve over fractions and the over-fitting plot."""
    exp = Path(cfg.exp_dir)
    full_train, _ = sections.split(cfg).utterances()
    evaluation = Evaluation(cfg)
    frames = evaluation.frames
    command = recipe_command("asrkd report-3pct")

    def entry(systems: list[str], train_utts: list[str]) -> dict:
        out = evaluation.entry(systems, {"train": train_utts}, command=command)
        # a row of several seeds names them all (report.json, RESULTS.md: "<first> (+n seeds)"), as every experiment's rows do
        return {"system": systems if len(systems) > 1 else systems[0], **{k: out[k] for k in ("seeds", "frame_accuracy", "frame_accuracy_ci", "wer", "wer_ci", "lmwt", "stage") if k in out}}

    curve, main = [], None
    for fraction, rows in rows_by_fraction(cfg).items():
        sub_train, _ = sections.split(subset_cfg(cfg, fraction)).utterances()
        entries = {}
        if main is None:
            entries["full_hard"] = entry(["baseline"], full_train)
        for row, systems in rows.items():
            entries[row] = entry(names(systems), sub_train)
        key = {row: bootstrap_key(names(systems)) for row, systems in rows.items()}
        pairs = {"sub_soft − sub_hard": ("sub_soft", "sub_hard")}
        if "sub_soft_sp" in rows:
            pairs |= {"sub_hard_sp − sub_hard": ("sub_hard_sp", "sub_hard"), "sub_soft_sp − sub_hard_sp": ("sub_soft_sp", "sub_hard_sp"),
                      "sub_soft_sp − sub_soft": ("sub_soft_sp", "sub_soft")}
        curve.append({"fraction": fraction, "rows": {row: frames.interval(key[row]) for row in rows},
                      "differences": {name: frames.difference(key[a], key[b]) for name, (a, b) in pairs.items()}})
        if main is None:
            main = (fraction, entries, rows, key)
    fraction, entries, rows, key = main
    full, hard, soft = (entries[r]["frame_accuracy"][evaluation.primary] for r in ("full_hard", "sub_hard", "sub_soft"))
    gap = frames.share(key["sub_soft"], key["sub_hard"], "baseline")
    result = {"corpus": cfg.corpus, "command": command, "fraction": fraction, "temperature": float(cfg.three_percent.temperature),
              "rows": entries, "gap_closed": gap["estimate"], "gap_closed_ci": gap["ci"], "gap_closed_interval": gap,
              "curve": curve, "bootstrap_unit": cfg.stats.unit, "eval_set": evaluation.primary, "seeds": int(cfg.three_percent.seeds)}
    if "sub_soft_sp" in rows:
        result["gap_closed_sp"] = frames.share(key["sub_soft_sp"], key["sub_hard_sp"], "baseline")
    log.info("3%% experiment: test frame acc full %.4f, hard %.4f, soft %.4f; gap closed %s", full, hard, soft, format_interval(gap))
    return Report(result, markdown(result), {"three_percent_curves.png": lambda _, out: plot_curves(exp, rows, fraction, out)},
                  aligned=evaluation.frame_accuracy_utterances)


# the types of three_percent.* that its defaults (three_percent.yaml) do not show
CONFIG_TYPES = ConfigTypes(ranges=(("three_percent.fractions", SHARE),))

EXPERIMENT = Experiment("3pct", "three_percent", systems, train=train, report=report, decoded=decoded, markdown=markdown, config=CONFIG_TYPES)
