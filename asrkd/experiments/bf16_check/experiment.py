"""Is bf16 autocast harmless? The check before the paper network trains in it (run_paper.sh stage 1).

The paper-size models train with ``train.bf16_autocast=true`` on a CPU with bf16 matrix units
(AMX, AVX-512 BF16: ~6x the fp32 throughput, results/bench/train_throughput_cpu*.json). Whether
that costs accuracy is measured first on the model every other table uses: the config's model
(the recipe's ``model=small``, 4 x 512) trained ``bf16_check.seeds`` times in fp32 and as many
times in bf16 autocast, everything else the same (data, schedule, seeds: replicate r of each
starts from the same weights and sees the same frame order). The report gives each precision's
test frame accuracy over its seeds and the difference bf16 − fp32 with its interval (paired
draws of test speakers under ``stats.unit=speaker``, the seeds resampled too): an interval that
holds 0 and is narrow against the gains the tables claim says bf16 is harmless at this size.

Commands: ``train-bf16-check`` and ``report-bf16-check`` (frame accuracy only: no decode).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from asrkd.evaluate import bootstrap_key, experiment_scoring
from asrkd.experiments.base import Experiment, Report
from asrkd.layout import System, names
from asrkd.nnet import train as train_dnn
from asrkd.nnet.train import replicate_systems
from asrkd.report import machine, resampled
from asrkd.stats import format_interval

PRECISIONS = {"fp32": False, "bf16": True}


def precision_cfg(cfg, precision: str):
    """The config of one precision's models: ``bf16check_<precision>`` and its seeds."""
    return OmegaConf.merge(cfg, {"train": {"name": f"bf16check_{precision}", "bf16_autocast": PRECISIONS[precision],
                                           "seeds": int(cfg.bf16_check.seeds)}})


def systems(cfg) -> list[System]:
    return [spec for precision in PRECISIONS for spec in replicate_systems(precision_cfg(cfg, precision).train)]


def train(cfg) -> None:
    for precision in PRECISIONS:
        train_dnn.run(precision_cfg(cfg, precision))


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# bf16 autocast against fp32 ({result['model']}, {result['seeds']} seeds each)", "",
             f"| precision | seeds | {result['test']} frame accuracy [95% CI] | valid frame accuracy | per seed ({result['test']}) |",
             "|---|---|---|---|---|"]
    for precision, row in rows.items():
        lines.append(f"| {precision} | {row['seeds']} | {format_interval(row['test'])} | {100 * row['valid']:.2f}% | "
                     + ", ".join(f"{100 * a:.2f}%" for a in row["per_seed"]) + " |")
    difference = result["difference"]
    lines += ["", f"bf16 − fp32: {format_interval(difference, signed=True)} points (P > 0: {difference['p_above_zero']:.2f}); "
              f"[95% CI]: bootstrap over whole {result['test']} {resampled(result['unit'])}, paired, the seeds resampled too.", "",
              f"Command: `{result['command']}`. Machine: {result['machine']}.", ""]
    return "\n".join(lines)


def report(cfg) -> Report:
    evaluation, sets, command = experiment_scoring(cfg, "asrkd report-bf16-check")
    rows, keys = {}, {}
    for precision in PRECISIONS:
        replicates = names(replicate_systems(precision_cfg(cfg, precision).train))
        entry = evaluation.entry(replicates, sets)
        keys[precision] = bootstrap_key(replicates)
        rows[precision] = {"systems": replicates, "seeds": len(replicates), "valid": entry["frame_accuracy"]["valid"],
                           "test": evaluation.frames.interval(keys[precision]),
                           "per_seed": entry.get("per_seed", {}).get(f"{evaluation.primary}_frame_accuracy",
                                                                   [entry["frame_accuracy"][evaluation.primary]]),
                           "labels": entry["labels"], "stage": entry["stage"]}
    result = {"model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}", "seeds": int(cfg.bf16_check.seeds),
              "test": evaluation.primary, "unit": str(cfg.stats.unit), "rows": rows,
              "difference": evaluation.frames.difference(keys["bf16"], keys["fp32"]),
              "command": command, "machine": machine(cfg.train.device)}
    return Report(result, markdown(result))


EXPERIMENT = Experiment("bf16-check", "bf16_check", systems, train=train, report=report, decodes=False, markdown=markdown)
