"""The image experiment's report (recipes/mnist/run.sh stage 3, ``report-images``): test errors
with bootstrap intervals, the gap closed, the bias corrections, T against width, the big nets
compared, the curves, the paper's MNIST numbers beside them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.experiments.images.data import ImageSet
from asrkd.experiments.images.nets import SMALL, big_nets, chosen_big, control_name, describe_big, describe_net, ensemble_teacher, headline_names, held_out_error_count, kept_tag, left_out_tag, matching_name, seeds_average, student_name, trained
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import load_model, model_path, read_history
from asrkd.nnet.model import average_softmax
from asrkd.nnet.train import replicate_name
from asrkd.nnet.training_set import predict_logits
from asrkd.report import machine, publish_corpus_report, recipe_command, saved_figure
from asrkd.stats import Bootstrap, UtteranceCounts, format_interval

log = logging.getLogger(__name__)

# The paper's MNIST results (§3), shown beside ours as reference: test errors of 10,000.
PAPER_MNIST = {"big": 67, "small_alone": 146, "small_distilled": 74, "left_out": 206, "left_out_on_class": 133,
               "left_out_corrected": 109, "left_out_corrected_on_class": 14, "kept_only_percent": 47.3, "kept_only_corrected_percent": 13.2}


# ----------------------------------------------------------------------------- the report


def best_shift(logits: torch.Tensor, labels: torch.Tensor, classes: list[int], sign: float, shifts: list[float]) -> float:
    """The shift of ``shifts`` (added to ``classes``' logits times ``sign``) with the fewest errors
    on the held-out images (the smallest of equals)."""
    errors = [int((shifted(logits, classes, sign * s).argmax(-1) != labels).sum()) for s in shifts]
    return float(shifts[int(np.argmin(errors))])


def shifted(logits: torch.Tensor, classes: list[int], shift: float) -> torch.Tensor:
    out = logits.clone()
    out[:, classes] += shift
    return out


class TestErrors:
    """Test errors of systems as counts of the test images, with bootstrap intervals over images
    (paired: every system on the same draws; a row of several seeds has them resampled too:
    :mod:`asrkd.stats`)."""

    def __init__(self, stats, replicates: int, labels: torch.Tensor, test_ids: list[str]):
        """``stats``: the ``stats`` section (confidence, seed); ``replicates``: ``images.replicates``."""
        self.labels, self.ids = labels, test_ids
        self.bootstrap = Bootstrap(test_ids, int(replicates), stats.confidence, stats.seed)

    def add(self, key: str, logits: list[torch.Tensor], of_class: int | None = None) -> dict:
        """{"errors" (the mean over the seeds' logits), "errors_ci", "seeds", and with ``of_class``
        "errors_on_class"} over the test images."""
        hits = [(z.argmax(-1) == self.labels).cpu().numpy().astype(int) for z in logits]
        interval = self.bootstrap.add(key, UtteranceCounts.from_tables([{u: [int(h), 1] for u, h in zip(self.ids, seed)} for seed in hits]))
        count = len(self.ids)
        per_seed = [int(count - seed.sum()) for seed in hits]
        out = {"system": key, "errors": round(float(np.mean(per_seed)), 1), "errors_ci": [round(count * (1 - hi)) for hi in interval["ci"][::-1]],
               "test_images": count, "seeds": len(hits), "errors_per_seed": per_seed}
        if of_class is not None:
            out["errors_on_class"] = round(float(np.mean([((1 - h) * (self.labels == of_class).cpu().numpy()).sum() for h in hits])), 1)
        return out

    def fewer(self, a: str, b: str) -> dict:
        """Errors of b minus errors of a (a's improvement over b) with its interval, as counts."""
        diff = self.bootstrap.difference(a, b)
        count = len(self.ids)
        return {"estimate": round(count * diff["estimate"], 1), "ci": [round(count * x) for x in diff["ci"]], "p_above_zero": diff["p_above_zero"]}

    def gap_closed(self, part: str, small: str, big: str) -> dict:
        """The share of big's fewer errors than small that part has too: (small - part) / (small - big) in errors."""
        return self.bootstrap.share(part, small, big)


def history_of(exp: Path, name: str, held_out: int) -> dict:
    """A net's curves: training-sample and held-out errors (%) per epoch, its best (scored) epoch."""
    history = read_history(Layout(exp).model(name))
    held = [100 * (1 - h["valid_frame_accuracy"]) for h in history]
    return {"epochs": len(history), "best_epoch": int(np.argmin(held)), "held_out_images": held_out,
            "held_out_error_percent": [round(x, 3) for x in held],
            "train_error_percent": [round(100 * (1 - h["train_frame_accuracy"]), 3) for h in history],
            "train_loss": [round(h["train_cross_entropy"], 4) for h in history]}


def every_net(icfg, teacher: str | None) -> list[str]:
    """Every net stages 1 and 2 train, in their order (the teacher's seeds and the students only once it is chosen)."""
    nets = [replicate_name(SMALL, r) for r in range(int(icfg.seeds))] + list(big_nets(icfg))
    if teacher is None:
        return nets
    names = headline_names(icfg, teacher)
    width, temperature = int(icfg.small.width), float(icfg.temperature)
    nets += names["big"][1:] + names["small_distilled"]
    if icfg.function_matching:
        shift = int(icfg.function_matching.jitter)
        nets += [control_name(shift), matching_name(icfg, width, temperature, shift)]
    nets += [student_name(icfg, int(w), float(t)) for w in icfg.widths for t in icfg.temperatures]
    return nets + [student_name(icfg, width, temperature, left_out_tag(icfg)), student_name(icfg, width, temperature, kept_tag(icfg))]


def run_report(cfg) -> None:
    """Stage 3: ``results/<dataset>/report.{json,md}``, ``errors.png``, ``temperature_width.png``,
    ``curves.png``; while nets are missing (stages 1–2 run for hours and resume), the nets
    trained so far: report.{json,md} and curves.png (:func:`progress_report`)."""
    exp, icfg = Path(cfg.exp_dir), cfg.images
    candidates_done = all(trained(exp, name) for name in big_nets(cfg.images))
    missing = [name for name in every_net(cfg.images, chosen_big(cfg.exp_dir, cfg.images) if candidates_done else None) if not trained(exp, name)]
    if missing or not candidates_done:
        progress_report(cfg, missing)
        return
    images = ImageSet(cfg)
    data, _, valid_idx, _ = images.load()
    _, _, test_idx = images.split()
    store = data.frames.store
    test_labels, valid_labels = data.pdf_ids[torch.from_numpy(test_idx)], data.pdf_ids[torch.from_numpy(valid_idx)]
    errors = TestErrors(cfg.stats, cfg.images.replicates, test_labels, [store.utt_ids[i] for i in test_idx])
    batch = int(cfg.eval.batch_size)

    def logits_of(name: str, indices: np.ndarray) -> torch.Tensor:
        return predict_logits(load_model(model_path(exp, f"{name}@best"), data.pdf_ids.device), data, indices, batch)

    width, temperature = int(icfg.small.width), float(icfg.temperature)
    teacher = chosen_big(cfg.exp_dir, cfg.images)
    seeds = headline_names(cfg.images, teacher)
    rows = {key: errors.add(key, [logits_of(name, test_idx) for name in names]) for key, names in seeds.items()}
    rows["big"]["fewer_than_small_alone"] = errors.fewer("big", "small_alone")
    teacher_row = "big"
    if ensemble_teacher(cfg.images):  # the teacher: the big seeds' average probabilities, scored as one system
        average = average_softmax(torch.stack([logits_of(name, test_idx) for name in seeds["big"]]), 1.0).log()
        rows["big_ensemble"] = errors.add("big_ensemble", [average]) | {"nets": seeds["big"]}
        rows["big_ensemble"]["fewer_than_small_alone"] = errors.fewer("big_ensemble", "small_alone")
        teacher_row = "big_ensemble"
    elif len(seeds["big"]) > 1:  # not the teacher: the held-out evidence that one net teaches as well as their average
        average, held_out_errors = seeds_average(logits_of, seeds["big"], test_idx, valid_idx, valid_labels)
        rows["big_average"] = errors.add("big_average", [average]) | {
            "nets": seeds["big"], "held_out_errors": held_out_errors,
            "seeds_held_out_errors": [held_out_error_count(exp, name, len(valid_idx)) for name in seeds["big"]],
            "fewer_than_small_alone": errors.fewer("big_average", "small_alone")}
    rows["small_distilled"]["fewer_than_small_alone"] = errors.fewer("small_distilled", "small_alone")
    rows["small_distilled"]["gap_closed"] = errors.gap_closed("small_distilled", "small_alone", teacher_row)
    matching = icfg.function_matching
    if matching:
        shift = int(matching.jitter)
        control, student = control_name(shift), matching_name(cfg.images, width, temperature, shift)
        rows["small_jittered"] = errors.add(control, [logits_of(control, test_idx)]) | {"jitter": shift}
        rows["small_jittered"]["fewer_than_small_alone"] = errors.fewer(control, "small_alone")
        rows["function_matching"] = errors.add(student, [logits_of(student, test_idx)]) | {"jitter": shift}
        rows["function_matching"] |= {"fewer_than_control": errors.fewer(student, control), "fewer_than_small_alone": errors.fewer(student, "small_alone"),
                                      "gap_closed": errors.gap_closed(student, "small_alone", teacher_row)}
    shifts = [float(s) for s in np.arange(float(icfg.bias_shifts.start), float(icfg.bias_shifts.stop) + 1e-9, float(icfg.bias_shifts.step))]
    left_out, kept = int(icfg.left_out_class), [int(c) for c in icfg.kept_classes]
    name = student_name(cfg.images, width, temperature, left_out_tag(cfg.images))
    test_logits, held_logits = logits_of(name, test_idx), logits_of(name, valid_idx)
    shift = best_shift(held_logits, valid_labels, [left_out], 1.0, shifts)
    rows["left_out"] = errors.add(name, [test_logits], left_out) | {"class": left_out}
    rows["left_out_corrected"] = errors.add(f"{name} +{shift:g}", [shifted(test_logits, [left_out], shift)], left_out) | {"bias_shift": shift}
    rows["left_out_corrected"]["fewer_than_uncorrected"] = errors.fewer(f"{name} +{shift:g}", name)
    name = student_name(cfg.images, width, temperature, kept_tag(cfg.images))
    test_logits, held_logits = logits_of(name, test_idx), logits_of(name, valid_idx)
    shift = best_shift(held_logits, valid_labels, kept, -1.0, shifts)
    rows["kept_only"] = errors.add(name, [test_logits]) | {"classes": kept}
    rows["kept_only_corrected"] = errors.add(f"{name} -{shift:g}", [shifted(test_logits, kept, -shift)]) | {"bias_shift": -shift}
    rows["kept_only_corrected"]["fewer_than_uncorrected"] = errors.fewer(f"{name} -{shift:g}", name)
    grid = []
    for w in icfg.widths:
        names = [student_name(cfg.images, int(w), float(t)) for t in icfg.temperatures]
        cells = [errors.add(name, [logits_of(name, test_idx)]) | {"temperature": float(t)} for name, t in zip(names, icfg.temperatures)]
        held = [held_out_error_count(exp, name, len(valid_idx)) for name in names]
        grid.append({"width": int(w), "cells": cells, "held_out_errors": held, "best_temperature": float(icfg.temperatures[int(np.argmin(held))])})
    candidates = big_nets(cfg.images)
    errors.add(f"{teacher} alone", [logits_of(teacher, test_idx)])  # seed 0 alone, as each candidate has one seed
    big_nets_compared = [{"name": name, "settings": settings, "held_out_errors": held_out_error_count(exp, name, len(valid_idx)),
                          "test": errors.add(f"{name} alone", [logits_of(name, test_idx)]),  # not "big": the big row's seeds
                          "fewer_than_teacher": None if name == teacher else errors.fewer(f"{name} alone", f"{teacher} alone")}
                         for name, settings in candidates.items()]
    curves = [*(n for names in seeds.values() for n in names), *(n for n in candidates if n != teacher),
               *([control_name(int(matching.jitter)), matching_name(cfg.images, width, temperature, int(matching.jitter))] if matching else [])]
    histories = {name: history_of(exp, name, len(valid_idx)) for name in curves}
    result = {"dataset": str(icfg.dataset), "command": recipe_command("asrkd report-images"), "machine": machine(cfg.train.device),
              "test_images": len(test_idx), "held_out_images": len(valid_idx), "checkpoint": "best.pt: the epoch with the fewest held-out errors",
              "patience": int(icfg.patience), "rows": rows, "seeds": seeds, "temperature_width": grid,
              "teacher": teacher, "teacher_kind": str(icfg.teacher), "teacher_model": candidates[teacher].get("kind", "mlp"),
              "teacher_net": describe_net(candidates[teacher]), "big_nets": big_nets_compared,
              "temperature": temperature, "small_width": width, "big": candidates[teacher],
              "small": OmegaConf.to_container(icfg.small), "function_matching": OmegaConf.to_container(matching) if matching else None,
              "histories": histories,
              "bias_shifts": {"start": shifts[0], "stop": shifts[-1], "step": float(icfg.bias_shifts.step)},
              "paper_mnist": PAPER_MNIST, "bootstrap_replicates": int(icfg.replicates)}
    publish_corpus_report(sections.report_place(cfg), result, markdown(result), {"errors.png": plot_errors, "temperature_width.png": plot_temperature_width,
                                                         "curves.png": plot_curves})
    log.info("images: %s", {key: row["errors"] for key, row in rows.items()})


def progress_report(cfg, missing: list[str]) -> None:
    """The image experiment so far: the small nets alone and every big-net candidate trained,
    each with its held-out errors (where the teacher is chosen) and test errors [95% CI], the
    candidates' difference from the small nets alone, the teacher once every candidate is
    trained, their curves, and the nets still missing. The full report replaces it once stage 2
    is complete; figures of an earlier full report are removed, as they no longer match."""
    exp, icfg = Path(cfg.exp_dir), cfg.images
    images = ImageSet(cfg)
    data, _, valid_idx, _ = images.load()
    _, _, test_idx = images.split()
    store = data.frames.store
    errors = TestErrors(cfg.stats, cfg.images.replicates, data.pdf_ids[torch.from_numpy(test_idx)], [store.utt_ids[i] for i in test_idx])
    batch = int(cfg.eval.batch_size)

    def logits_of(name: str, indices: np.ndarray = test_idx) -> torch.Tensor:
        return predict_logits(load_model(model_path(exp, f"{name}@best"), data.pdf_ids.device), data, indices, batch)

    small = [n for n in (replicate_name(SMALL, r) for r in range(int(icfg.seeds))) if trained(exp, n)]
    rows = {}
    if small:
        rows[SMALL] = errors.add(SMALL, [logits_of(n) for n in small]) | {"nets": small, "settings": OmegaConf.to_container(icfg.small),
                                                                              "held_out_errors": [held_out_error_count(exp, n, len(valid_idx)) for n in small]}
    candidates = big_nets(cfg.images)
    for name, settings in candidates.items():
        if trained(exp, name):
            rows[name] = errors.add(name, [logits_of(name)]) | {"nets": [name], "settings": settings,
                                                                  "held_out_errors": [held_out_error_count(exp, name, len(valid_idx))]}
            if small:
                rows[name]["fewer_than_small_alone"] = errors.fewer(name, SMALL)
    teacher = chosen_big(cfg.exp_dir, cfg.images) if all(trained(exp, n) for n in candidates) else None
    seeds = [n for n in headline_names(cfg.images, teacher)["big"] if trained(exp, n)] if teacher else []
    if len(seeds) > 1:  # the teacher's seeds, and their average (images.teacher=ensemble) with its held-out errors
        settings = candidates[teacher]
        rows["teacher_seeds"] = errors.add("teacher seeds", [logits_of(n) for n in seeds]) | {
            "nets": seeds, "settings": settings, "held_out_errors": [held_out_error_count(exp, n, len(valid_idx)) for n in seeds]}
        average, held_out_errors = seeds_average(logits_of, seeds, test_idx, valid_idx, data.pdf_ids[torch.from_numpy(valid_idx)])
        rows["teacher_ensemble"] = errors.add("teacher ensemble", [average]) | {
            "nets": seeds, "settings": settings, "held_out_errors": [held_out_errors]}
        if small:
            for key in ("teacher_seeds", "teacher_ensemble"):
                rows[key]["fewer_than_small_alone"] = errors.fewer(key.replace("_", " "), SMALL)
    histories = {n: history_of(exp, n, len(valid_idx)) for row in rows.values() for n in row["nets"]}
    result = {"dataset": str(icfg.dataset), "complete": False, "command": recipe_command("asrkd report-images"), "machine": machine(cfg.train.device),
              "test_images": len(test_idx), "held_out_images": len(valid_idx), "checkpoint": "best.pt: the epoch with the fewest held-out errors",
              "rows": rows, "teacher": teacher, "missing": missing, "histories": histories, "bootstrap_replicates": int(icfg.replicates)}
    publish_corpus_report(sections.report_place(cfg), result, progress_markdown(result), {"curves.png": plot_curves}, stale=("errors.png", "temperature_width.png"))
    log.info("images so far: %s; missing %d nets", {key: row["errors"] for key, row in rows.items()}, len(missing))


def progress_markdown(result: dict) -> str:
    rows, held_out = result["rows"], result["held_out_images"]
    lines = [f"# {result['dataset']}: the paper's preliminary experiment (§3), the nets trained so far", "",
             f"Stages 1–2 are under way (they resume where they stopped); this report shows what is trained: test errors of "
             f"{result['test_images']:,} images [95% CI: bootstrap over test images, {result['bootstrap_replicates']:,} replicates; the small "
             f"nets' row: the mean of its seeds, resampled too], errors on the {held_out:,} held-out training images at each net's "
             "best epoch (where it stops, where it is scored, and where the teacher is chosen; never the test set).", "",
             "| net | settings | seeds | held-out errors | best epoch | test errors [95% CI] | fewer test errors than the small nets alone [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        settings = row["settings"]
        described = f"{settings['layers']}x{settings['width']}, no regularization" if name == SMALL else describe_big(settings)
        best = ", ".join(str(result["histories"][n]["best_epoch"] + 1) for n in row["nets"])
        fewer = fewer_cell(row["fewer_than_small_alone"]) if "fewer_than_small_alone" in row else "–"
        teacher = " (the teacher)" if name == result["teacher"] else ""
        name = {"teacher_seeds": f"{result['teacher']}, every seed", "teacher_ensemble": f"{result['teacher']}, the seeds' average"}.get(name, name)
        lines.append(f"| {name}{teacher} | {described} | {row['seeds']} | {', '.join(map(str, row['held_out_errors']))} | {best} "
                     f"| {errors_cell(row)} | {fewer} |")
    ensemble = rows.get("teacher_ensemble")
    lines += ["", (f"The teacher: {result['teacher']}, the big net with the fewest held-out errors." if result["teacher"] else
                   "The teacher is chosen once every big-net candidate is trained."),
              (f"Its {len(ensemble['nets'])} seeds' average softmax (images.teacher=ensemble) makes {ensemble['held_out_errors'][0]} held-out "
               f"errors, its seeds {', '.join(map(str, rows['teacher_seeds']['held_out_errors']))}: the held-out evidence for teaching with "
               "one net or with their average." if ensemble else ""),
              f"Still to train ({len(result['missing'])}): {', '.join(result['missing'])}." if result["missing"] else "",
              f"Training curves: curves.png (report.json \"histories\"). Command: `{result['command']}`. Machine: {result['machine']}.", ""]
    return "\n".join(lines)


def errors_cell(row: dict) -> str:
    lo, hi = row["errors_ci"]
    return f"{row['errors']:g} [{lo}, {hi}]"


def fewer_cell(diff: dict) -> str:
    lo, hi = diff["ci"]
    return f"{diff['estimate']:+g} [{lo:+d}, {hi:+d}]"


def seeds_note(row: dict) -> str:
    return f"{row['seeds']} seeds" if row["seeds"] > 1 else "1 seed"


def markdown(result: dict) -> str:
    rows, paper, test = result["rows"], result["paper_mnist"], result["test_images"]
    w, t = result["small_width"], result["temperature"]
    big, histories = result["big"], result["histories"]
    ensemble = "big_ensemble" in rows
    teacher_label = "the big nets' ensemble" if ensemble else "big"

    def epochs(key: str) -> str:
        stopped = [histories[name]["best_epoch"] + 1 for name in result["seeds"][key]]
        return "best epoch " + ", ".join(map(str, stopped))

    lines = [f"# {result['dataset']}: the paper's preliminary experiment (§3)", "",
             f"Test errors of {test:,} images [95% CI: bootstrap over test images, {result['bootstrap_replicates']:,} replicates; rows of several "
             "seeds: their mean, the seeds resampled too]; the paper's MNIST errors beside them as reference (MNIST is the easier set: "
             "compare the pattern, not the counts). Every net is scored at its best.pt, the epoch with the fewest errors on the "
             f"{result['held_out_images']:,} held-out training images; it trains until those have not improved for "
             f"{result['patience']} epochs (big net: {big.get('patience') or result['patience']}), at most the stated epochs.", "",
             "| row | net | test errors [95% CI] | paper (MNIST) | fewer errors than the row it improves on [95% CI] |",
             "|---|---|---|---|---|",
             f"| big net, regularized ({seeds_note(rows['big'])}; {epochs('big')} of ≤ {big['epochs']}) | {describe_big(big)} "
             f"| {errors_cell(rows['big'])} | {paper['big']} | {fewer_cell(rows['big']['fewer_than_small_alone'])} (vs the small net alone) |",
             f"| small net alone ({seeds_note(rows['small_alone'])}; {epochs('small_alone')}) | 2x{w}, no regularization "
             f"| {errors_cell(rows['small_alone'])} | {paper['small_alone']} | – |",
             *([f"| the big nets' ensemble, the teacher (the {len(rows['big_ensemble']['nets'])} seeds' average probabilities) | "
                f"{len(rows['big_ensemble']['nets'])} x {describe_net(big)} | {errors_cell(rows['big_ensemble'])} | – "
                f"| {fewer_cell(rows['big_ensemble']['fewer_than_small_alone'])} (vs the small net alone) |"] if ensemble else []),
             *([f"| the big nets' average probabilities, not the teacher ({len(average['nets'])} seeds; held-out errors {average['held_out_errors']}, "
                f"the seeds' {', '.join(map(str, average['seeds_held_out_errors']))}) | {len(average['nets'])} x {describe_net(big)} "
                f"| {errors_cell(average)} | – | {fewer_cell(average['fewer_than_small_alone'])} (vs the small net alone) |"]
               if (average := rows.get("big_average")) else []),
             f"| small net distilled, T = {t:g} ({seeds_note(rows['small_distilled'])}, "
             f"{'every seed from the ensemble' if ensemble else 'seed r from big net r'}; {epochs('small_distilled')}) | 2x{w} "
             f"| {errors_cell(rows['small_distilled'])} | {paper['small_distilled']} | {fewer_cell(rows['small_distilled']['fewer_than_small_alone'])} (vs alone) |"]
    if "function_matching" in rows:
        control, matched = rows["small_jittered"], rows["function_matching"]
        lines += [f"| small net alone on jittered views (control; 1 seed) | 2x{w}, jitter ±{control['jitter']} px "
                  f"| {errors_cell(control)} | – | {fewer_cell(control['fewer_than_small_alone'])} (vs alone) |",
                  f"| small net, function matching: big net on the fly on its jittered view, T = {t:g} (1 seed) | 2x{w} "
                  f"| {errors_cell(matched)} | – | {fewer_cell(matched['fewer_than_control'])} (vs its control) |"]
    lo = rows["left_out"]
    c = lo["class"]
    corrected = rows["left_out_corrected"]
    lines += [f"| class {c} left out of the transfer set | 2x{w}, T = {t:g} | {errors_cell(lo)} ({lo['errors_on_class']:g} on class {c}) "
              f"| {paper['left_out']} ({paper['left_out_on_class']} on 3s) | – |",
              f"| the same, bias of class {c} raised by {corrected['bias_shift']:g} | 2x{w} | {errors_cell(corrected)} "
              f"({corrected['errors_on_class']:g} on class {c}) | {paper['left_out_corrected']} ({paper['left_out_corrected_on_class']} on 3s) "
              f"| {fewer_cell(corrected['fewer_than_uncorrected'])} (vs uncorrected) |"]
    kept, kept_corrected = rows["kept_only"], rows["kept_only_corrected"]
    classes = " and ".join(str(k) for k in kept["classes"])
    lines += [f"| classes {classes} only in the transfer set | 2x{w}, T = {t:g} | {errors_cell(kept)} ({100 * kept['errors'] / test:.1f}%) "
              f"| {paper['kept_only_percent']}% | – |",
              f"| the same, biases of {classes} lowered by {-kept_corrected['bias_shift']:g} | 2x{w} | {errors_cell(kept_corrected)} "
              f"({100 * kept_corrected['errors'] / test:.1f}%) | {paper['kept_only_corrected_percent']}% "
              f"| {fewer_cell(kept_corrected['fewer_than_uncorrected'])} (vs uncorrected) |"]
    lines += ["", f"Gap closed, (small alone − distilled) / (small alone − {teacher_label}) in errors: {format_interval(rows['small_distilled']['gap_closed'])} "
              f"(paper, MNIST: {(paper['small_alone'] - paper['small_distilled']) / (paper['small_alone'] - paper['big']):.0%})"
              + (f"; by function matching: {format_interval(rows['function_matching']['gap_closed'])}." if "function_matching" in rows else ".")]
    lines += ["", f"Big nets compared on the {result['held_out_images']:,} held-out images (seed 0 each; images.big and its variants): "
              f"the one with the fewest held-out errors is the teacher of every student and gives the big row's seeds.", "",
              "| big net | dropout (inputs) | jitter | held-out errors | test errors [95% CI] | fewer test errors than the teacher [95% CI] |",
              "|---|---|---|---|---|---|"]
    for net in result["big_nets"]:
        settings, chosen = net["settings"], net["name"] == result["teacher"]
        lines.append(f"| {net['name']}{' (the teacher)' if chosen else ''} | {settings['dropout']:g} ({settings['input_dropout']:g}) "
                     f"| ±{settings['jitter']} px | {net['held_out_errors']} | {errors_cell(net['test'])} "
                     f"| {'–' if chosen else fewer_cell(net['fewer_than_teacher'])} |")
    temperatures = [cell["temperature"] for cell in result["temperature_width"][0]["cells"]]
    lines += ["", f"Test errors of small nets (2 hidden layers of each width) distilled from {'the ensemble' if ensemble else 'big net 0'} at each T; "
              "**bold**: the T with the "
              "fewest held-out errors (the paper: 2.5–4 best for 30 units, anything above 8 for 300 or more).", "",
              "| width | " + " | ".join(f"T = {t:g}" for t in temperatures) + " | held-out errors |", "|---" * (len(temperatures) + 2) + "|"]
    for row in result["temperature_width"]:
        cells = [f"**{errors_cell(cell)}**" if cell["temperature"] == row["best_temperature"] else errors_cell(cell) for cell in row["cells"]]
        lines.append(f"| {row['width']} | " + " | ".join(cells) + " | " + ", ".join(map(str, row["held_out_errors"])) + " |")
    shifts = result["bias_shifts"]
    lines += ["", f"Bias shifts: the value of {shifts['start']:g}–{shifts['stop']:g} (step {shifts['step']:g}) with the fewest errors on "
              f"the {result['held_out_images']:,} held-out training images (never the test set). Training curves: curves.png "
              f"(report.json \"histories\"). Command: `{result['command']}`. Machine: {result['machine']}. Rows of one seed: "
              "single-seed claims, test-set variation only.", ""]
    return "\n".join(lines)


def plot_errors(result: dict, out: Path) -> None:
    keys = ["big", "small_alone", "small_distilled", "left_out", "left_out_corrected", "kept_only_corrected"]
    labels = ["big", "small\nalone", "small\ndistilled", "class\nleft out", "left out,\nbias raised", "two classes,\nbiases lowered"]
    with saved_figure(out, (8, 4.5), "", "test errors (of 10,000)", f"{result['dataset']}: the paper's §3 rows (MNIST: its numbers)",
                      fontsize=8) as ax:
        rows = result["rows"]
        values = [rows[k]["errors"] for k in keys]
        errors = [[rows[k]["errors"] - rows[k]["errors_ci"][0] for k in keys], [rows[k]["errors_ci"][1] - rows[k]["errors"] for k in keys]]
        x = np.arange(len(keys))
        ax.bar(x - 0.2, values, 0.4, yerr=errors, capsize=3, label=result["dataset"])
        paper = result["paper_mnist"]
        reference = [paper["big"], paper["small_alone"], paper["small_distilled"], paper["left_out"], paper["left_out_corrected"],
                     10000 * paper["kept_only_corrected_percent"] / 100]
        ax.bar(x + 0.2, reference, 0.4, label="paper, MNIST")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)


def plot_temperature_width(result: dict, out: Path) -> None:
    with saved_figure(out, (7, 4.5), "T", "test errors (of 10,000)", "Distilled small nets: T against width", fontsize=8) as ax:
        for row in result["temperature_width"]:
            t = [cell["temperature"] for cell in row["cells"]]
            values = [cell["errors"] for cell in row["cells"]]
            errors = [[c["errors"] - c["errors_ci"][0] for c in row["cells"]], [c["errors_ci"][1] - c["errors"] for c in row["cells"]]]
            ax.errorbar(t, values, yerr=errors, marker="o", capsize=3, label=f"2 x {row['width']} units")
        ax.set_xscale("log")


def plot_curves(result: dict, out: Path) -> None:
    """Held-out (solid) and training-sample (dotted) errors per epoch of every headline net; a dot at each scored epoch."""
    with saved_figure(out, (8, 5), "epoch", "errors (%)", f"{result['dataset']}: training curves (scored: best held-out epoch)",
                      fontsize=8) as ax:
        for i, (name, history) in enumerate(result["histories"].items()):
            color = f"C{i % 10}"
            epochs = np.arange(1, history["epochs"] + 1)
            ax.plot(epochs, history["held_out_error_percent"], color=color, label=name)
            ax.plot(epochs, history["train_error_percent"], color=color, linestyle=":")
            best = history["best_epoch"]
            ax.plot([best + 1], [history["held_out_error_percent"][best]], "o", color=color)
        ax.set_yscale("log")


# the types of images.* that its defaults (images.yaml) do not show
