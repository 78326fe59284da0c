#!/usr/bin/env python3
"""Cost against data size: wall time, CPU time and peak memory of each stage on 1x, 3x and 9x
AN4's hours (and 27x), at jobs.nj=1 and 2 (issues 15 and 30).

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
every 10 ms from /proc: all resident pages, and the anonymous ones (what the processes hold
themselves; the rest are pages of the stores they map, which the kernel drops under pressure). The slope of log(wall) on log(hours) is each stage's time growth, and
the anonymous peak is fitted as a fixed part plus bytes per frame; the JSON extrapolates every
stage to 100 h and 1000 h of training audio along them, the PNG draws
wall time against hours on log-log axes and the ``.md`` is the table README quotes
(``--report-only`` fits the growth again and redraws both from the JSON's measurements). Each scale's measurement is saved in
``<work>/x<scale>/row.json`` after every stage, on the machine that made it, each stage's with
the code that made it (a hash of asrkd's sources and this script): a rerun after an interruption
(a session's end; x27 alone takes over two hours on 2 cores) keeps what this code measured on
this machine and starts at the first stage and nj not measured, with the earlier stages' outputs
in place, so point ``--work`` at a dir that outlives /tmp (e.g. ``exp_scaling``). ``--stages``
measures only the stages a change touched again (the rest keep their measurements, and the
table gains a code column saying which code made each row). Every measurement starts with its stage's
outputs removed, so that none is skipped as made before.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
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

SPEEDS = {1: [], 3: [0.9, 1.1], 9: [0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2],
          27: [round(0.74 + 0.02 * i, 2) for i in range(27) if i != 13]}  # 0.74 ... 1.26 but 1.0: 26 copies
# (stage label, asrkd command, overrides, outputs removed before each measurement, whether it splits over jobs)
STAGES = [
    ("make-feats", "make-feats", [], ["exp/feats"], True),
    ("train-gmm", "train-gmm", ["features.sets=[]"], ["exp/mono", "exp/tri"], True),
    ("align", "align", [], ["exp/tri/ali_train", "exp/tri/ali_test"], True),
    ("train-dnn (1 epoch)", "train-dnn", ["train.epochs=1"], ["exp/dnn"], False),
    ("soft-targets (T=2)", "soft-targets", ["distill.teacher=baseline", "distill.temperatures=[2]", "distill.logit_matching=false"],
     ["exp/soft_targets"], False),
    ("make-graph", "make-graph", [], ["exp/graph"], False),
    ("decode (gmm)", "decode", ["decode.systems=[gmm]"], ["exp/decode"], True),
]


def read_memory(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, resident bytes, anonymous resident bytes) of ``pid`` from /proc, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        return int(status["PPid"]), int(status["VmRSS"].split()[0]) * 1024, int(status["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError, IndexError, ValueError):
        return None


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants: a scan of every process in /proc (about 3 ms)."""
    parents = {int(entry): memory[0] for entry in os.listdir("/proc") if entry.isdigit() and (memory := read_memory(int(entry)))}
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return tree


def tree_memory(tree: set[int]) -> tuple[int, int]:
    """Resident bytes of the processes in ``tree``, and of them the anonymous ones: memory the processes hold
    themselves. The rest are pages of files they map (feature stores, soft targets), which the kernel drops and
    rereads under pressure: a store larger than memory is read through them, so the anonymous bytes are what
    must stay flat in the hours."""
    memory = [m for pid in tree if (m := read_memory(pid)) is not None]
    return sum(m[1] for m in memory), sum(m[2] for m in memory)


SAMPLE_S = 0.01  # a transient allocation (an evaluation batch) lasts tens of ms: sampled every 0.1 s, a peak was caught or missed at random
RESCAN_EVERY = 25  # samples between scans of /proc for new children (jobs live for seconds); between them only the tree's own status files are read


def measure(command: list[str], cwd: Path, log_path: Path) -> dict:
    """Run ``command`` in ``cwd``: wall seconds, CPU seconds of it and its children, peak tree RSS and anonymous memory."""
    with open(log_path, "w") as log:
        tic = time.time()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        peak_rss = peak_anon = 0
        tree: set[int] = {process.pid}
        for sample in itertools.count():
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if sample % RESCAN_EVERY == 0:
                tree = process_tree(process.pid)
            rss, anon = tree_memory(tree)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(SAMPLE_S)
        wall = time.time() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}; see {log_path}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(peak_rss / 2**20, 1),
            "peak_anon_mb": round(peak_anon / 2**20, 1)}


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


