#!/usr/bin/env python3
"""Pack a recipe's prepared outputs for a machine that has neither the corpus nor its features.

    python tools/pack_prepared.py RECIPE_DIR DEST [PATH ...]

Copies each PATH (relative to RECIPE_DIR; default: what recipes/an4/run_paper.sh reads) into
DEST at the same place: data dirs and stage outputs (features, the GMM, alignments, the graph,
the GMM's decode). A stage output's subdirectories that are stage outputs of their own
(``exp/tri/ali_*``) are copied only when named. Every stage output on their input chains that
is not named (the MFCC features the GMM was trained on, ...) travels without its files over
1 MiB (its frames): its ``stage.json`` and indexes let the stages there check the same
fingerprints as here and skip or refuse as here, and a stage that would read its frames fails
naming the file it lacks (its ``stage.packed.json`` lists what was left behind, so the check of
its recorded files does not take them for lost).

AN4 with the defaults: about 28 MiB (its wavs: 89 MB; their fbank and MFCC: 66 MB). On the
other machine, copy DEST over the recipe dir (``cp -a DEST/. recipes/an4/``) and run the
recipe from the stage that follows the prepared ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asrkd.files import write_json
from asrkd.stage import PACKED, RECORD, input_fingerprint, is_data_dir  # noqa: E402

LARGE = 2**20  # bytes: what an output packed for its record alone leaves behind

RUN_PAPER_INPUTS = (
    "data/lang", "data/train", "data/test", "data/train_3pct", "data/train_10pct", "data/train_30pct",
    "exp/feats/fbank/train", "exp/feats/fbank/test", "exp/tri", "exp/tri/ali_train", "exp/tri/ali_test",
    "exp/graph", "exp/decode/gmm",
)


def copy_output(source: Path, dest: Path, max_bytes: int | None = None, under: str = "") -> list[str]:
    """``source`` but for subdirectories that are stage outputs of their own (and files over
    ``max_bytes``, if given); returns the paths of the files left behind."""
    dest.mkdir(parents=True, exist_ok=True)
    left_behind = []
    for entry in source.iterdir():
        if entry.is_dir():
            if not (entry / RECORD).is_file():
                left_behind += copy_output(entry, dest / entry.name, max_bytes, f"{under}{entry.name}/")
        elif max_bytes is None or entry.stat().st_size <= max_bytes:
            shutil.copy2(entry, dest / entry.name)
        else:
            left_behind.append(f"{under}{entry.name}")
    return left_behind


def input_chain(recipe_dir: Path, path: str, seen: set[str]) -> None:
    """Add ``path`` and every stage output or data dir its record names, recursively, to ``seen``."""
    if path in seen:
        return
    seen.add(path)
    record_path = recipe_dir / path / RECORD
    if not record_path.is_file():
        return
    for entry in json.loads(record_path.read_text())["inputs"].values():
        if "path" in entry:
            input_chain(recipe_dir, os.path.normpath(os.path.join(path, entry["path"])), seen)


def pack(recipe_dir: Path, dest: Path, paths: list[str]) -> dict[str, list[str]]:
    """Copy ``paths`` whole and the rest of their input chains without large files;
    {"whole": ..., "without frames": ...}."""
    missing = [p for p in paths if not (recipe_dir / p / RECORD).is_file() and not is_data_dir(recipe_dir / p)]
    if missing:
        raise SystemExit(f"{recipe_dir}: no finished stage output or data dir at {', '.join(missing)}; run its stage first")
    for path in paths:
        input_fingerprint(recipe_dir / path)  # refuse to pack what is stale here
    chain: set[str] = set()
    for path in paths:
        input_chain(recipe_dir, path, chain)
    without_frames = sorted(chain - set(paths))
    for path in paths:
        copy_output(recipe_dir / path, dest / path)
    for path in without_frames:
        left_behind = copy_output(recipe_dir / path, dest / path, None if is_data_dir(recipe_dir / path) else LARGE)
        if left_behind:
            write_json(dest / path / PACKED, {"left_behind": sorted(left_behind)})
    return {"whole": sorted(paths), "without frames": without_frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("paths", nargs="*", default=list(RUN_PAPER_INPUTS))
    args = parser.parse_args()
    packed = pack(args.recipe_dir, args.dest, args.paths)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {len(packed['whole'])} outputs whole, {len(packed['without frames'])} without their frames "
          f"({', '.join(packed['without frames']) or 'none'}); {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
