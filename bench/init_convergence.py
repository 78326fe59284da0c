#!/usr/bin/env python3
"""How fast a network starts to learn, by initialization and learning rate: the measurement
behind model=paper's ``init: he`` and recipes/an4/run_paper.sh's ``train.lr``.

    python bench/init_convergence.py [--exp-dir recipes/an4/exp] [--data-dir recipes/an4/data] [--steps 600]
                                     [--every 100] [--runs MODEL:INIT:LR ...] [--out results/bench/init_convergence_<device>.json]
                                     [hydra overrides]

Each run (conf/model/<MODEL>, init default | he, Adam's learning rate) takes the trainer's own
step (TrainStep) at ``train.batch_size`` on the same shuffled frames of the training speakers
from the same seed, and scores frame accuracy on 5000 frames of the validation speakers every
``--every`` steps. One seed, a few hundred steps: it shows how training starts, not where it
ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd import sections  # noqa: E402
from asrkd.cli import load_config  # noqa: E402
from asrkd.files import write_json  # noqa: E402
from asrkd.nnet.cost import device_name  # noqa: E402
from asrkd.nnet.model import HybridDNN  # noqa: E402
from asrkd.nnet.train import TrainStep  # noqa: E402
from asrkd.nnet.training_set import FrameData
from asrkd.parallel import pick_device  # noqa: E402

RUNS = ["paper:default:1e-3", "paper:default:3e-4", "paper:he:1e-3", "paper:he:3e-4", "paper:he:1e-4", "small:default:1e-3"]


def curve(run: str, args: argparse.Namespace, device: torch.device) -> dict:
    model_name, init, lr = run.split(":")
    cfg = load_config([f"data_dir={args.data_dir}", f"exp_dir={args.exp_dir}", f"model={model_name}", f"train.lr={lr}", *args.overrides])
    data = FrameData.load(args.exp_dir, "train", cfg.model, device)
    train_utts, valid_utts = sections.split(cfg).utterances()
    rng = np.random.default_rng(cfg.seed)
    train_idx = torch.as_tensor(rng.permutation(data.frames.frame_indices(train_utts)), device=device)
    held = torch.as_tensor(np.sort(rng.choice(data.frames.frame_indices(valid_utts), 5000, replace=False)), device=device)
    torch.manual_seed(cfg.seed)
    model_cfg = OmegaConf.create({**OmegaConf.to_container(cfg.model), "init": init})
    net = HybridDNN.from_config(data.frames.store.dim, data.num_pdfs, model_cfg).to(device)
    sample = data.frames.frames[train_idx[:100_000]].float().cpu().numpy()
    net.set_normalization(sample.mean(0), sample.std(0))
    step = TrainStep(cfg.train, net, data, None, data.pdf_ids)
    batch, points, losses, tic = int(cfg.train.batch_size), [], [], time.perf_counter()
    for s in range(args.steps):
        losses.append(step(train_idx[torch.arange(s * batch, (s + 1) * batch, device=device) % len(train_idx)], s))
        if (s + 1) % args.every == 0:
            net.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.train.bf16_autocast)):
                accuracy = float((net(data.frames.context(held)).argmax(1) == data.pdf_ids[held]).float().mean())
            net.train()
            points.append({"step": s + 1, "train_cross_entropy": round(float(torch.stack(losses[-args.every:]).sum()) / (args.every * batch), 3),
                           "valid_frame_accuracy": round(accuracy, 4), "seconds": round(time.perf_counter() - tic, 1)})
            print(json.dumps({"run": run, **points[-1]}), flush=True)
    return {"run": run, "model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}", "init": init, "lr": float(lr), "curve": points}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exp-dir", type=Path, default=Path("recipes/an4/exp"))
    parser.add_argument("--data-dir", type=Path, default=Path("recipes/an4/data"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--out", type=Path, default=None, help="default results/bench/init_convergence_<device>.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    runs = [curve(run, args, device) for run in args.runs]
    result = {"benchmark": "init_convergence", "command": " ".join(["python", *sys.argv]), "device": device.type,
              "device_name": device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": int(cfg.train.batch_size),
              "bf16_autocast": bool(cfg.train.bf16_autocast), "valid_frames": 5000, "runs": runs}
    out = args.out or Path("results/bench") / f"init_convergence_{device.type}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
