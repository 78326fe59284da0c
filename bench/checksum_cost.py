#!/usr/bin/env python3
"""What comparing a model's SHA-256 costs each time it is read (asrkd.files.ALWAYS_VERIFIED): the
checkpoint of the paper's network (8 x 2560, AN4's 400 pdfs) and of the CPU default (4 x 512),
written as training writes them, hashed cold (first read in a process) and warm (the same file
again: the process keeps each file's digest, asrkd.files.verified_digest), against torch.load of
the same file.

    python bench/checksum_cost.py [--repeats 3] [--out results/bench/checksum_cost]

Writes <out>.json and <out>.md; each row names the CPU that measured it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd.cli import load_config  # noqa: E402
from asrkd.files import file_digest, verified_digest, write_json, write_text
from asrkd.machine import cpu_description  # noqa: E402
from asrkd.nnet.model import HybridDNN, model_arguments  # noqa: E402
from asrkd.nnet.train import save_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NUM_PDFS = 400  # AN4's tree (gmm.tree.max_leaves)


def seconds(action, repeats: int) -> float:
    """The fastest of ``repeats`` timings of ``action()``."""
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - tic)
    return best


def measure(model_name: str, repeats: int, scratch: Path) -> dict:
    cfg = load_config([f"model={model_name}"])
    model = HybridDNN(**model_arguments(int(cfg.features.num_mel_bins), NUM_PDFS, cfg.model))
    path = scratch / f"{model_name}.pt"
    save_model(path, model, 0)
    size = path.stat().st_size
    hash_s = seconds(lambda: file_digest(path), repeats)
    verified_digest(path)
    warm_s = seconds(lambda: verified_digest(path), repeats)
    load_s = seconds(lambda: torch.load(path, weights_only=False), repeats)
    return {"model": model_name, "layers": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}", "mb": round(size / 1e6, 1),
            "sha256_s": round(hash_s, 4), "sha256_mb_per_s": round(size / 1e6 / hash_s), "repeat_read_s": round(warm_s, 6),
            "torch_load_s": round(load_s, 4), "sha256_over_load": round(hash_s / load_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "checksum_cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(name, args.repeats, Path(scratch)) for name in ("paper", "small")]
    result = {"command": "python bench/checksum_cost.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
              "machine": cpu_description(), "load_average_1min": round(os.getloadavg()[0], 2), "rows": rows}
    write_json(args.out.with_suffix(".json"), result)
    lines = [f"# The cost of a model's checksum at every read\n", f"`{result['command']}` on {result['machine']} "
             f"(the fastest of the repeats, file in the page cache; load average {result['load_average_1min']} while it ran).\n",
             "| model | checkpoint MB | SHA-256 s | MB/s | again in the same process s | torch.load s | SHA-256 / load |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['mb']} | {r['sha256_s']} | {r['sha256_mb_per_s']} | {r['repeat_read_s']} | {r['torch_load_s']} | "
              f"{r['sha256_over_load']} |" for r in rows]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
