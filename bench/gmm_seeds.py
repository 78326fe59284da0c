#!/usr/bin/env python3
"""The GMM and the baseline DNN under three draws of the GMM (issue 52 item 3): test WER when the
LM weight is chosen on validation speakers no system trained on, with ``gmm.seed`` (the Gaussian
splits' perturbation) as the one thing that differs.

    python bench/gmm_seeds.py [--recipe-dir recipes/an4] [--seeds default 1 2] [--out results/bench/gmm_seeds]

Needs the main recipe's stages 0-2 (data, lang, features) in the recipe dir. Each seed is the
main recipe's stages 3-7 (GMM, baseline DNN, graph, decode, report) in an exp dir of its own
(``exp_gmm_seed<s>``, its features linked to the recipe's exp/feats): ``recipes/an4/run.sh --stage 3
--stop-stage 7 -- exp_dir=exp_gmm_seed<s> gmm.seed=<s>``; ``default`` leaves gmm.seed unset, so it
is the main recipe's own GMM again (a control: it must equal exp/'s report bit for bit, when
that was made by this code on this CPU). WER is comparable across seeds (the same references);
frame accuracy is not (each DNN is scored against its own GMM's alignment), so it is listed only.
Writes <out>.json and <out>.md, naming the CPU and the code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asrkd.files import write_json, write_text  # noqa: E402
from asrkd.machine import code_commit, cpu_description  # noqa: E402
from asrkd.stats import format_interval  # noqa: E402


def run_seed(recipe_dir: Path, seed: str) -> dict:
    """The main recipe's stages 3-7 for one GMM seed; its report's GMM and baseline rows."""
    exp = recipe_dir / f"exp_gmm_seed{seed}"
    exp.mkdir(exist_ok=True)
    if not (exp / "feats").exists():
        (exp / "feats").symlink_to(Path("..") / "exp" / "feats")
    overrides = [f"exp_dir={exp.name}"] + ([] if seed == "default" else [f"gmm.seed={seed}"])
    command = [str(recipe_dir / "run.sh"), "--stage", "3", "--stop-stage", "7", "--", *overrides]
    result = subprocess.run(command, cwd=recipe_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    report = json.loads((exp / "report" / "report.json").read_text())
    rows = {}
    for system in ("gmm", "baseline"):
        entry = report["systems"][system]
        rows[system] = {"wer": entry["wer"]["test"], "wer_ci": entry["wer_ci"]["test"],
                        "word_errors": sum(entry["wer_details"]["test"][k] for k in ("substitutions", "deletions", "insertions")),
                        "lmwt": entry["lmwt"], "word_ins_penalty": entry["word_ins_penalty"], "lmwt_choice": entry.get("lmwt_choice"),
                        "frame_accuracy": (entry.get("frame_accuracy") or {}).get("test")}
    return {"seed": seed, "command": " ".join(["recipes/an4/run.sh", *command[1:]]), "labels": report["labels"], "rows": rows,
            "tri_pdfs": report["gmm"]["tri_pdfs"]}


def markdown(result: dict) -> str:
    lines = ["# GMM draws: the GMM and the baseline DNN under three GMM seeds", "",
             f"Command: `{result['command']}`. {result['machine']}.", "",
             "One row per GMM seed (`gmm.seed`: the Gaussian splits' perturbation; `default`: unset, the main recipe's GMM); "
             "the validation speakers are held out of every GMM and DNN and tune each system's LM weight and penalty. "
             "[95% CI]: bootstrap over test speakers' utterances as in the main report. Frame accuracy is against each seed's "
             "own alignment (not comparable across rows).", "",
             "| GMM seed | test labels | GMM WER [95% CI] | GMM LMWT, penalty (margin over runner-up, errors) | "
             "DNN WER [95% CI] | DNN LMWT, penalty (margin) | DNN frame acc. (own labels) |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        gmm, dnn = run["rows"]["gmm"], run["rows"]["baseline"]

        def choice(row: dict) -> str:
            margin = (row["lmwt_choice"] or {}).get("margin_errors")
            return f"{row['lmwt']:g}, {row['word_ins_penalty']:g} ({margin if margin is not None else '–'}{', a tie' if (row['lmwt_choice'] or {}).get('tie') else ''})"

        lines.append(f"| {run['seed']} | {run['labels']['test']} | {format_interval({'estimate': gmm['wer'], 'ci': gmm['wer_ci']})} | "
                     f"{choice(gmm)} | {format_interval({'estimate': dnn['wer'], 'ci': dnn['wer_ci']})} | {choice(dnn)} | "
                     f"{100 * dnn['frame_accuracy']:.2f}% |")
    spread = result["spread"]
    lines += ["", f"Test WER over the {len(result['runs'])} GMM seeds: GMM {spread['gmm']['mean']:.2f}% ± {spread['gmm']['std']:.2f} "
              f"(range {spread['gmm']['min']:.2f}–{spread['gmm']['max']:.2f}); baseline DNN {spread['baseline']['mean']:.2f}% ± "
              f"{spread['baseline']['std']:.2f} (range {spread['baseline']['min']:.2f}–{spread['baseline']['max']:.2f}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe-dir", type=Path, default=REPO / "recipes" / "an4")
    parser.add_argument("--seeds", nargs="+", default=["default", "1", "2"])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "gmm_seeds")
    args = parser.parse_args()
    runs = [run_seed(args.recipe_dir.resolve(), seed) for seed in args.seeds]
    spread = {}
    for system in ("gmm", "baseline"):
        wers = [100 * run["rows"][system]["wer"] for run in runs]
        spread[system] = {"mean": statistics.mean(wers), "std": statistics.stdev(wers) if len(wers) > 1 else 0.0, "min": min(wers), "max": max(wers)}
    result = {"command": "python bench/gmm_seeds.py " + " ".join(sys.argv[1:]), "machine": f"{cpu_description()}, code {code_commit()}",
              "runs": runs, "spread": spread}
    write_json(args.out.with_suffix(".json"), result)
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