def source_digest() -> str:
    """The hash of the asrkd package's sources and this script: a scale measured by other code is measured again."""
    sha = hashlib.sha256()
    for path in sorted([*(REPO / "asrkd").rglob("*.py"), Path(__file__).resolve()]):
        sha.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:16]


def read_row(path: Path) -> dict | None:
    """A scale's saved measurement (``x<scale>/row.json``), or None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def hours(work: Path, name: str) -> float:
    record = json.loads((work / "exp" / "feats" / "fbank" / name / "stage.json").read_text())
    return record["summary"]["frames"] / 100 / 3600


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    xs, ys = [math.log(x) for x, _ in points], [math.log(max(y, 1e-3)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x."""
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    slope_ = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope_ * mx, slope_


def growth(rows: list[dict], stage: str, nj: int) -> dict | None:
    """Exponents of wall time and of peak anonymous memory in the training hours (slopes on log-log
    axes); wall time at 100 h and 1000 h extrapolated from the largest scale along its exponent;
    memory along a straight line (a fixed part, the runtime's, plus bytes per frame: a power law
    through a fixed floor would hide the per-frame part), with its bytes a frame (100 frames/s)
    and the ratio of the largest scale's peak to the smallest's (the target: flat, <= 1.5)."""
    measured = [(r["train_hours"], r["stages"][stage][str(nj)]) for r in rows if str(nj) in r["stages"].get(stage, {})]
    if len(measured) < 2:
        return None
    h_last, last = measured[-1]
    time_slope = slope([(h, m["wall_s"]) for h, m in measured])
    out = {"exponent": round(time_slope, 2), **{f"wall_h_at_{h}h": round(last["wall_s"] * (h / h_last) ** time_slope / 3600, 2) for h in (100, 1000)}}
    if all("peak_anon_mb" in m for _, m in measured):
        memory = [(h, m["peak_anon_mb"]) for h, m in measured]
        intercept, mb_per_hour = affine(memory)
        out |= {"memory_exponent": round(slope(memory), 2), "anon_ratio": round(memory[-1][1] / memory[0][1], 2),
                "anon_bytes_per_frame": round(mb_per_hour * 2**20 / 360_000, 1),
                **{f"anon_gb_at_{h}h": round((intercept + mb_per_hour * h) / 1024, 2) for h in (100, 1000)}}
    return out


def growths(rows: list[dict], nj_values: list[int]) -> dict:
    """:func:`growth` of every stage at every nj measured."""
    return {label: {str(nj): fit for nj in nj_values if (fit := growth(rows, label, nj))} for label, *_ in STAGES}


