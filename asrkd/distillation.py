"""Distillation results (the paper's §4, Table 1): baseline / ensemble / distilled, and over T.

After ``train-ensemble``, ``soft-targets`` and ``train-student``: ``decode-distill`` decodes
the ensemble (its members' averaged posteriors) and every student; ``report-distill`` scores
them all and writes

* the Table 1 rows: the baseline, the ensemble and the distilled model — the dense student
  whose temperature gives the best *validation* frame accuracy — with test frame accuracy and
  WER, and the share of the ensemble's gain the student keeps,
  (student - baseline) / (ensemble - baseline), in frame accuracy and in WER;
* one row per temperature, the top-k students against the dense ones at the same T (with
  the stores' sizes), and the logit-matching student;
* ``distillation.md``, ``distillation_curves.png`` (validation accuracy per epoch) and
  ``distillation_temperature.png`` (accuracy vs T), and the systems "ensemble", "distilled"
  and "distilled_<form>_T<T>" in ``report.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Hinton, Vinyals & Dean (2015), Table 1: test frame accuracy and WER on ~2000 h of Voice Search
PAPER = {"baseline": {"frame_accuracy": 0.589, "wer": 0.109}, "ensemble": {"frame_accuracy": 0.611, "wer": 0.107},
         "distilled": {"frame_accuracy": 0.608, "wer": 0.107}}


class StudentRow(NamedTuple):
    form: str  # dense | topk | logits
    temperature: float | None  # None: logit matching
    system: str  # exp/dnn/<system>


def student_rows(cfg) -> dict[str, StudentRow]:
    """Row name (``<form>_T<T>``, ``logits``) -> every student the config asks for."""
    from asrkd.student import LOGITS, student_name, students

    return {(LOGITS if form == LOGITS else f"{form}_T{temperature:g}"): StudentRow(form, temperature, student_name(cfg.distill.teacher, temperature, form))
            for form, temperature in students(cfg)}


def run_decode(cfg) -> None:
    """Stage: WER of the ensemble and of every student (the baseline is the main recipe's)."""
    from asrkd import decode

    names = ["baseline", cfg.distill.teacher, *(row.system for row in student_rows(cfg).values())]
    decode.run(OmegaConf.merge(cfg, {"decode": {"systems": names}}))


def gain_kept(student: float, baseline: float, ensemble: float) -> float | None:
    """The share of the ensemble's improvement over the baseline that the student keeps."""
    return (student - baseline) / (ensemble - baseline) if ensemble != baseline else None


def store_bytes(directory: Path) -> dict[str, int]:
    """Bytes on disk of a soft-target store's dense form and of its top-k form."""
    size = lambda *names: sum((directory / f"{n}.npy").stat().st_size for n in names)  # noqa: E731
    return {"dense": size("dense"), "topk": size("topk_ids", "topk_probs", "residual")}


def plot_curves(exp: Path, members: list[Path], systems: dict[str, str], out: Path) -> None:
    """Validation frame accuracy per epoch: the baseline, every member, every student."""
    from asrkd.evaluate import saved_figure
    from asrkd.train import read_history

    title = "Training curves: baseline, ensemble members, distilled students"
    with saved_figure(out, (8, 5), "epoch", "validation frame accuracy (%)", title, fontsize=8, ncol=2) as ax:
        for i, member in enumerate(members):
            history = read_history(member)
            ax.plot([h["epoch"] + 1 for h in history], [100 * h["valid_frame_accuracy"] for h in history], color="0.75",
                    linewidth=0.8, label="ensemble members" if i == 0 else None)
        for label, system in {"baseline": "baseline", **systems}.items():
            history = read_history(exp / "dnn" / system)
            ax.plot([h["epoch"] + 1 for h in history], [100 * h["valid_frame_accuracy"] for h in history],
                    linewidth=2 if label == "baseline" else 1.2, color="black" if label == "baseline" else None,
                    linestyle="--" if label.startswith("topk") or label == "logits" else "-", label=label)


def plot_temperature(rows: list[dict], baseline: dict, ensemble: dict, out: Path) -> None:
    """Student frame accuracy (validation and test) against T, with the baseline and the ensemble."""
    from asrkd.evaluate import saved_figure

    title = "Distilled student vs temperature (dense soft targets)"
    with saved_figure(out, (7, 4.5), "temperature T", "frame accuracy (%)", title, fontsize=8) as ax:
        temperatures = [r["temperature"] for r in rows]
        for split, color in (("valid", "tab:blue"), ("test", "tab:red")):
            ax.plot(temperatures, [100 * r["frame_accuracy"][split] for r in rows], "o-", color=color, label=f"student, {split}")
            ax.axhline(100 * baseline[split], color=color, linestyle=":", label=f"baseline, {split}")
            ax.axhline(100 * ensemble[split], color=color, linestyle="--", label=f"ensemble, {split}")
        ax.set_xscale("log")
        ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])


