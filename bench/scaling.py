#!/usr/bin/env python3
"""Cost against data size: wall time, CPU time and peak memory of each stage on 1x, 3x and 9x
AN4's hours, at jobs.nj=1 and 2 (issue 15).

    python bench/scaling.py [--source-data recipes/an4/data] [--work /tmp/asrkd_scaling]
                            [--scales 1 3 9] [--nj 1 2] [--out results/bench/scaling.json]

The corpus grows honestly: a scale of k holds train and test each with k-1 speed-perturbed
copies (Kaldi's speed perturbation, ``asrkd speed-perturb``: distinct audio, the same
transcripts) beside the original, at factors spread around 1 (3x: 0.9, 1.1; 9x: 0.8 ... 1.2).
Each scale is its own working dir with ``data/{train,test,local/dict}``; every stage runs as
``asrkd <command>`` there, as a recipe runs it. A stage that splits over jobs (features, the
align stage, decoding) runs once per ``--nj`` on the same inputs (its outputs removed in
between); the others (GMM training, one DNN epoch, soft targets, the graph) run once at nj=1.
Decoding is the GMM's: a one-epoch DNN's flat posteriors keep far more hypotheses within the
beam than a trained model's, so decoding with it would measure an undertrained model's search.
Peak memory is that of the stage's whole process tree (its job workers included), sampled
every 0.1 s from /proc. The slope of log(wall) on log(hours) is each stage's growth; the JSON
also extrapolates every stage to 100 h and 1000 h of training audio along it, the PNG draws
wall time against hours on log-log axes and the ``.md`` is the table README quotes
(``--report-only`` redraws both from the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPEEDS = {1: [], 3: [0.9, 1.1], 9: [0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2]}
# (stage label, asrkd command, overrides, outputs removed before each nj, whether it splits over jobs)
STAGES = [
    ("make-feats", "make-feats", [], ["exp/feats"], True),
    ("train-gmm", "train-gmm", ["features.sets=[]"], ["exp/mono", "exp/tri"], True),
    ("align", "align", [], ["exp/tri/ali_train", "exp/tri/ali_test"], True),
    ("train-dnn (1 epoch)", "train-dnn", ["train.epochs=1"], [], False),
    ("soft-targets (T=2)", "soft-targets", ["distill.teacher=baseline", "distill.temperatures=[2]", "distill.logit_matching=false"], [], False),
    ("make-graph", "make-graph", [], [], False),
    ("decode (gmm)", "decode", ["decode.systems=[gmm]"], ["exp/decode"], True),
]


def process_tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(p, 0) for p in tree)


def measure(command: list[str], cwd: Path, log_path: Path) -> dict:
    """Run ``command`` in ``cwd``: wall seconds, CPU seconds of it and its children, peak tree RSS."""
    with open(log_path, "w") as log:
        tic = time.time()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, process_tree_rss(process.pid))
            time.sleep(0.1)
        wall = time.time() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}; see {log_path}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def asrkd(command: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "asrkd.cli", command, "data_dir=data", "exp_dir=exp", "features.sets=[train,test]", *overrides]


def prepare_pool(source: Path, pool: Path) -> None:
    """pool/data/{train,test}_sp: the source sets and their copies at every speed any scale uses."""
    speeds = sorted({s for scale in SPEEDS.values() for s in scale})
    for name in ("train", "test"):
        if (pool / "data" / f"{name}_sp" / "utt2spk").is_file():
            continue
        (pool / "data").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / name, pool / "data" / name, dirs_exist_ok=True)
        subprocess.run([sys.executable, "-m", "asrkd.cli", "speed-perturb", "data_dir=data", "exp_dir=exp", f"perturb.source={name}",
                        f"perturb.speeds=[{','.join(map(str, speeds))}]", "prep.subset_fractions=[]"], cwd=pool, check=True)


def prepare_scale(source: Path, pool: Path, work: Path, scale: int) -> None:
    """work/data: train and test with the copies at this scale's speeds, the source's dictionary."""
    from asrkd.data import DataDir

    prefixes = tuple(f"sp{s:g}-" for s in SPEEDS[scale])
    for name in ("train", "test"):
        if (work / "data" / name / "utt2spk").is_file():
            continue
        full = DataDir.read(pool / "data" / f"{name}_sp")
        full.subset([u for u in full.utt_ids if u.startswith(prefixes) or not u.startswith("sp")]).write(work / "data" / name)
    shutil.copytree(source / "local" / "dict", work / "data" / "local" / "dict", dirs_exist_ok=True)


def hours(work: Path, name: str) -> float:
    record = json.loads((work / "exp" / "feats" / "fbank" / name / "stage.json").read_text())
    return record["summary"]["frames"] / 100 / 3600


def growth(rows: list[dict], stage: str, nj: int) -> dict | None:
    """Least-squares slope of log(wall) on log(train hours), and the wall time it implies at 100 h and 1000 h."""
    points = [(r["train_hours"], r["stages"][stage][str(nj)]["wall_s"]) for r in rows if str(nj) in r["stages"].get(stage, {})]
    if len(points) < 2:
        return None
    xs, ys = [math.log(h) for h, _ in points], [math.log(max(w, 1e-3)) for _, w in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    h_last, w_last = points[-1]
    return {"exponent": round(slope, 2), **{f"wall_h_at_{h}h": round(w_last * (h / h_last) ** slope / 3600, 2) for h in (100, 1000)}}


def plot(result: dict, out: Path) -> None:
    from asrkd.report import saved_figure

    with saved_figure(out, (7.5, 5), "training audio (hours)", "wall time (s)", "asrkd stage cost against data size (AN4 x1, x3, x9)",
                      fontsize=7, loc="upper left") as ax:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for index, (stage, *_) in enumerate(STAGES):  # a colour per stage, a line style per nj
            for nj in result["nj"]:
                points = [(r["train_hours"], r["stages"][stage][str(nj)]["wall_s"]) for r in result["scales"] if str(nj) in r["stages"][stage]]
                if points:
                    g = result["growth"][stage].get(str(nj))
                    label = f"{stage} nj={nj}" + (f" (slope {g['exponent']})" if g else "")
                    ax.plot(*zip(*points), marker="o", color=f"C{index}", linestyle="-" if nj == 1 else "--", label=label)


def markdown(result: dict) -> str:
    """The table README quotes: wall time per stage and scale, peak memory, growth and what it implies."""
    scales = result["scales"]
    hours = " / ".join(f"{r['train_hours']:.2f}" for r in scales)
    lines = [f"| stage | nj | wall s at {hours} h of train | peak MB at {scales[-1]['train_hours']:.2f} h | peak GB at 100 h (linear) | growth exponent "
             "| wall h at 100 h (fitted / linear) | wall h at 1000 h (fitted / linear) |", "|---|---|---|---|---|---|---|---|"]
    for stage, by_nj in result["growth"].items():
        for nj, growth in by_nj.items():
            walls = " / ".join(f"{r['stages'][stage][nj]['wall_s']:.1f}" for r in scales)
            peak = scales[-1]["stages"][stage][nj]["peak_rss_mb"]
            per_hour = scales[-1]["stages"][stage][nj]["wall_s"] / scales[-1]["train_hours"] / 3600  # linear from the largest scale
            lines.append(f"| {stage} | {nj} | {walls} | {peak:.0f} | {peak / 1024 * 100 / scales[-1]['train_hours']:.1f} "
                         f"| {growth['exponent']:.2f} | {growth['wall_h_at_100h']:.2f} / "
                         f"{100 * per_hour:.2f} | {growth['wall_h_at_1000h']:.2f} / {1000 * per_hour:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-data", type=Path, default=REPO / "recipes" / "an4" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/asrkd_scaling"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 3, 9], choices=sorted(SPEEDS))
    parser.add_argument("--nj", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "scaling.json")
    parser.add_argument("--report-only", action="store_true", help="redraw the PNG and table from --out, measuring nothing")
    args = parser.parse_args()
    from asrkd.nnet.cost import cpu_name
    from asrkd.stage import write_json, write_text

    if args.report_only:
        result = json.loads(args.out.read_text())
        plot(result, args.out.with_suffix(".png"))
        write_text(args.out.with_suffix(".md"), markdown(result))
        return

    env_path = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.environ["PYTHONPATH"] = env_path
    source = args.source_data.resolve()
    prepare_pool(source, args.work / "pool")
    rows = []
    for scale in args.scales:
        work = args.work / f"x{scale}"
        prepare_scale(source, args.work / "pool", work, scale)
        shutil.rmtree(work / "exp", ignore_errors=True)  # every stage runs, none is skipped as made before
        subprocess.run(asrkd("prepare-lang"), cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stages: dict[str, dict] = {}
        for label, command, overrides, outputs, split in STAGES:
            stages[label] = {}
            for nj in args.nj if split else [1]:
                for output in outputs:
                    shutil.rmtree(work / output, ignore_errors=True)
                logs = work / "logs"
                logs.mkdir(exist_ok=True)
                stages[label][str(nj)] = measure(asrkd(command, f"jobs.nj={nj}", *overrides), work, logs / f"{command}_nj{nj}.log")
                print(f"x{scale} {label} nj={nj}: {stages[label][str(nj)]}", flush=True)
        rows.append({"scale": scale, "speeds": SPEEDS[scale], "train_hours": round(hours(work, "train"), 3),
                     "test_hours": round(hours(work, "test"), 3), "stages": stages})
    result = {
        "command": "python bench/scaling.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {cpu_name()}",
        "nj": args.nj, "scales": rows,
        "growth": {label: {str(nj): growth(rows, label, nj) for nj in args.nj if growth(rows, label, nj)} for label, *_ in STAGES},
        "notes": "wall/cpu seconds and peak RSS (MB, whole process tree) per stage; train-dnn is one epoch, decode scores the "
                 "grown test set and the grown train's validation speakers with the triphone GMM; growth: slope of log wall "
                 "time on log training hours, extrapolated from the largest scale",
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(json.dumps(result["growth"], indent=1))


if __name__ == "__main__":
    main()
