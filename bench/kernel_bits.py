#!/usr/bin/env python3
"""Which of a machine's choices change a trained model's bits? (issue 52 item 6: two ensembles with
the same stage fingerprints, both made on an "AMD EPYC (AVX-512)", scored 57.01% and 57.87%)

    python bench/kernel_bits.py [--exp-dir recipes/an4/exp] [--epochs 4] [--out results/bench/kernel_bits]

Trains the AN4 baseline's config (4x512, fp32, its seed; the main recipe's features and
alignment) once per case, each in a fresh process writing exp/dnn/kernel_bits_<case>, and
compares every case's final weights and validation frame accuracy with the first's:

* ``again``: the same process settings, a second time: the control (bit for bit expected);
* ``threads=2``: two OpenMP threads instead of one (another summation order);
* ``avx2``: the kernels an AVX2-only CPU gets: oneMKL's (``MKL_ENABLE_INSTRUCTIONS=AVX2``),
  oneDNN's (``ONEDNN_MAX_CPU_ISA=AVX2``) and ATen's own (``ATEN_CPU_CAPABILITY=avx2``), which
  each library otherwise picks from the CPU's flags at start;
* ``avx512``: the same capped at AVX-512 (on an AMX CPU: no AMX or AVX-512 BF16 tiles; fp32
  gemm should not use them, so this is expected to equal the default).

The config and inputs every case's stage records are the same (its fingerprint differs only by
the model's name): what differs is only what the process chose. Writes <out>.json and <out>.md, naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asrkd.files import write_json, write_text  # noqa: E402
from asrkd.machine import code_commit, cpu_description  # noqa: E402

AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
AVX512 = {"MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}
CASES = {"default": ({}, 1), "again": ({}, 1), "threads=2": ({}, 2), "avx2": (AVX2, 1), "avx512": (AVX512, 1)}


def train(exp_dir: Path, case: str, epochs: int) -> Path:
    env_extra, threads = CASES[case]
    name = "kernel_bits_" + case.replace("=", "")
    env = {k: v for k, v in os.environ.items() if k not in (*AVX2, "ASRKD_RECIPE_COMMAND")} | env_extra
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "asrkd.cli", "train-dnn", "corpus=an4", f"data_dir={exp_dir.parent / 'data'}", f"exp_dir={exp_dir}",
               f"train.name={name}", f"train.epochs={epochs}", f"train.num_threads={threads}", "model=small"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=exp_dir.parent)
    if result.returncode != 0:
        raise SystemExit(f"{case}: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return exp_dir / "dnn" / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exp-dir", type=Path, default=REPO / "recipes" / "an4" / "exp")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "kernel_bits")
    args = parser.parse_args()
    exp_dir = args.exp_dir.resolve()
    dirs = {case: train(exp_dir, case, args.epochs) for case in CASES}
    reference = torch.load(dirs["default"] / "final.pt", weights_only=False)["model"]
    reference_record = json.loads((dirs["default"] / "stage.json").read_text())
    rows = []
    for case, directory in dirs.items():
        weights = torch.load(directory / "final.pt", weights_only=False)["model"]
        record = json.loads((directory / "stage.json").read_text())
        history = json.loads((directory / "history.json").read_text())
        rows.append({"case": case, "environment": CASES[case][0], "threads": CASES[case][1],
                     "same_config_and_inputs": record["config"] == reference_record["config"] and record["inputs"] == reference_record["inputs"],
                     "bitwise_equal": all(torch.equal(weights[k], reference[k]) for k in reference),
                     "max_weight_difference": max(float((weights[k] - reference[k]).abs().max()) for k in reference),
                     "valid_frame_accuracy": [round(h["valid_frame_accuracy"], 5) for h in history]})
    command = "python bench/kernel_bits.py" + (f" --epochs {args.epochs}" if args.epochs != 4 else "")
    result = {"command": command, "machine": cpu_description(), "code": code_commit(), "torch": torch.__version__, "epochs": args.epochs,
              "rows": rows}
    write_json(args.out.with_suffix(".json"), result)
    lines = ["# Which choices of a machine change a trained model's bits", "",
             f"`{command}` on {result['machine']}, torch {result['torch']}, code {result['code']}: the AN4 4x512 baseline's config, "
             f"{args.epochs} epochs, fp32, every case in a fresh process with the same config and inputs (the stage fingerprint "
             "but for the model's name); each compared with `default`.", "",
             "| case | environment | threads | same config and inputs | bit for bit | max weight difference | valid frame accuracy per epoch |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        environment = " ".join(f"{k}={v}" for k, v in row["environment"].items()) or "–"
        lines.append(f"| {row['case']} | {environment} | {row['threads']} | {row['same_config_and_inputs']} "
                     f"| {row['bitwise_equal']} | {row['max_weight_difference']:.2e} | "
                     + ", ".join(f"{100 * a:.2f}%" for a in row["valid_frame_accuracy"]) + " |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