def table_row(entry: dict) -> dict:
    """A Table 1 row: frame accuracy, test WER and its word errors (how many words a WER difference is)."""
    details = entry["wer_details"]["test"]
    return {"frame_accuracy": entry["frame_accuracy"], "wer": entry["wer"]["test"],
            "word_errors": details["substitutions"] + details["deletions"] + details["insertions"], "words": details["words"]}


def markdown(result: dict) -> str:
    from asrkd.evaluate import percent

    table = result["table1"]
    lines = [f"# {result['corpus']}: distillation (Hinton, Vinyals & Dean 2015, Table 1)", "",
             "| system | test frame accuracy | test WER | test word errors | paper frame accuracy | paper WER |", "|---|---|---|---|---|---|"]
    for row in ("baseline", "ensemble", "distilled"):
        entry, paper = table[row], PAPER[row]
        label = {"baseline": "baseline", "ensemble": f"{result['ensemble_size']}x ensemble",
                 "distilled": f"distilled single model (T = {table['distilled']['temperature']:g})"}[row]
        lines.append(f"| {label} | {percent(entry['frame_accuracy']['test'])} | {percent(entry['wer'])} | {entry['word_errors']} / {entry['words']} "
                     f"| {percent(paper['frame_accuracy'])} | {percent(paper['wer'])} |")
    lines += ["", f"Command: `{result['command']}`", "",
              f"Share of the ensemble's gain the student keeps: {percent(result['gain_kept'])} of the test frame-accuracy gain "
              f"and {percent(result['wer_gain_kept'])} of the WER gain ((student - baseline) / (ensemble - baseline)).",
              f"The distilled T is the one with the best validation frame accuracy; single members score "
              f"{percent(result['members']['min'])}–{percent(result['members']['max'])} test frame accuracy (mean {percent(result['members']['mean'])}).",
              "", "Every student, by soft-target form and temperature:", "",
              "| student | T | frame acc. train | frame acc. valid | frame acc. test | WER test | LMWT |", "|---|---|---|---|---|---|---|"]
    for name, row in result["students"].items():
        acc = row["frame_accuracy"]
        temperature = "∞ (logit matching)" if row["temperature"] is None else f"{row['temperature']:g}"
        lines.append(f"| {name} | {temperature} | {percent(acc['train'])} | {percent(acc['valid'])} | {percent(acc['test'])} | {percent(row['wer'])} | {row['lmwt']} |")
    if result["topk"]:
        lines += ["", f"What the top-k form costs (k = {result['top_k']}): the same student trained on the top-k and on the dense soft targets.", "",
                  "| T | dense test acc. | top-k test acc. | difference | top-k store / dense store | mass outside the top k (mean) |",
                  "|---|---|---|---|---|---|"]
        for row in result["topk"]:
            lines.append(f"| {row['temperature']:g} | {percent(row['dense'])} | {percent(row['topk'])} | {100 * (row['topk'] - row['dense']):+.2f} points "
                         f"| {row['size_ratio']:.3f} ({row['bytes']['topk'] / 2**20:.0f} / {row['bytes']['dense'] / 2**20:.0f} MiB) "
                         f"| {percent(row['mean_residual'])} |")
    lines += ["", "Frame accuracy: argmax pdf-id vs the triphone GMM's forced alignment. WER: Kaldi WFST decoding, LM weight",
              "chosen on the validation speakers; the ensemble decodes its members' averaged posteriors.",
              "Paper: ~2000 h of Voice Search, 8x2560 DNNs, 14000 tied states; here: AN4 with the config in report.json.",
              "Plots: distillation_curves.png (validation accuracy per epoch), distillation_temperature.png (accuracy vs T).", ""]
    return "\n".join(lines)


