"""Stage: what a system costs to run, measured once per system (``exp/cost/<system>/cost.json``).

Parameters (an ensemble counts all its members: that is why one distills) and the time to
score 1000 frames: the network's log-posteriors of the test set's first frames, in batches
of ``eval.batch_size`` on ``train.device`` with ``train.num_threads``, the best of three
passes. The record names the machine; reports quote it, so they stay the same when rerun.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from asrkd import sections
from asrkd.files import write_json
from asrkd.machine import cpu_fields, cpu_flags
from asrkd.nnet.checkpoints import load_system, system_dirs
from asrkd.nnet.model import EnsembleDNN, SplicedFrames
from asrkd.parallel import pick_device
from asrkd.stage import plan, read_record
from asrkd.stores import FeatureStore

COST_FRAMES = 20_000  # test frames scored per pass


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 (AVX512-BF16, AMX): bf16 autocast pays only then."""
    name = cpu_fields().get("model name") or platform.processor() or platform.machine()
    native = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpu_flags()]
    return f"{name} ({', '.join(native) if native else 'no native bf16'})"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (with its bf16 support): what timings are quoted against."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def scoring_ms_per_1000_frames(model: torch.nn.Module, frames: SplicedFrames, batch_size: int, passes: int = 3) -> float:
    """Milliseconds to score 1000 frames (log-posteriors), the fastest of ``passes`` passes."""
    device = frames.device
    indices = torch.arange(min(COST_FRAMES, frames.store.num_frames), device=device)
    model.eval()
    best = float("inf")
    for attempt in range(passes + 1):  # pass 0 warms up
        tic = time.perf_counter()
        for start in range(0, len(indices), batch_size):
            torch.log_softmax(model(frames.context(indices[start : start + batch_size])).float(), dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if attempt:
            best = min(best, time.perf_counter() - tic)
    return 1000 * best * 1000 / len(indices)


def system_cost(cfg, system: str) -> dict:
    """The cost record of ``system`` (measured now when it has none, or its model changed)."""
    exp, layout = Path(cfg.exp_dir), sections.layout(cfg)
    out_dir = layout.cost(system)
    test = sections.data_sets(cfg).evaluated[0]
    inputs = {f"model {d.name}": d for d in system_dirs(exp, system)} | {f"{test} features": layout.fbank(test)}
    stage = plan(f"cost {system}", out_dir, sections.settings(cfg, ("eval.batch_size", "train.num_threads", "train.device")), inputs, {"system": system})
    if stage.up_to_date:
        return read_record(out_dir)["summary"]
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    model = load_system(exp, system, device)
    frames = SplicedFrames(FeatureStore.load(layout.fbank(test)), model.config["left_context"],
                           model.config["right_context"], device)
    cost = {"system": system, "parameters": parameters(model), "models": len(model.members) if isinstance(model, EnsembleDNN) else 1,
            "ms_per_1000_frames": round(scoring_ms_per_1000_frames(model, frames, int(cfg.eval.batch_size)), 3),
            "device": device_name(device),
            "threads": torch.get_num_threads(), "batch_size": int(cfg.eval.batch_size), "torch": torch.__version__}
    write_json(out_dir / "cost.json", cost)
    stage.commit(**cost)
    return cost
