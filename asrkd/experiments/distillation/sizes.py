"""Table 1 at two network sizes side by side (``asrkd report-sizes``; run_paper.sh stage 6).

The paper's Table 1 has one size, 8x2560; on AN4 the 4x512 was the stand-in until the paper's
network was trained. This report puts the two published Table 1s beside each other: each
system's test frame accuracy and WER with their intervals, the differences to the baseline and
the gain the student keeps, each size as its own report computed it, and the paper's column.
It computes nothing new: every number is one of the two reports' (``distillation`` sections of
this results dir and of ``sizes.other``). Two sizes are compared only when their rows were scored
against the same labels (the alignments' content digests) with the same bootstrap unit: otherwise
the report says which differ and gives no side-by-side numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from asrkd import sections
from asrkd.experiments.base import Experiment, Report
from asrkd.experiments.distillation.experiment import PAPER
from asrkd.report import current_report, percent, recipe_command, with_ci
from asrkd.schema import ConfigTypes, Kind
from asrkd.stats import format_interval

ROWS = {"baseline": "baseline", "ensemble": "10x ensemble", "distilled": "distilled single model"}
METRICS = ("frame_accuracy", "frame_accuracy_ci", "wer", "wer_ci")  # a row's, on the test set, as its report keeps them


def distillation_of(report: dict, where: str) -> dict:
    """The ``distillation`` section of a report.json, or a one-line error naming the file and the fix."""
    if "distillation" not in report:
        raise FileNotFoundError(f"{where}: no 'distillation' section: publish run_distill.sh's report there first (--publish)")
    return report["distillation"]


def size_of(section: dict) -> dict:
    """One size's side: its rows, differences to the baseline, gain kept, labels and machine."""
    table, test = section["table1"], section.get("eval_set", "test")
    distilled = next(name for name in section["differences"] if name.startswith("distilled") and name.endswith("− baseline"))
    return {"model": table["baseline"]["model"], "temperature": section["temperature"], "unit": section["bootstrap_unit"],
            "labels": table["baseline"].get("labels"), "machine": section.get("machine"), "command": section.get("command"),
            "eval_set": test, "rows": {row: {"seeds": table[row].get("seeds", 1), **{key: {test: table[row][key][test]} for key in METRICS
                                                                                  if test in (table[row].get(key) or {})}} for row in ROWS},
            "differences": {"ensemble − baseline": section["differences"]["ensemble − baseline"], "distilled − baseline": section["differences"][distilled]},
            "gain_kept": section["gain_kept"]["vs_baseline"]}


def labels_text(labels: dict | None) -> str:
    """'test 931a9355643175f7, train 1b1f98a28de51d58', or 'not recorded'."""
    return ", ".join(f"{name} {digest}" for name, digest in sorted(labels.items())) if labels else "not recorded"


def mismatches(sizes: list[dict]) -> list[str]:
    """What keeps two sizes' numbers from one table: other labels, another bootstrap unit."""
    first, second = sizes
    out = []
    if first["labels"] is None or first["labels"] != second["labels"]:
        out.append(f"labels (alignment content): {first['model']} {labels_text(first['labels'])}, {second['model']} {labels_text(second['labels'])}")
    if first["unit"] != second["unit"]:
        out.append(f"bootstrap unit: {first['model']} {first['unit']}, {second['model']} {second['unit']}")
    return out


def report(cfg) -> Report:
    """This results dir's Table 1 (the paper's size) beside ``sizes.other``'s."""
    if cfg.sizes.other is None:
        raise ValueError("sizes.other is not set: name the other size's results dir, e.g. sizes.other=results/an4")
    other_path = Path(str(cfg.sizes.other)) / "report.json"
    if not other_path.is_file():
        raise FileNotFoundError(f"{other_path}: no report there; sizes.other names a results dir with a published Table 1")
    place = sections.report_place(cfg)
    sizes = [size_of(distillation_of(json.loads(other_path.read_text()), str(other_path))),
             size_of(distillation_of(current_report(place), str(place.results_dir or place.report_dir)))]
    result = {"command": recipe_command("asrkd report-sizes"), "other": str(cfg.sizes.other), "sizes": sizes, "mismatches": mismatches(sizes)}
    return Report(result, markdown(result))


def points(difference: dict | None) -> str:
    """A difference in points with its interval, '+1.59 [+1.26, +1.96]'."""
    return format_interval(difference, signed=True) if difference else "–"


def markdown(result: dict) -> str:
    """sizes.md: both sizes' Table 1 rows, differences and gain kept, each as its report gave them."""
    sizes = result["sizes"]
    lines = ["# Table 1 at two network sizes", "",
             f"Command: `{result['command']}`; each size's numbers are its own report's (`distillation` section): "
             + "; ".join(f"{s['model']}: `{s['command']}`, {s['machine'] or 'machine not recorded'}" for s in sizes) + ".", ""]
    if result["mismatches"]:
        return "\n".join(lines + ["Not compared: the two sizes' rows were not scored alike (" + "; ".join(result["mismatches"]) + ").", ""])
    models = [s["model"] for s in sizes]
    lines += [f"| system | {' | '.join(f'{m} test frame accuracy [95% CI] | {m} test WER [95% CI]' for m in models)} | paper frame accuracy | paper WER |",
              "|---|" + "---|" * (2 * len(sizes) + 2)]
    for row, label in ROWS.items():
        cells = [f"{with_ci(s['rows'][row], 'frame_accuracy', s['eval_set'])} | {with_ci(s['rows'][row], 'wer', s['eval_set'])}" for s in sizes]
        seeds = "/".join(str(s["rows"][row]["seeds"]) for s in sizes)
        lines.append(f"| {label} ({seeds} seeds) | {' | '.join(cells)} | {percent(PAPER[row]['frame_accuracy'])} | {percent(PAPER[row]['wer'])} |")
    lines += ["", f"| difference (points) | {' | '.join(f'{m} frame accuracy [95% CI] | {m} WER [95% CI]' for m in models)} |",
              "|---|" + "---|" * (2 * len(sizes))]
    for name in ("ensemble − baseline", "distilled − baseline"):
        lines.append(f"| {name} | " + " | ".join(f"{points(s['differences'][name].get('frame_accuracy'))} | {points(s['differences'][name].get('wer'))}"
                                                for s in sizes) + " |")
    lines += ["", "Share of the ensemble's test frame-accuracy gain the distilled model keeps (against the baseline): "
              + "; ".join(f"{s['model']} (T = {s['temperature']:g}) {format_interval(s['gain_kept'])}" for s in sizes)
              + f"; the paper's {100 * (PAPER['distilled']['frame_accuracy'] - PAPER['baseline']['frame_accuracy']) / (PAPER['ensemble']['frame_accuracy'] - PAPER['baseline']['frame_accuracy']):.0f}%.",
              f"Intervals resample the test {sizes[0]['unit']}s (and seeds); both sizes scored against the same alignment (labels {labels_text(sizes[0]['labels'])}).", ""]
    return "\n".join(lines)


CONFIG_TYPES = ConfigTypes({"sizes.other": Kind((str,), nullable=True)})

EXPERIMENT = Experiment("sizes", "sizes", report=report, decodes=False, markdown=markdown, config=CONFIG_TYPES)