def run_report(cfg) -> None:
    """Stage: Table 1, the table over T, top-k vs dense, plots; sections of report.json."""
    import numpy as np

    from asrkd.ensemble import member_dirs
    from asrkd.evaluate import FrameScorer, decoding_result, merge_into_report, recipe_command
    from asrkd.soft_targets import store_dir
    from asrkd.student import LOGITS
    from asrkd.train import data_split, read_history

    exp = Path(cfg.exp_dir)
    train_utts, valid_utts = data_split(cfg)
    scorer = FrameScorer(cfg)
    command = recipe_command("asrkd report-distill")
    model = f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}"
    students = student_rows(cfg)

    def entry(system: str, **extra) -> dict:
        scores = scorer.score(system, {"train": train_utts, "valid": valid_utts})
        return {"model": model, "system": system, "command": command,
                "frame_accuracy": {k: v["frame_accuracy"] for k, v in scores.items()},
                "cross_entropy": {k: v["cross_entropy"] for k, v in scores.items()}, **extra, **decoding_result(exp, system)}

    members = member_dirs(cfg)
    baseline = entry("baseline")
    ensemble = entry(cfg.distill.teacher, members=len(members), model=f"{len(members)} x {model}",
                     train_seconds=sum(h["seconds"] for d in members for h in read_history(d)))
    member_test = [scorer.score(f"{cfg.distill.teacher}/{d.name}", {})["test"]["frame_accuracy"] for d in members]
    rows = {label: entry(student.system, temperature=student.temperature,
                         train_seconds=sum(h["seconds"] for h in read_history(exp / "dnn" / student.system)))
            for label, student in students.items()}
    dense = [label for label in rows if label.startswith("dense_")]
    best = max(dense, key=lambda label: rows[label]["frame_accuracy"]["valid"])
    accuracy = lambda e: e["frame_accuracy"]["test"]  # noqa: E731
    wer = lambda e: e["wer"]["test"]  # noqa: E731
    distilled = {**rows[best], "gain_kept": gain_kept(accuracy(rows[best]), accuracy(baseline), accuracy(ensemble)),
                 "wer_gain_kept": gain_kept(wer(rows[best]), wer(baseline), wer(ensemble))}
    topk = []
    for label, row in rows.items():
        if label.startswith("topk_") and f"dense_T{row['temperature']:g}" in rows:
            directory = store_dir(cfg, row["temperature"])
            sizes = store_bytes(directory)
            topk.append({"temperature": row["temperature"], "dense": accuracy(rows[f"dense_T{row['temperature']:g}"]), "topk": accuracy(row),
                         "bytes": sizes, "size_ratio": sizes["topk"] / sizes["dense"],
                         "mean_residual": float(np.load(directory / "residual.npy", mmap_mode="r").astype(np.float64).mean())})
    result = {
        "corpus": cfg.corpus, "command": command, "ensemble_size": len(members), "teacher": cfg.distill.teacher,
        "top_k": int(cfg.distill.top_k), "soft_weight": float(cfg.distill.soft_weight), "hard_weight": float(cfg.distill.hard_weight),
        "table1": {"baseline": table_row(baseline), "ensemble": table_row(ensemble),
                   "distilled": {"system": distilled["system"], "temperature": distilled["temperature"], **table_row(distilled)}},
        "gain_kept": distilled["gain_kept"], "wer_gain_kept": distilled["wer_gain_kept"],
        "members": {"test_frame_accuracy": member_test, "min": min(member_test), "max": max(member_test),
                    "mean": float(np.mean(member_test))},
        "students": {students[label].system: {"form": students[label].form, "temperature": row["temperature"],
                                           "frame_accuracy": row["frame_accuracy"], "wer": wer(row), "lmwt": row["lmwt"]}
                     for label, row in rows.items()},
        "topk": topk,
    }
    out_dir = exp / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "distillation.md").write_text(markdown(result))
    plot_curves(exp, members, {label: student.system for label, student in students.items()}, out_dir / "distillation_curves.png")
    by_temperature = [rows[label] for label in sorted(dense, key=lambda label: rows[label]["temperature"])]
    plot_temperature(by_temperature, baseline["frame_accuracy"], ensemble["frame_accuracy"], out_dir / "distillation_temperature.png")
    systems = {"ensemble": ensemble, "distilled": distilled,
               **{("distilled_logits" if label == LOGITS else f"distilled_{label}"): row for label, row in rows.items()}}
    merge_into_report(cfg, {"systems": systems, "distillation": result},
                      ("distillation.md", "distillation_curves.png", "distillation_temperature.png"))
    log.info("distillation: test frame acc baseline %.4f, ensemble %.4f, distilled (T=%g) %.4f; gain kept %.3f",
             accuracy(baseline), accuracy(ensemble), distilled["temperature"], accuracy(distilled), distilled["gain_kept"] or float("nan"))
