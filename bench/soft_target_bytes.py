#!/usr/bin/env python3
"""What each soft-target form takes on disk (and resident while a student trains), per frame and
per corpus size, at AN4's tree and at the paper's (~14,000 pdfs).

    python bench/soft_target_bytes.py [--pdfs 400 14000] [--hours 10 100 1000] [--out results/bench/soft_target_bytes]

Computed from the store's own layout (asrkd.distill.soft_targets: fp16 probabilities, int16 ids
below 32,768 pdfs), ``distill.top_k`` and the compact form's k of the committed AN4 run at T = 2
(``distill.compact``: the smallest k whose mean residual is at most 1%), at 360,000 frames an hour
(10 ms shift). ``auto`` says whether ``distill.store_dense=auto`` keeps the dense form at that
size (``distill.dense_limit_gb``). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd.cli import load_config  # noqa: E402
from asrkd.distill.soft_targets import stores_dense  # noqa: E402
from asrkd.distill.target_store import FRAMES_PER_HOUR, compact_bytes, dense_bytes, id_dtype
from asrkd.files import write_json, write_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def an4_compact_k() -> int | None:
    """The compact students' k in the committed AN4 report (T = 2), if there is one."""
    report = REPO / "results" / "an4" / "report.json"
    if not report.is_file():
        return None
    forms = json.loads(report.read_text()).get("distillation", {}).get("compact_forms", [])
    return next((int(f["k"]) for f in forms if f["form"] == "compact" and f["temperature"] == 2), None)


def forms(num_pdfs: int, top_k: int, compact_k: int) -> dict[str, int]:
    """Bytes per frame of each form as a store holds it."""
    ids = np.dtype(id_dtype(num_pdfs)).itemsize
    return {"dense (fp16)": dense_bytes(1, num_pdfs), f"top-k, k = {top_k} (ids, fp16, residual)": top_k * (ids + 2) + 2,
            f"compact, k = {compact_k}": compact_bytes(compact_k), "teacher logits (fp16)": 2 * num_pdfs, "teacher on the fly": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=int, nargs="+", default=[400, 14000])
    parser.add_argument("--hours", type=float, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "soft_target_bytes")
    args = parser.parse_args()
    cfg = load_config()
    top_k, compact_k = int(cfg.distill.top_k), an4_compact_k() or 2
    rows = []
    for num_pdfs in args.pdfs:
        for form, per_frame in forms(num_pdfs, top_k, compact_k).items():
            rows.append({"pdfs": num_pdfs, "form": form, "bytes_per_frame": per_frame,
                         "gb": {f"{h:g}": per_frame * FRAMES_PER_HOUR * h / 1e9 for h in args.hours}})
        rows.append({"pdfs": num_pdfs, "auto_stores_dense": {f"{h:g}": stores_dense(cfg.distill, int(FRAMES_PER_HOUR * h), num_pdfs)
                                                             for h in args.hours}})
    command = "python bench/soft_target_bytes.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "top_k": top_k, "compact_k": compact_k, "frames_per_hour": FRAMES_PER_HOUR,
              "dense_limit_gb": float(cfg.distill.dense_limit_gb), "rows": rows}
    hours = [f"{h:g}" for h in args.hours]
    lines = ["| pdfs | form | bytes / frame | " + " | ".join(f"GB at {h} h" for h in hours) + " |", "|---" * (3 + len(hours)) + "|"]
    for row in rows:
        if "form" in row:
            lines.append(f"| {row['pdfs']:,} | {row['form']} | {row['bytes_per_frame']:,} | "
                         + " | ".join(f"{row['gb'][h]:,.2f}" for h in hours) + " |")
        else:
            lines.append(f"| {row['pdfs']:,} | store_dense=auto keeps dense (limit {result['dense_limit_gb']:g} GB) | | "
                         + " | ".join("yes" if row["auto_stores_dense"][h] else "no" for h in hours) + " |")
    write_json(args.out.with_suffix(".json"), result)
    write_text(args.out.with_suffix(".md"), "\n".join([f"Command: `{result['command']}`", "", *lines, ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
