"""The 3%-data experiment (the paper's §6 table): soft targets as a regularizer.

For each fraction in ``three_percent.fractions`` (3% by default, 10% and 30% for a curve), on
the seeded speaker-balanced subset ``data/train_<pct>pct`` and with the baseline's
architecture and config:

* ``hard_<pct>pct``: cross-entropy on the alignment; its last epoch is the run without early
  stopping, ``hard_<pct>pct@best`` (best validation epoch) the run with it;
* ``student_baseline_T<T>_dense_train_<pct>pct``: the paper's loss with soft targets from the
  100% model at T = ``three_percent.temperature``, no early stopping;
* with an ensemble's soft targets on disk, also ``student_ensemble_...`` as an extra row.

Commands: ``train-3pct``, ``decode-3pct``, ``report-3pct`` (``recipes/an4/run_3pct.sh``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from asrkd.data import fraction_tag, subset_name

log = logging.getLogger(__name__)

PAPER = {"full_hard": {"train": 0.634, "test": 0.589}, "sub_hard": {"train": 0.673, "test": 0.445},
         "sub_soft": {"train": 0.654, "test": 0.570}}


def subset_cfg(cfg, fraction: float, teacher: str | None = None):
    """The config of one subset run: same model and training knobs, the subset's data."""
    overrides = {"train": {"data": subset_name(fraction), "name": f"hard_{fraction_tag(fraction)}", "epochs": cfg.three_percent.epochs},
                 "distill": {"teacher": teacher or "baseline", "temperatures": [cfg.three_percent.temperature],
                             "logit_matching": False}}
    merged = OmegaConf.merge(cfg, overrides)
    merged.distill.students = {"dense": [cfg.three_percent.temperature]}  # replaced, not merged: no top-k student
    return merged


def teachers(cfg) -> list[str]:
    """The 100% model, plus the ensemble when its soft targets exist."""
    from asrkd.soft_targets import store_dir

    ensemble = OmegaConf.merge(cfg, {"distill": {"teacher": cfg.ensemble.name}})
    has_ensemble = (store_dir(ensemble, float(cfg.three_percent.temperature)) / ".done").is_file()
    return ["baseline"] + ([cfg.ensemble.name] if has_ensemble else [])


def systems(cfg) -> dict[float, dict[str, str]]:
    """Row name -> DNN system (exp/dnn/<name>[@best]) for each fraction."""
    from asrkd.student import student_name

    out = {}
    for fraction in cfg.three_percent.fractions:
        data, temperature = subset_name(fraction), float(cfg.three_percent.temperature)
        rows = {"sub_hard": f"hard_{fraction_tag(fraction)}", "sub_hard_early_stop": f"hard_{fraction_tag(fraction)}@best",
                "sub_soft": student_name("baseline", temperature, "dense", data)}
        for teacher in teachers(cfg)[1:]:
            rows[f"sub_soft_{teacher}"] = student_name(teacher, temperature, "dense", data)
        out[float(fraction)] = rows
    return out


def run_train(cfg) -> None:
    """Stage: soft targets of the 100% model, then the hard and soft runs of every fraction."""
    from asrkd import soft_targets, student, train

    soft_targets.run(subset_cfg(cfg, cfg.three_percent.fractions[0]))
    for fraction in cfg.three_percent.fractions:
        sub = subset_cfg(cfg, fraction)
        train.run(sub)
        for teacher in teachers(cfg):
            student.run(subset_cfg(cfg, fraction, teacher))


def run_decode(cfg) -> None:
    """Stage: WER of every row (the 100% model is the main recipe's baseline)."""
    from asrkd import decode

    names = ["baseline"] + [s for rows in systems(cfg).values() for s in rows.values()]
    decode.run(OmegaConf.merge(cfg, {"decode": {"systems": names}}))


def plot_curves(exp: Path, rows: dict[str, str], fraction: float, out: Path) -> None:
    """Train and validation frame accuracy per epoch, hard vs soft targets (the over-fitting curve)."""
    from asrkd.evaluate import saved_figure
    from asrkd.train import read_history

    with saved_figure(out, (7, 4.5), "epoch", "frame accuracy (%)", f"{100 * fraction:g}% of the training data: hard vs soft targets") as ax:
        for row, style in (("sub_hard", "tab:red"), ("sub_soft", "tab:blue")):
            history = read_history(exp / "dnn" / rows[row].split("@")[0])
            epochs = [h["epoch"] + 1 for h in history]
            ax.plot(epochs, [100 * h["train_frame_accuracy"] for h in history], color=style, linestyle="--", label=f"{row} train")
            ax.plot(epochs, [100 * h["valid_frame_accuracy"] for h in history], color=style, label=f"{row} valid")


