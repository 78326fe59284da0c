#!/usr/bin/env python3
"""Planted bugs: does the suite fail when a claim breaks? (a mutation run of our own, issue 57)

    python tools/planted_bugs.py [--only NAME ...] [--out results/bench/planted_bugs]

``--only`` runs the bugs named again and keeps the other rows. Each bug below is one small edit of the code that breaks a promise README or docs/reliability.md
makes (a loss without its T^2, a drop limit not applied, a warning that never fires). For each, in
turn: the edit is made in the work tree, the tests named for it run (`pytest -x` on those node ids
or -k filters), and the edit is undone (also when the run is interrupted). A bug is *caught* when
those tests fail. The tests are the ones meant to guard the promise: a bug they miss is a test to
write, not a reason to widen the list. Writes <out>.json (each bug, its tests, caught, seconds) and
<out>.md (the table and the share caught). Needs AN4 for the end-to-end tests (../shared/corpora).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asrkd.files import write_json, write_text
from asrkd.machine import cpu_description  # noqa: E402


@dataclass(frozen=True)
class Bug:
    name: str
    file: str
    old: str  # found exactly once in file
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids, or a file and "-k EXPR"


BUGS = (
    Bug("frame accuracy counts the frames of utterances the GMM failed to align", "asrkd/evaluate.py",
        "labeled = data.labeled(DataDir.read(Path(cfg.data_dir) / name).utt_ids)",
        "labeled = data.indices(DataDir.read(Path(cfg.data_dir) / name).utt_ids)",
        ("tests/test_reliability.py", "-k", "max_drop_fraction_on_a_set")),
    Bug("the BYOT kd term without its T^2", "asrkd/experiments/self_distillation/loss.py",
        "kd_weight * temperature**2 * soft_cross_entropy(z, teacher, temperature)", "kd_weight * soft_cross_entropy(z, teacher, temperature)",
        ("asrkd/experiments/self_distillation/test_self_distillation.py", "-k", "formula")),
    Bug("stats.unit=speaker ignored between evaluate and the bootstrap", "asrkd/evaluate.py",
        'unit_of = data.utt2spk if scfg.unit == "speaker" else None', "unit_of = None",
        ("tests/test_pipeline.py", "-k", "stats_unit_speaker")),
    Bug("the alignment of a set that trains ignores prep.max_drop_fraction", "asrkd/kaldi/gmm.py",
        "1.0 if scored_only else cfg.prep.max_drop_fraction, out_dir", "1.0, out_dir",
        ("tests/test_reliability.py", "-k", "max_drop_fraction_on_a_set")),
    Bug("the OOV warning never fires", "asrkd/evaluate.py",
        'if out[name]["oov_rate"] > float(cfg.decode.oov_warning):', "if False:",
        ("tests/test_decode.py", "-k", "warning_fires")),
    Bug("prepare-lang skips the case-clash check", "asrkd/kaldi/lang.py",
        "    refuse_case_clashes(*vocabulary(data_dir, sections.data_sets(cfg).corpus()))\n", "",
        ("tests/test_reliability.py", "-k", "another_case")),
    Bug("the distillation loss without its T^2", "asrkd/distill/losses.py",
        "soft = soft_weight * temperature**2 * soft_term(", "soft = soft_weight * soft_term(",
        ("tests/test_distill.py",)),
    Bug("distill.loss ignored: every student trains on the cross-entropy", "asrkd/distill/student.py",
        "term = soft_term_of(str(dcfg.loss))", "term = soft_term_of(DEFAULT_SOFT_TERM)",
        ("tests/test_distill.py", "-k", "reverse_kl")),
    Bug("reverse KL as KL(teacher || student)", "asrkd/distill/losses.py",
        "return (log_probs.exp() * (log_probs - log_targets)).sum(-1).mean()", "return (log_targets.exp() * (log_targets - log_probs)).sum(-1).mean()",
        ("tests/test_distill.py", "-k", "reverse_kl")),
    Bug("prepare-lang fingerprints every dictionary line", "asrkd/kaldi/lang.py",
        'values={"dict": digest(made_of),', 'values={"dict": dictionary_digest(dict_dir),',
        ("tests/test_lang.py", "-k", "dictionary_entry")),
    Bug("--redo decodes every eval set again when one was added", "asrkd/nnet/decode.py",
        "    if record is None:\n        return None\n    before, now", "    if record is None or cfg.get(\"redo\"):\n        return None\n    before, now",
        ("tests/test_kaldi_data.py", "-k", "guide")),
    Bug("a 3% row is its first seed alone", "asrkd/experiments/three_percent/experiment.py",
        'suffix, seeds = "_sp" if perturbed else "", int(cfg.three_percent.seeds)', 'suffix, seeds = "_sp" if perturbed else "", 1',
        ("tests/test_distill.py", "-k", "three_percent")),
    Bug("the hard term averaged over unlabeled frames too", "asrkd/distill/losses.py",
        "labeled = (hard_targets >= 0).sum().clamp(min=1)", "labeled = len(hard_targets)",
        ("tests/test_transfer.py", "-k", "hard_term")),
    Bug("soft targets: the softmax of the average logits, not the average softmax", "asrkd/nnet/model.py",
        "return members_average(torch.softmax(member_logits / temperature, dim=-1), weights)",
        "return torch.softmax(members_average(member_logits, weights) / temperature, dim=-1)",
        ("tests/test_soft_targets.py", "-k", "average_softmax")),
    Bug("the bootstrap interval ignores stats.confidence", "asrkd/stats.py",
        "alpha = (1 - self.confidence) / 2", "alpha = 0.05",
        ("tests/test_stats.py",)),
    Bug("gain kept divided by the whole, not by its gain", "asrkd/stats.py",
        "lambda p, b, w: (p - b) / (w - b)", "lambda p, b, w: (p - b) / w",
        ("tests/test_stats.py",)),
    Bug("the LM-weight sweep breaks ties towards the larger weight", "asrkd/kaldi/decode.py",
        "key=lambda pair: (dev_wer[pair], pair))", "key=lambda pair: (dev_wer[pair], -pair[0], pair[1]))",
        ("tests/test_decode.py",)),
    Bug("a margin of exactly TIE_ERRORS is not called a tie", "asrkd/kaldi/decode.py",
        "margin <= TIE_ERRORS", "margin < TIE_ERRORS",
        ("tests/test_decode.py",)),
    Bug("the priors unfloored", "asrkd/kaldi/decode.py",
        "priors = np.maximum(pdf_counts / max(pdf_counts.sum(), 1), floor)", "priors = pdf_counts / max(pdf_counts.sum(), 1) + 1e-30",
        ("tests/test_decode.py",)),
    Bug("OOV tokens counted as types", "asrkd/kaldi/decode.py",
        '"oov_tokens": sum(counts.values()), "oov_rate": sum(counts.values()) / max(tokens, 1)',
        '"oov_tokens": len(counts), "oov_rate": len(counts) / max(tokens, 1)',
        ("tests/test_decode.py",)),
    Bug("the LM learns the tuning set's sentences", "asrkd/kaldi/graph.py",
        "return set(sections.split(cfg).utterances()[1])", "return set()",
        ("tests/test_decode.py",)),
    Bug("a training that learns nothing is kept", "asrkd/nnet/train.py",
        "if best <= initial_accuracy:", "if best < 0:",
        ("tests/test_safety.py", "-k", "learns_nothing")),
    Bug("a value out of its range is accepted", "asrkd/schema.py",
        "if bounds is not None and not all(bounds.holds(n) for n in numbers(value)):", "if False:",
        ("tests/test_safety.py", "-k", "out_of_range")),
    Bug("a drop limit applied at twice its value", "asrkd/drops.py",
        "if len(dropped) > max_fraction * total:", "if len(dropped) > 2 * max_fraction * total:",
        ("tests/test_pipeline.py", "-k", "too_many_dropped")),
    Bug("the GMM trains on the validation speakers", "asrkd/kaldi/gmm.py",
        "utts = [u for u in data.utt_ids if u in feats and u not in held_out]", "utts = [u for u in data.utt_ids if u in feats]",
        ("tests/test_pipeline.py", "-k", "gmm_trains_without")),
    Bug("the 3% subset not spread over speakers", "asrkd/data.py",
        "                chosen.append(queue.pop())", "                chosen.extend(queue[-2:]); queue.clear()",
        ("tests/test_data.py",)),
    Bug("a subset's draw ignores its seed", "asrkd/data.py",
        "def speaker_balanced_subset(data: DataDir, fraction: float, seed: int) -> list[str]:",
        "def speaker_balanced_subset(data: DataDir, fraction: float, seed: int) -> list[str]:\n    seed = 0",
        ("tests/test_data.py",)),
    Bug("an OOV reason from make-graph dropped", "asrkd/kaldi/graph.py",
        'f"{NO_PRONUNCIATION} ({recorded[word]})" if word in recorded else NO_PRONUNCIATION', "NO_PRONUNCIATION",
        ("tests/test_decode.py", "-k", "left_out")),
    Bug("an eval set's decoding drops stop the stage", "asrkd/nnet/decode.py",
        "len(refs), dropped, 1.0,", "len(refs), dropped, cfg.prep.max_drop_fraction,",
        ("tests/test_kaldi_data.py", "-k", "added_later")),
    Bug("a checkpoint of a registered model kind loads as an MLP", "asrkd/nnet/model.py",
        "    if kind:\n        if kind not in MODEL_KINDS:", "    if False:\n        if kind not in MODEL_KINDS:",
        ("asrkd/experiments/images/test_images.py", "-k", "conv_net")),
    Bug("fused Adam for fp32 training on a CPU (committed fp32 results no longer bit for bit)", "asrkd/nnet/train.py",
        'return device.type == "cuda" or (bool(tcfg.bf16_autocast) and device.type in FUSED_ADAM_DEVICES)', "return True",
        ("tests/test_nnet.py", "-k", "fused")),
    Bug("the report names the training-text LM when the user's ARPA decoded", "asrkd/kaldi/graph.py",
        "    if gcfg.lm_arpa:\n        return f\"the ARPA LM", "    if False:\n        return f\"the ARPA LM",
        ("tests/test_kaldi_data.py", "-k", "generic_recipe")),
)


def run_bug(bug: Bug) -> dict:
    path = REPO / bug.file
    original = path.read_text()
    if original.count(bug.old) != 1:
        return asdict(bug) | {"caught": None, "error": f"the edit's text is in {bug.file} {original.count(bug.old)} times, not once"}
    tic = time.time()
    try:
        path.write_text(original.replace(bug.old, bug.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *bug.tests], cwd=REPO,
                                capture_output=True, text=True)
    finally:
        path.write_text(original)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return asdict(bug) | {"caught": result.returncode == 1, "exit": result.returncode, "pytest": summary,
                          "seconds": round(time.time() - tic, 1)}


def markdown(result: dict) -> str:
    rows = result["bugs"]
    caught = sum(1 for r in rows if r["caught"])
    lines = ["# Planted bugs: does the suite fail when a claim breaks?", "",
             f"{caught} of {len(rows)} planted bugs caught ({100 * caught / len(rows):.0f}%) by the tests meant to guard each promise.", "",
             "| bug | file | tests run | caught | pytest |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['file']} | `{' '.join(r['tests'])}` | {'yes' if r['caught'] else 'NO'} | {r.get('pytest') or r.get('error')} |")
    lines += ["", f"Command: `{result['command']}`. Machine: {result['machine']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="names (substrings) of the bugs to plant")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "planted_bugs")
    args = parser.parse_args()
    if subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "--", *sorted({b.file for b in BUGS})]).returncode:
        sys.exit("planted_bugs: the files it edits have uncommitted changes; commit or stash them first")
    bugs = [b for b in BUGS if args.only is None or any(part in b.name for part in args.only)]
    result = {"benchmark": "planted_bugs", "command": "python tools/planted_bugs.py", "machine": cpu_description(), "bugs": []}
    previous = args.out.with_suffix(".json")
    if args.only is not None and previous.is_file():  # --only runs again the bugs named; the others keep their rows
        result["bugs"] = [row for row in json.loads(previous.read_text())["bugs"] if row["name"] in {b.name for b in BUGS}]
    for bug in bugs:
        row = run_bug(bug)
        print(f"{'caught' if row['caught'] else 'MISSED'}: {bug.name} ({row.get('pytest') or row.get('error')})", flush=True)
        result["bugs"] = [r for r in result["bugs"] if r["name"] != bug.name] + [row]
        write_json(args.out.with_suffix(".json"), result)
    order = {b.name: i for i, b in enumerate(BUGS)}
    result["bugs"].sort(key=lambda r: order[r["name"]])
    result["caught"] = sum(1 for r in result["bugs"] if r["caught"])
    write_json(args.out.with_suffix(".json"), result)
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(f"{result['caught']} of {len(result['bugs'])} caught")


if __name__ == "__main__":
    main()
