#!/usr/bin/env python3
"""Training throughput: the trainer's step against the bare model loop, fused against sequential.

    python bench/train_throughput.py [--exp-dir recipes/an4/exp] [--batch-sizes 1024 4096] [--members 10]
                                     [--out results/bench/train_throughput_<device>.json] [hydra overrides, e.g. model=paper]

In one process on one device, at the configured model and each batch size:
  trainer_fps              asrkd.nnet.train.TrainStep (the trainer's own step: batches gathered from the
                           resident features by index, loss kept on the device)
  bound_fps                the bare loop on pre-made tensors: forward, cross-entropy, backward, Adam
  ratio                    trainer_fps / bound_fps (1.0: the data path costs nothing)
  trainer_unfused_adam_fps the trainer's step with the per-tensor Adam loop instead of its fused one (the control;
                           the trainer fuses under bf16 autocast and on a GPU: asrkd.nnet.train.fused_adam)
  matmul_tflops            the bare matmul of a batch through one hidden layer (batch x hidden by hidden x hidden),
                           in the training dtype (bf16 under autocast), on the configured threads
  matmul_bound_fps         matmul_tflops over the model's 6 FLOP per weight per frame (forward 2, backward 4): what
                           the step would make if every matmul ran at that rate and nothing else cost anything
  share_of_matmul_bound    trainer_fps / matmul_bound_fps
  ensemble_fused_fps       --members models in one StackedDNN step, per member-frame
  ensemble_sequential_fps  the same members stepped one after another, per member-frame
  student_on_the_fly_fps   a student whose soft targets the --members teacher computes in its step
Each is the fastest of three timed runs of --steps steps.
Uses the recipe's features and alignment when --exp-dir has them, else synthetic frames.
The JSON is rewritten after each batch size, so a run cut short keeps what it measured.
--profile PATH: where a batch of 1024 or more misses a target (trainer/bound < 0.9, fused/sequential
< 1.7: the GPU issue's; share of the matmul bound < 0.7), a torch.profiler summary of that batch's
trainer and fused steps, there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile as profiled

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd.cli import load_config  # noqa: E402
from asrkd.distill.losses import distillation_loss  # noqa: E402
from asrkd.distill.student import TeacherOnTheFly  # noqa: E402
from asrkd.files import write_json, write_text  # noqa: E402
from asrkd.nnet.cost import device_name  # noqa: E402
from asrkd.nnet.model import HybridDNN, SplicedFrames, StackedDNN  # noqa: E402
from asrkd.nnet.train import TrainStep, fused_adam  # noqa: E402
from asrkd.nnet.training_set import FrameData
from asrkd.parallel import pick_device  # noqa: E402
from asrkd.stores import FeatureStore  # noqa: E402


def timed(step, steps: int, device: torch.device, repeats: int = 3) -> float:
    """Seconds for ``steps`` calls of ``step``, the fastest of ``repeats`` runs after 3 warm-up
    calls (GPU work waited for): the least disturbed by other load on the machine."""
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tic)
    return best


def frame_data(exp_dir: Path, cfg, device: torch.device) -> tuple[FrameData, str]:
    store_dir, ali = exp_dir / "feats" / "fbank" / "train", exp_dir / "tri" / "ali_train" / "pdf_ids.npy"
    if (store_dir / FeatureStore.INDEX).is_file() and ali.is_file():
        store, labels, source = FeatureStore.load(store_dir, mmap=False), np.load(ali).astype(np.int64), str(store_dir)
    else:
        rng = np.random.default_rng(0)
        store = FeatureStore.from_arrays({f"u{i:04d}": rng.normal(size=(300, 40)) for i in range(800)}, "float16")
        labels, source = rng.integers(0, 2000, store.num_frames), "synthetic (800 x 300 frames, 2000 pdfs)"
    frames = SplicedFrames(store, cfg.model.left_context, cfg.model.right_context, device)
    return FrameData(frames, torch.from_numpy(np.maximum(labels, 0)).to(device), int(labels.max()) + 1), source


def new_model(cfg, data: FrameData, seed: int) -> HybridDNN:
    torch.manual_seed(seed)
    return HybridDNN.from_config(data.frames.store.dim, data.num_pdfs, cfg.model).to(data.pdf_ids.device)


def batches(data: FrameData, batch_size: int):
    """A function giving random batches of frame indexes on the data's device, from a fixed seed."""
    device = data.pdf_ids.device
    rng = torch.Generator(device=device).manual_seed(1)
    return lambda: torch.randint(0, data.frames.store.num_frames, (batch_size,), device=device, generator=rng)


def matmul_tflops(cfg, batch_size: int, device: torch.device, steps: int = 20) -> float:
    """TFLOP/s of the bare (batch x hidden) @ (hidden x hidden) matmul in the training dtype."""
    dtype = torch.bfloat16 if cfg.train.bf16_autocast else torch.float32
    hidden = int(cfg.model.hidden_dim)
    a, b = torch.randn(batch_size, hidden, device=device, dtype=dtype), torch.randn(hidden, hidden, device=device, dtype=dtype)
    return 2 * batch_size * hidden * hidden * steps / timed(lambda: a @ b, steps, device) / 1e12


def flops_per_frame(net: torch.nn.Module) -> int:
    """Multiply-adds of forward (2 FLOP a weight) and backward (4: the input's and the weight's gradients)."""
    return 6 * sum(p.numel() for p in net.parameters() if p.dim() >= 2)


