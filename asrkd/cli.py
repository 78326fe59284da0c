"""``asrkd <command> [hydra overrides]``: one command per pipeline step.

Recipes call these; each command reads ``conf/config.yaml`` composed with the overrides,
skips its work when its outputs are complete (a ``.done`` marker, as Kaldi recipes do) and
otherwise (re)builds them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_config(overrides: list[str] | None = None, config_dir: Path | None = None) -> DictConfig:
    """Compose the Hydra config (``conf/`` of this checkout unless ``config_dir`` is given)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides or []))


# command -> "module" whose run(cfg), or "module:function", implements it; imported on use,
# so each command loads only its step
COMMANDS = {
    "prepare-lang": "asrkd.lang",
    "make-feats": "asrkd.features",
    "train-gmm": "asrkd.gmm",
    "train-dnn": "asrkd.train",
    "train-ensemble": "asrkd.ensemble",
    "soft-targets": "asrkd.soft_targets",
    "train-student": "asrkd.student",
    "make-graph": "asrkd.graph",
    "decode": "asrkd.decode",
    "evaluate": "asrkd.evaluate",
    "train-3pct": "asrkd.three_percent:run_train",
    "decode-3pct": "asrkd.three_percent:run_decode",
    "report-3pct": "asrkd.three_percent:run_report",
    "decode-distill": "asrkd.distillation:run_decode",
    "report-distill": "asrkd.distillation:run_report",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asrkd", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=paper train.epochs=3")
    parser.add_argument("--config-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = load_config(args.overrides, args.config_dir)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("asrkd").info("%s with overrides %s", args.command, args.overrides)
    module, _, function = COMMANDS[args.command].partition(":")
    getattr(importlib.import_module(module), function or "run")(cfg)


if __name__ == "__main__":
    main()
