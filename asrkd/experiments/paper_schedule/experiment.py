"""The paper network's schedule, chosen on the validation speakers (never on test): run_paper.sh stage 1.

51M parameters (8 x 2560) on AN4's 0.7 h over-fit within a few epochs, so the schedule the
paper-size models train with (learning rate, dropout, batch size, epochs) is chosen first, by a
short sweep: one candidate per ``paper_schedule.learning_rates`` and ``paper_schedule.dropouts``
(every rate at every dropout) at ``paper_schedule.batch_size`` frames a step, each trained with
early stopping (``paper_schedule.patience`` epochs without a better validation frame accuracy,
at most ``paper_schedule.epochs``). The candidate with the best validation frame accuracy is the
schedule: its learning rate, dropout and batch size, and as epochs the epoch of its best
validation accuracy (the one the report names; a run of that many epochs ends there). Every
candidate's train and validation curves are in the report: where validation turns is where
over-fitting starts. The paper's network has no dropout; on AN4's 0.7 h it may need some (the
4x512 does), and the sweep says so on validation.

Commands: ``train-paper-schedule`` and ``report-paper-schedule`` (frame accuracy only: no decode).
The candidates are ``exp/dnn/schedule_lr<rate>_b<batch>[_drop<dropout>]`` of the config's model
(the recipe's ``model=paper``, bf16 autocast on a CPU with bf16 matrix units).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.errors import StageError
from asrkd.experiments.base import Experiment, Report
from asrkd.layout import Layout, System, names
from asrkd.machine import cpu_description, cpu_flags
from asrkd.nnet import train as train_dnn
from asrkd.nnet.checkpoints import read_history
from asrkd.report import machine, percent, recipe_command, saved_figure
from asrkd.stage import input_record


def candidates(schedule) -> list[tuple[float, float]]:
    """(learning rate, dropout) of every candidate: each rate at each dropout, in that order."""
    return [(float(rate), float(dropout)) for dropout in schedule.dropouts for rate in schedule.learning_rates]


def candidate_cfg(cfg, rate: float, dropout: float):
    """The config one candidate trains with: the sweep's batch, rate, dropout, ceiling and patience
    (named without a dropout where it has none, as the sweep's first candidates were)."""
    scfg = cfg.paper_schedule
    name = f"schedule_lr{rate:g}_b{int(scfg.batch_size)}" + (f"_drop{dropout:g}" if dropout else "")
    return OmegaConf.merge(cfg, {"train": {"name": name, "lr": rate, "batch_size": int(scfg.batch_size), "epochs": int(scfg.epochs),
                                           "patience": int(scfg.patience), "seeds": 1},
                                 "model": {"dropout": dropout}})


def systems(cfg) -> list[System]:
    return [System(str(candidate_cfg(cfg, *candidate).train.name), "model") for candidate in candidates(cfg.paper_schedule)]


def train(cfg) -> None:
    """Each candidate, one after another (each resumes from its last complete epoch)."""
    for candidate in candidates(cfg.paper_schedule):
        train_dnn.run(candidate_cfg(cfg, *candidate))


def candidate_row(exp: Path, system: str) -> dict:
    history = read_history(Layout(exp).model(system))
    record = input_record(Layout(exp).model(system))
    best = record["summary"]["best_epoch"]  # train_stage's: the epoch of the best validation accuracy
    return {"system": system, "lr": record["config"]["train.lr"], "dropout": record["config"]["model.dropout"],
            "batch_size": record["config"]["train.batch_size"],
            "bf16_autocast": record["config"]["train.bf16_autocast"], "epochs_trained": len(history), "best_epoch": best,
            "valid_frame_accuracy": history[best]["valid_frame_accuracy"], "valid_cross_entropy": history[best]["valid_cross_entropy"],
            "train_frame_accuracy": history[best]["train_frame_accuracy"],
            "frames_per_second": sum(h["frames_per_second"] for h in history) / len(history),
            "minutes": sum(h["seconds"] for h in history) / 60, "made_on": record.get("made_on"),
            "curves": [{k: h[k] for k in ("epoch", "train_frame_accuracy", "valid_frame_accuracy", "valid_cross_entropy")} for h in history]}


def plot_curves(result: dict, out: Path) -> None:
    with saved_figure(out, (7, 4), "epoch", "frame accuracy", f"{result['model']}: the schedule sweep (train dashed, validation solid)") as ax:
        for row in result["candidates"]:
            epochs = [c["epoch"] for c in row["curves"]]
            line, = ax.plot(epochs, [c["valid_frame_accuracy"] for c in row["curves"]], marker="o", label=f"lr {row['lr']:g}, dropout {row['dropout']:g}, batch {row['batch_size']}")
            ax.plot(epochs, [c["train_frame_accuracy"] for c in row["curves"]], linestyle="--", color=line.get_color())


def markdown(result: dict) -> str:
    chosen = result["chosen"]
    lines = [f"# The paper network's schedule on AN4 ({result['model']}), chosen on validation", "",
             f"Candidates trained with early stopping (patience {result['patience']} epochs, at most {result['epochs']}); "
             "frame accuracy on the validation speakers (held out of training and of the GMM), never on test.", "",
             "| lr | dropout | batch | bf16 | epochs trained | best epoch | valid frame acc. | valid CE | train frame acc. (sample) | frames/s | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["candidates"]:
        lines.append(f"| {row['lr']:g} | {row['dropout']:g} | {row['batch_size']} | {row['bf16_autocast']} | {row['epochs_trained']} | {row['best_epoch']} | "
                     f"{percent(row['valid_frame_accuracy'])} | {row['valid_cross_entropy']:.3f} | {percent(row['train_frame_accuracy'])} | "
                     f"{row['frames_per_second']:,.0f} | {row['minutes']:.1f} |")
    lines += ["", f"**Chosen**: lr {chosen['lr']:g}, dropout {chosen['dropout']:g}, batch {chosen['batch_size']}, {chosen['epochs']} epochs (the best validation epoch "
              f"{chosen['epochs'] - 1} of the best candidate, counted from 0). One seed per candidate: a single-seed choice.", "",
              f"Command: `{result['command']}`. Machine: {result['machine']}.", ""]
    return "\n".join(lines)


def report(cfg) -> Report:
    exp = Path(cfg.exp_dir)
    rows = [candidate_row(exp, system) for system in names(systems(cfg))]
    best = max(rows, key=lambda r: r["valid_frame_accuracy"])
    scfg = cfg.paper_schedule
    result = {"model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}", "candidates": rows,
              "patience": int(scfg.patience), "epochs": int(scfg.epochs),
              "chosen": {"lr": best["lr"], "dropout": best["dropout"], "batch_size": best["batch_size"], "epochs": best["best_epoch"] + 1, "system": best["system"]},
              "command": recipe_command("asrkd train-paper-schedule"), "machine": machine(cfg.train.device)}
    return Report(result, markdown(result), {"paper_schedule.png": plot_curves})


def chosen_overrides(report_path: Path) -> list[str]:
    """The chosen schedule in ``report_path`` (report.json with this section) as overrides: what
    run_paper.sh gives every later stage (the user's own overrides follow, and win)."""
    chosen = json.loads(Path(report_path).read_text())["paper_schedule"]["chosen"]
    return [f"train.lr={chosen['lr']:g}", f"model.dropout={chosen['dropout']:g}", f"train.batch_size={chosen['batch_size']}",
            f"train.epochs={chosen['epochs']}"]


FP32_BENCH = Path(__file__).resolve().parents[3] / "results" / "bench" / "train_throughput_cpu_paper.json"
RECIPE_MODEL_EPOCHS = 300  # run_paper.sh's models x epochs at about 10 epochs each: 3 baselines, 10 members, 6 students, 3% rows


def check_machine(cfg) -> None:
    """``asrkd check-paper-machine`` (run_paper.sh, before any paper-size training): a GPU torch sees,
    or a CPU with bf16 matrix units (AMX, AVX-512 BF16) and ``train.bf16_autocast=true``; else a
    StageError saying how many hours the recipe would take at this project's measured fp32 speed
    of 8x2560 on a CPU (``FP32_BENCH``) over the main recipe's training frames (``exp_dir``'s)."""
    if str(cfg.train.device) != "cpu" and torch.cuda.is_available():
        return
    units = {"amx_bf16", "avx512_bf16"} & cpu_flags()
    if cfg.train.bf16_autocast and units:
        return
    frames = int(json.loads((sections.layout(cfg).fbank("train") / "index.json").read_text())["offsets"][-1])
    fps = max(run["trainer_fps"] for run in json.loads(FP32_BENCH.read_text())["runs"])
    why = "train.bf16_autocast is off" if units else "this CPU has no bf16 matrix units (AMX, AVX-512 BF16)"
    raise StageError(f"{cpu_description()}: {why}; at the fp32 speed measured for 8x2560 ({fps:,.0f} frames/s, {FP32_BENCH.name}) "
                     f"the recipe's ~{RECIPE_MODEL_EPOCHS} model-epochs of {frames:,} frames take about "
                     f"{RECIPE_MODEL_EPOCHS * frames / fps / 3600:.0f} hours")


EXPERIMENT = Experiment("paper-schedule", "paper_schedule", systems, train=train, report=report, decodes=False, markdown=markdown,
                        commands={"check-paper-machine": check_machine})


if __name__ == "__main__":  # python -m asrkd.experiments.paper_schedule.experiment exp_paper/report/report.json
    print(" ".join(chosen_overrides(Path(sys.argv[1]))))
