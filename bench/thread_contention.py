#!/usr/bin/env python3
"""Training steps per second with torch's threads on cores another process also uses.

    python bench/thread_contention.py [--seconds 8] [--out results/bench/thread_contention.json]

A machine of 2 cores running a recipe beside anything else (a second recipe, the tests, a
background experiment) gives torch's OpenMP threads fewer cores than it has threads. OpenMP's
threads then spin at every barrier waiting for one that is not running; with GNU OpenMP's
default wait policy (spin ~300,000 times, then sleep) a step slows by an order of magnitude.
``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) is what ``asrkd/__init__.py`` sets unless the user's
environment says otherwise; this measures why: each case is a fresh process running the
AN4 baseline's 4x512 model (1,040 inputs, 400 outputs; forward, cross-entropy, backward, SGD)
on batches of 256 random frames for --seconds, alone on the machine ("idle") and beside one
or two processes training the same model on one thread each (as background runs do), at 1 thread and at as many threads as cores with
the default, the active (spin) and the passive (sleep) wait policy. Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKER = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
seconds = float(sys.argv[2])
layers = [torch.nn.Linear(1040, 512), torch.nn.ReLU()]
for _ in range(3):
    layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(512, 400))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
generator = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 1040, generator=generator), torch.randint(0, 400, (256,), generator=generator)
for _ in range(5):  # warm-up
    torch.nn.functional.cross_entropy(model(x), y).backward()
start, steps = time.perf_counter(), 0
while time.perf_counter() - start < seconds:
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    steps += 1
print(steps * 256 / (time.perf_counter() - start))
"""


def frames_per_second(threads: int, policy: str | None, seconds: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(seconds)], env=env, capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip()), 1)


def markdown(result: dict) -> str:
    lines = [f"# torch threads beside other processes ({result['cpu']}, {result['cores']} cores, torch {result['torch']})", "",
             "Frames per second of the 4x512 model's training step (batch 256), each case a fresh process.", "",
             "| load | threads | OMP_WAIT_POLICY | frames/s |", "|---|---|---|---|"]
    lines += [f"| {r['load']} | {r['threads']} | {r['policy'] or 'unset (GNU default)'} | {r['frames_per_second']:,.0f} |" for r in result["runs"]]
    return "\n".join(lines + ["", f"Command: `{result['command']}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "thread_contention.json")
    args = parser.parse_args()
    import torch

    from asrkd.nnet.cost import device_name
    from asrkd.files import write_json, write_text

    cores = os.cpu_count() or 1
    cases = [(1, None), (cores, None), (cores, "ACTIVE"), (cores, "PASSIVE")]
    runs = []
    for load, busy_processes in (("idle", 0), ("one other training", 1), ("two other trainings", 2)):
        busy = [subprocess.Popen([sys.executable, "-c", WORKER, "1", "1e9"], stdout=subprocess.DEVNULL) for _ in range(busy_processes)]
        try:
            time.sleep(3.0 if busy else 0.0)  # their torch imported and training
            for threads, policy in cases:
                runs.append({"load": load, "threads": threads, "policy": policy, "frames_per_second": frames_per_second(threads, policy, args.seconds)})
                print(runs[-1], flush=True)
        finally:
            for process in busy:
                process.kill()
                process.wait()
    command = "python bench/thread_contention.py" + (f" --seconds {args.seconds:g}" if args.seconds != 8.0 else "")
    result = {"benchmark": "thread_contention", "command": command, "cpu": device_name(torch.device("cpu")), "cores": cores,
              "torch": torch.__version__, "python": platform.python_version(), "seconds": args.seconds, "runs": runs}
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result))


if __name__ == "__main__":
    main()
