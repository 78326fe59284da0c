#!/usr/bin/env python3
"""Trainer throughput vs the bare model: how much the data path costs (JSON on stdout).

    python bench/bench_train.py [--exp-dir recipes/an4/exp] [hydra overrides, e.g. model=paper]

Measures, for the configured model on this machine:
  trainer_frames_per_second  full training steps with batches gathered from the feature store
  model_frames_per_second    the same steps on pre-made random tensors (no data path)
  data_path_ratio            trainer / model (1.0 = the data path is free)
  gather_frames_per_second   the batch gather alone
Uses the recipe's features and alignment when --exp-dir has them, else synthetic frames.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd.cli import load_config  # noqa: E402
from asrkd.features import FeatureStore  # noqa: E402
from asrkd.nnet import HybridDNN, SplicedFrames, pick_device  # noqa: E402


def timed_steps(step, num_steps: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(num_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exp-dir", type=Path, default=Path("recipes/an4/exp"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    batch_size = int(cfg.train.batch_size)

    store_dir = args.exp_dir / "feats" / "fbank" / "train"
    ali = args.exp_dir / "tri" / "ali_train" / "pdf_ids.npy"
    if (store_dir / FeatureStore.INDEX).is_file() and ali.is_file():
        store, labels, source = FeatureStore.load(store_dir, mmap=False), np.load(ali).astype(np.int64), str(store_dir)
        num_pdfs = int(labels.max()) + 1
    else:
        rng = np.random.default_rng(0)
        store = FeatureStore.from_arrays({f"u{i:04d}": rng.normal(size=(300, 40)) for i in range(800)}, "float16")
        num_pdfs, source = 400, "synthetic"
        labels = rng.integers(0, num_pdfs, store.num_frames)
    frames = SplicedFrames(store, cfg.model.left_context, cfg.model.right_context, device)
    targets = torch.from_numpy(np.maximum(labels, 0)).to(device)
    model = HybridDNN.from_config(store.dim, num_pdfs, cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bool(cfg.train.bf16_autocast))
    rng = np.random.default_rng(1)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(**autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def trainer_step() -> None:
        batch = torch.from_numpy(rng.integers(0, store.num_frames, batch_size)).to(device)
        train_step(frames.context(batch), targets[batch])

    window = cfg.model.left_context + 1 + cfg.model.right_context
    fixed_x = torch.randn(batch_size, window, store.dim, device=device)
    fixed_y = torch.randint(0, num_pdfs, (batch_size,), device=device)

    def gather_step() -> None:
        frames.context(torch.from_numpy(rng.integers(0, store.num_frames, batch_size)).to(device))

    trainer_s = timed_steps(trainer_step, args.steps, device)
    model_s = timed_steps(lambda: train_step(fixed_x, fixed_y), args.steps, device)
    gather_s = timed_steps(gather_step, args.steps, device)
    frames_done = args.steps * batch_size
    print(json.dumps({
        "benchmark": "train_throughput", "command": " ".join(["python", *sys.argv]), "source": source, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}",
        "bf16_autocast": bool(cfg.train.bf16_autocast), "batch_size": batch_size, "num_pdfs": num_pdfs,
        "trainer_frames_per_second": round(frames_done / trainer_s, 1),
        "model_frames_per_second": round(frames_done / model_s, 1),
        "data_path_ratio": round(model_s / trainer_s, 3),
        "gather_frames_per_second": round(frames_done / gather_s, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
