"""Stage: the ensemble, ``ensemble.size`` DNNs identical but for the seed of their initial weights.

Members train one after another (``exp/dnn/ensemble/member-<i>``), each resumable; member i
is initialized with seed ``seed + 1 + i`` so none repeats the baseline.
"""

from __future__ import annotations

from pathlib import Path

from asrkd.stage import mark_done, skip_if_done
from asrkd.train import prepare_training, train_model


def member_dirs(cfg) -> list[Path]:
    return [Path(cfg.exp_dir) / "dnn" / cfg.ensemble.name / f"member-{i}" for i in range(cfg.ensemble.size)]


def run(cfg) -> None:
    if all(skip_if_done(d, "train-ensemble member") for d in member_dirs(cfg)):
        return
    data, train_idx, valid_idx = prepare_training(cfg)
    for i, out_dir in enumerate(member_dirs(cfg)):
        if skip_if_done(out_dir, f"train-ensemble member {i}"):
            continue
        train_model(cfg, data, train_idx, valid_idx, out_dir, init_seed=cfg.seed + 1 + i)
        mark_done(out_dir)