def markdown(result: dict) -> str:
    main = result["rows"]
    curve_rows = [row for row in result["curve"][0] if row != "fraction"]
    lines = [f"# {result['corpus']}: {100 * result['fraction']:g}% of the training data, hard vs soft targets", "",
             "| row | system | train frame acc. | test frame acc. | test WER | paper train | paper test |", "|---|---|---|---|---|---|---|"]
    for row, entry in main.items():
        paper = PAPER.get(row)
        quoted = [f"{100 * paper[k]:.1f}%" if paper else "–" for k in ("train", "test")]
        lines.append(f"| {row} | {entry['system']} | {100 * entry['frame_accuracy']['train']:.2f}% | {100 * entry['frame_accuracy']['test']:.2f}% "
                     f"| {100 * entry['wer']['test']:.2f}% | {quoted[0]} | {quoted[1]} |")
    lines += ["", f"Command: `{result['command']}`", "", f"Share of the gap closed by soft targets (test frame accuracy): {100 * result['gap_closed']:.1f}% "
              "((sub_soft - sub_hard) / (full_hard - sub_hard)).", "", "Test frame accuracy by fraction of the training data:", "",
              "| fraction | " + " | ".join(curve_rows) + " |", "|---" * (len(curve_rows) + 1) + "|"]
    for entry in result["curve"]:
        lines.append(f"| {100 * entry['fraction']:g}% | " + " | ".join(f"{100 * entry[row]:.2f}%" for row in curve_rows) + " |")
    lines += ["", f"Soft targets: the 100% model (sub_soft) or the ensemble (sub_soft_ensemble) at T = {result['temperature']:g}; "
              "train accuracy is on each row's own training frames.",
              "Paper: Hinton, Vinyals & Dean (2015), §6 (a speech model on 3% of ~2000 h).", ""]
    return "\n".join(lines)


def run_report(cfg) -> None:
    """Stage: the §6 table, the gap closed, a curve over fractions and the over-fitting plot."""
    from asrkd.evaluate import FrameScorer, merge_into_report, recipe_command
    from asrkd.train import data_split

    exp = Path(cfg.exp_dir)
    full_train, _ = data_split(cfg)
    scorer = FrameScorer(cfg)

    def frame_accuracy(system: str, train_utts: list[str]) -> dict[str, float]:
        return {k: v["frame_accuracy"] for k, v in scorer.score(system, {"train": train_utts}).items()}

    by_fraction = systems(cfg)
    curve, main = [], None
    for fraction, rows in by_fraction.items():
        sub_train, _ = data_split(subset_cfg(cfg, fraction))
        entries = {}
        if fraction == float(cfg.three_percent.fractions[0]):
            entries["full_hard"] = {"system": "baseline", "frame_accuracy": frame_accuracy("baseline", full_train)}
        for row, system in rows.items():
            entries[row] = {"system": system, "frame_accuracy": frame_accuracy(system, sub_train)}
        for entry in entries.values():
            wer = json.loads((exp / "decode" / entry["system"] / "wer.json").read_text())
            entry["wer"] = {"test": wer["test"]["wer"], "test_unseen": wer["test_unseen"]["wer"]}
            entry["lmwt"] = wer["lmwt"]
        curve.append({"fraction": fraction, **{row: entries[row]["frame_accuracy"]["test"] for row in rows}})
        if main is None:
            main = (fraction, entries, rows)
    fraction, entries, rows = main
    full, hard, soft = (entries[r]["frame_accuracy"]["test"] for r in ("full_hard", "sub_hard", "sub_soft"))
    result = {"corpus": cfg.corpus, "command": recipe_command("asrkd report-3pct"), "fraction": fraction, "temperature": float(cfg.three_percent.temperature),
              "rows": entries, "gap_closed": (soft - hard) / (full - hard) if full != hard else None, "curve": curve}
    out_dir = exp / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "three_percent.md").write_text(markdown(result))
    plot_curves(exp, rows, fraction, out_dir / "three_percent_curves.png")
    merge_into_report(cfg, {"three_percent": result}, ("three_percent.md", "three_percent_curves.png"))
    log.info("3%% experiment: test frame acc full %.4f, hard %.4f, soft %.4f; gap closed %.3f", full, hard, soft, result["gap_closed"])