def plot(result: dict, out: Path) -> None:
    from asrkd.report import saved_figure

    with saved_figure(out, (7.5, 5), "training audio (hours)", "wall time (s)", "asrkd stage cost against data size (AN4 " + ", ".join(f"x{r['scale']}" for r in result["scales"]) + ")",
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
    """The table README quotes: wall time per stage and scale, peak memory (anonymous, and all
    resident), the growth of each in the hours and what it implies."""
    scales = result["scales"]
    hours = " / ".join(f"{r['train_hours']:.2f}" for r in scales)
    largest = f"{scales[-1]['train_hours']:.2f} h"
    codes = {m.get("code") for r in scales for by_nj in r["stages"].values() for m in by_nj.values()}
    coded = len(codes) > 1  # a column only where rows were measured by different code (--stages); one code: the JSON names it
    lines = [f"| stage | nj | wall s at {hours} h of train | anon MB at {hours} h | anon largest / smallest | resident MB at {largest} "
             "| memory exponent | anon bytes a frame | anon GB at 100 / 1000 h (linear) | time exponent "
             "| wall h at 100 h (fitted / linear) | wall h at 1000 h (fitted / linear) |" + " code |" * coded,
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * coded]
    for stage, by_nj in result["growth"].items():
        for nj, growth in by_nj.items():
            measured = [r["stages"][stage][nj] for r in scales]
            walls = " / ".join(f"{m['wall_s']:.1f}" for m in measured)
            anon = " / ".join(f"{m['peak_anon_mb']:.0f}" if "peak_anon_mb" in m else "–" for m in measured)
            per_hour = measured[-1]["wall_s"] / scales[-1]["train_hours"] / 3600  # linear from the largest scale
            ratio = f"{growth['anon_ratio']:.2f}" if "anon_ratio" in growth else "–"
            memory = (f"{growth['memory_exponent']:.2f} | {growth['anon_bytes_per_frame']:.0f} | "
                      f"{growth['anon_gb_at_100h']:.1f} / {growth['anon_gb_at_1000h']:.1f}" if "anon_ratio" in growth else "– | – | –")
            lines.append(f"| {stage} | {nj} | {walls} | {anon} | {ratio} | {measured[-1]['peak_rss_mb']:.0f} | {memory} "
                         f"| {growth['exponent']:.2f} | {growth['wall_h_at_100h']:.2f} / "
                         f"{100 * per_hour:.2f} | {growth['wall_h_at_1000h']:.2f} / {1000 * per_hour:.2f} |"
                         + (f" {', '.join(sorted({m.get('code', '?') for m in measured}))} |" if coded else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-data", type=Path, default=REPO / "recipes" / "an4" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/asrkd_scaling"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 3, 9], choices=sorted(SPEEDS))
    parser.add_argument("--nj", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "scaling.json")
    parser.add_argument("--stages", nargs="+", choices=[label for label, *_ in STAGES],
                        help="measure only these stages again (default: all); the others keep their saved measurements, whatever code made them")
    parser.add_argument("--report-only", action="store_true", help="fit and redraw the PNG and table from --out, measuring nothing")
    args = parser.parse_args()
    from asrkd.files import write_json, write_text
    from asrkd.machine import cpu_description

    if args.report_only:  # the fits are made again from the measurements
        result = json.loads(args.out.read_text())
        result["growth"] = growths(result["scales"], result["nj"])
        write_json(args.out, result)
        plot(result, args.out.with_suffix(".png"))
        write_text(args.out.with_suffix(".md"), markdown(result))
        return

    env_path = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.environ["PYTHONPATH"] = env_path
    source = args.source_data.resolve()
    prepare_pool(source, args.work / "pool")
    rows = []
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {cpu_description()}"  # family and model: a resume is on one generation
    code = source_digest()
    selected = set(args.stages or [label for label, *_ in STAGES])
    for scale in args.scales:
        work = args.work / f"x{scale}"
        made = {"nj": args.nj, "machine": machine}
        saved = read_row(work / "row.json")
        if saved is not None and "code" in saved["made"]:  # saved before each measurement named its code
            for by_nj in saved["row"]["stages"].values():
                for measured in by_nj.values():
                    measured.setdefault("code", saved["made"]["code"])
            del saved["made"]["code"]
        stages: dict[str, dict] = saved["row"]["stages"] if saved is not None and saved["made"] == made else {}
        kept = sum(1 for label, by_nj in stages.items() for m in by_nj.values() if m["code"] == code or label not in selected)
        if stages:  # the stages' outputs are in place: a stage not measured again reads what the last run left
            print(f"x{scale}: keeping {kept} measurements ({work / 'row.json'})", flush=True)
        else:
            prepare_scale(source, args.work / "pool", work, scale)
            shutil.rmtree(work / "exp", ignore_errors=True)
            subprocess.run(asrkd("prepare-lang"), cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        row = {"scale": scale, "speeds": SPEEDS[scale], "stages": stages}
        for label, command, overrides, outputs, split in STAGES:
            measured = stages.setdefault(label, {})
            for nj in args.nj if split else [1]:
                if label not in selected or measured.get(str(nj), {}).get("code") == code:
                    continue
                for output in outputs:
                    shutil.rmtree(work / output, ignore_errors=True)
                logs = work / "logs"
                logs.mkdir(exist_ok=True)
                measured[str(nj)] = measure(asrkd(command, f"jobs.nj={nj}", *overrides), work, logs / f"{command}_nj{nj}.log") | {"code": code}
                print(f"x{scale} {label} nj={nj}: {measured[str(nj)]}", flush=True)
                write_json(work / "row.json", {"made": made, "row": row})  # a rerun starts after it
        row |= {"train_hours": round(hours(work, "train"), 3), "test_hours": round(hours(work, "test"), 3)}
        rows.append(row)
        write_json(work / "row.json", {"made": made, "row": row})
    result = {
        "command": "python bench/scaling.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "nj": args.nj, "scales": rows,
        "growth": growths(rows, args.nj),
        "notes": "wall/cpu seconds, peak RSS and peak anonymous memory (MB, whole process tree) per stage; train-dnn is one epoch, decode scores the "
                 "grown test set and the grown train's validation speakers with the triphone GMM; growth: slope of log wall "
                 "time on log training hours, extrapolated from the largest scale; anonymous peak fitted as fixed MB + bytes a frame",
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(json.dumps(result["growth"], indent=1))


if __name__ == "__main__":
    main()
