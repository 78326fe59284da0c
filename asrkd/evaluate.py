"""Stage: frame accuracy of the trained DNNs on train / validation / test, as JSON + Markdown.

Frame accuracy is the share of frames whose argmax pdf-id equals the forced alignment's.
``report.json`` has one entry per system under "systems", each with "frame_accuracy":
{"train", "valid", "test"} as fractions; ``report.md`` shows the same as a table. Later
reports (the 3%-data experiment, distillation) add their sections to the same files.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

from asrkd.data import DataDir
from asrkd.nnet import pick_device
from asrkd.train import FrameData, data_split, evaluate_frames, load_system, read_history

log = logging.getLogger(__name__)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def markdown_table(report: dict) -> str:
    lines = [
        f"# {report['corpus']}: frame accuracy and WER",
        "",
        "| system | model | frame acc. train | frame acc. valid | frame acc. test | WER test | WER test (unseen sentences) | LMWT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, system in report["systems"].items():
        acc = system.get("frame_accuracy") or {}
        wer = system.get("wer") or {}
        lines.append(
            f"| {name} | {system['model']} | {percent(acc.get('train'))} | {percent(acc.get('valid'))} | {percent(acc.get('test'))} "
            f"| {percent(wer.get('test'))} | {percent(wer.get('test_unseen'))} | {system.get('lmwt', '–')} |"
        )
    others = {}  # rows added by later reports (distillation), by the command that made them
    for name, system in report["systems"].items():
        if system.get("command", report["command"]) != report["command"]:
            others.setdefault(system["command"], []).append(name)
    lines += ["", f"Command: `{report['command']}`" + "".join(f"; {', '.join(names)}: `{command}`" for command, names in others.items()), "",
              "Frame accuracy: argmax pdf-id vs the triphone GMM's forced alignment; valid = speakers held out of training.",
              "WER: Kaldi WFST decoding (HCLG with a 3-gram LM on the training transcripts), LM weight and insertion penalty",
              "chosen on the validation speakers; unseen = test sentences that never occur in train.", ""]
    gmm = report["gmm"]
    lines.append(f"GMM: {gmm['mono_pdfs']} monophone pdfs -> {gmm['tri_pdfs']} tied triphone states (pdf-ids), "
                 f"trained and aligned in {gmm['seconds']:.0f} s.")
    for name, system in report["systems"].items():
        if "train_seconds" in system:
            what = f"{system['epochs']} epochs" if "epochs" in system else "trained"
            lines.append(f"{name}: {what} in {system['train_seconds']:.0f} s.")
    lines.append(f"Machine: {report['machine']}.")
    return "\n".join(lines) + "\n"


@contextmanager
def saved_figure(out: Path, size: tuple[float, float], xlabel: str, ylabel: str, title: str, **legend) -> Iterator:
    """Axes to draw on; on exit the labels, grid and legend go on and the PNG is written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(**legend)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)


def decoding_result(exp: Path, system: str) -> dict:
    """WER fields of a decoded system (empty when the decode stage has not run for it)."""
    path = exp / "decode" / system / "wer.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    return {"wer": {"test": result["test"]["wer"], "test_unseen": result["test_unseen"]["wer"], "valid": result["valid"]["wer"]},
            "wer_details": {k: result[k] for k in ("test", "test_unseen", "valid")},
            "lmwt": result["lmwt"], "word_ins_penalty": result["word_ins_penalty"],
            "decode_real_time_factor": result["real_time_factor"]}


class FrameScorer:
    """Frame accuracy and cross-entropy of DNN systems (ensembles too) against the alignment.

    The train and test frames are loaded once; each call scores one system on the test set
    and on any named lists of training utterances (train, valid, a subset's train).
    """

    def __init__(self, cfg):
        self.exp, self.batch_size = Path(cfg.exp_dir), cfg.eval.batch_size
        self.device = pick_device(cfg.train.device)
        torch.set_num_threads(int(cfg.train.num_threads))
        self.train = FrameData.load(self.exp, "train", cfg.model, self.device)
        test = FrameData.load(self.exp, "test", cfg.model, self.device)
        self.test = (test, test.labeled(DataDir.read(Path(cfg.data_dir) / "test").utt_ids))

    def score(self, system: str, train_sets: dict[str, list[str]]) -> dict[str, dict]:
        """{set: {"frame_accuracy", "cross_entropy", "frames"}} for each of ``train_sets`` and "test"."""
        model = load_system(self.exp, system, self.device)
        sets = {name: (self.train, self.train.labeled(utts)) for name, utts in train_sets.items()} | {"test": self.test}
        return {name: evaluate_frames(model, data, idx, self.batch_size) for name, (data, idx) in sets.items()}


def merge_into_report(cfg, section: dict, files: tuple[str, ...] = ()) -> dict:
    """Add ``section``'s keys to exp/report/report.json (its "systems" to the systems there),
    rewrite report.md, and copy both and ``files`` (from exp/report) to ``results_dir``.

    Each reporting stage owns its keys, so rerunning one keeps what the others wrote.
    """
    out_dir = Path(cfg.exp_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    systems = {**report.get("systems", {}), **section.get("systems", {})}
    report.update(section)
    report["systems"] = systems
    path.write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(markdown_table(report))
    if cfg.results_dir:
        results_dir = Path(cfg.results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.md", *files):
            shutil.copyfile(out_dir / name, results_dir / name)
        log.info("report copied to %s", results_dir)
    return report


def recipe_command(default: str) -> str:
    """The recipe line that produced the run (recipes export it), else ``default``."""
    return os.environ.get("ASRKD_RECIPE_COMMAND") or default


def run(cfg) -> None:
    exp = Path(cfg.exp_dir)
    train_utts, valid_utts = data_split(cfg)
    results = FrameScorer(cfg).score(cfg.train.name, {"train": train_utts, "valid": valid_utts})
    history = read_history(exp / "dnn" / cfg.train.name)
    gmm_log = json.loads((exp / "tri" / "log.json").read_text())
    report = {
        "corpus": cfg.corpus,
        "command": recipe_command(" ".join(["asrkd", *sys.argv[1:]])),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {pick_device(cfg.train.device)}",
        "gmm": {"mono_pdfs": gmm_log["mono"]["num_pdfs"], "tri_pdfs": gmm_log["tri"]["num_pdfs"],
                "tree": gmm_log["tri"]["tree"], "seconds": gmm_log["mono"]["seconds"] + gmm_log["tri"]["seconds"]},
        "systems": {
            "gmm": {"model": f"tri ({gmm_log['tri']['num_pdfs']} pdfs)", "frame_accuracy": None, **decoding_result(exp, "gmm")},
            cfg.train.name: {
                "model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}",
                "frame_accuracy": {k: v["frame_accuracy"] for k, v in results.items()},
                "cross_entropy": {k: v["cross_entropy"] for k, v in results.items()},
                "frames": {k: v["frames"] for k, v in results.items()},
                "epochs": len(history),
                "train_seconds": sum(h["seconds"] for h in history),
                "history": history,
                **decoding_result(exp, cfg.train.name),
            }
        },
    }
    merge_into_report(cfg, report)
    log.info("frame accuracy: %s", {k: round(v["frame_accuracy"], 4) for k, v in results.items()})