def measure(cfg, data: FrameData, batch_size: int, members: int, steps: int) -> dict:
    device = data.pdf_ids.device
    cfg.train.batch_size = batch_size
    random_batch = batches(data, batch_size)
    per = lambda seconds, models=1: round(steps * batch_size * models / seconds, 1)  # noqa: E731

    trainer = TrainStep(cfg.train, new_model(cfg, data, 0), data, None, data.pdf_ids)
    trainer_s = timed(lambda: trainer(random_batch()), steps, device)
    unfused = TrainStep(cfg.train, new_model(cfg, data, 0), data, None, data.pdf_ids)
    unfused.optimizer = torch.optim.Adam(unfused.optimizer.param_groups[0]["params"], lr=1e-3, fused=False, foreach=False)
    unfused_s = timed(lambda: unfused(random_batch()), steps, device)

    bare = new_model(cfg, data, 0)
    tflops = matmul_tflops(cfg, batch_size, device)
    bound_fps = tflops * 1e12 / flops_per_frame(bare)
    optimizer = torch.optim.Adam(bare.parameters(), lr=1e-3, fused=fused_adam(cfg.train, device))
    x = torch.randn(batch_size, cfg.model.left_context + 1 + cfg.model.right_context, data.frames.store.dim, device=device)
    y = torch.randint(0, data.num_pdfs, (batch_size,), device=device)

    def bare_step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(cfg.train.bf16_autocast)):
            logits = bare(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    bound_s = timed(bare_step, steps, device)
    stack = [new_model(cfg, data, 1 + i) for i in range(members)]
    fused = TrainStep(cfg.train, StackedDNN(stack), data, None, data.pdf_ids)
    fused_s = timed(lambda: fused(random_batch()), steps, device)
    one_by_one = [TrainStep(cfg.train, model, data, None, data.pdf_ids) for model in stack]

    def sequential_step() -> None:
        batch = random_batch()
        for step in one_by_one:
            step(batch)

    sequential_s = timed(sequential_step, steps, device)
    teacher = TeacherOnTheFly(stack, data.frames)
    loss = lambda logits, batch: distillation_loss(logits, teacher.soft_targets(batch, 2.0), data.pdf_ids[batch], 2.0)  # noqa: E731
    distilling = TrainStep(cfg.train, new_model(cfg, data, 0), data, loss, data.pdf_ids)
    on_the_fly_s = timed(lambda: distilling(random_batch()), steps, device)
    return {"batch": batch_size, "trainer_fps": per(trainer_s), "bound_fps": per(bound_s), "ratio": round(bound_s / trainer_s, 3),
            "trainer_unfused_adam_fps": per(unfused_s), "matmul_tflops": round(tflops, 3), "matmul_bound_fps": round(bound_fps, 1),
            "share_of_matmul_bound": round(steps * batch_size / trainer_s / bound_fps, 3),
            "ensemble_fused_fps": per(fused_s, members), "ensemble_sequential_fps": per(sequential_s, members),
            "fused_over_sequential": round(sequential_s / fused_s, 3), "student_on_the_fly_fps": per(on_the_fly_s)}


TARGETS = {"ratio": 0.9, "fused_over_sequential": 1.7, "share_of_matmul_bound": 0.7}  # met at batches of PROFILED_FROM frames or more, else profiled
PROFILED_FROM = 1024


def missed(run: dict) -> list[str]:
    """The targets ``run`` misses (none below PROFILED_FROM frames a batch: small batches are launch-bound by design)."""
    return [key for key, target in TARGETS.items() if run["batch"] >= PROFILED_FROM and run[key] < target]


def profile(cfg, data: FrameData, batch_size: int, members: int, steps: int) -> str:
    """The top operators of the trainer's step and of the fused ensemble's step at ``batch_size``
    (torch.profiler, CPU and CUDA time), as text: where the step's time goes when a target is missed."""
    device = data.pdf_ids.device
    cfg.train.batch_size = batch_size
    random_batch = batches(data, batch_size)
    steppers = {"trainer": TrainStep(cfg.train, new_model(cfg, data, 0), data, None, data.pdf_ids),
                f"fused {members} members": TrainStep(cfg.train, StackedDNN([new_model(cfg, data, 1 + i) for i in range(members)]),
                                                      data, None, data.pdf_ids)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out = []
    for what, step in steppers.items():
        for _ in range(3):  # warm-up, as timed() does
            step(random_batch())
        with profiled(activities=activities) as prof:
            for _ in range(steps):
                step(random_batch())
            if device.type == "cuda":
                torch.cuda.synchronize()
        out.append(f"## {what}, batch {batch_size}, {steps} steps\n\n{prof.key_averages().table(sort_by=sort, row_limit=25)}\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exp-dir", type=Path, default=Path("recipes/an4/exp"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="default results/bench/train_throughput_<device>.json")
    parser.add_argument("--profile", type=Path, default=None, help="where a profile goes if a target is missed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    data, source = frame_data(args.exp_dir, cfg, device)
    name = device_name(device)
    tag = name.replace(" ", "_").lower() if device.type == "cuda" else "cpu"
    out = args.out or Path("results") / "bench" / f"train_throughput_{tag}.json"
    result = {"benchmark": "train_throughput", "command": " ".join(["python", *sys.argv]), "source": source,
              "device": str(device.type), "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_dim}", "num_pdfs": data.num_pdfs,
              "bf16_autocast": bool(cfg.train.bf16_autocast), "compile": cfg.train.compile, "members": args.members,
              "steps": args.steps, "targets": TARGETS, "runs": [], "profile": None}
    for batch in args.batch_sizes:
        result["runs"].append(measure(cfg, data, batch, args.members, args.steps))
        write_json(out, result)
    misses = [run for run in result["runs"] if missed(run)]
    if args.profile and misses:
        largest = max(misses, key=lambda run: run["batch"])
        write_text(args.profile, profile(cfg, data, largest["batch"], args.members, args.steps))
        result["profile"] = {"file": args.profile.name, "batch": largest["batch"], "missed": missed(largest)}
        write_json(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
