"""``asrkd <command> [hydra overrides]``: one command per pipeline step.

Recipes call these; each command reads ``conf/config.yaml`` composed with the overrides. A
stage whose outputs were made from the same config and inputs is skipped; one whose config
or inputs changed is refused with the keys that changed, unless ``redo=true`` (see
:mod:`asrkd.stage`). Errors the user can fix (bad input, a mistyped key, a stale stage)
print as one line naming the file or key and the fix; ``log_level=DEBUG`` adds the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import logging
import pkgutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from asrkd import experiments as experiments_package
from asrkd import jobs, parallel
from asrkd.errors import StageError
from asrkd.experiments.base import Experiment
from asrkd.files import disk_error, verify_every_file
from asrkd.machine import invoked_as
from asrkd.schema import ConfigError, validate
from asrkd.stage import abandon_open_stages, code_record

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg``, leaves and groups."""
    keys = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, DictConfig):
            keys += config_keys(value, f"{name}.")
    return keys


def load_config(overrides: list[str] | None = None, config_dir: Path | None = None) -> DictConfig:
    """Compose the Hydra config (``conf/`` of this checkout unless ``config_dir`` is given).

    A mistyped key or option is a ConfigError naming it and the nearest valid one, not a
    Hydra traceback; a value of the wrong type one naming the key, the value and the type
    (:mod:`asrkd.schema`). Both before any stage has looked at its outputs.
    """
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base=None):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except HydraException as err:
            base = compose(config_name="config")
            raise ConfigError(explain_override_error(str(err), overrides, base, Path(config_dir or CONF_DIR))) from None
    validate(cfg, defaults(str(config_dir or CONF_DIR), tuple(o for o in overrides if o.startswith("model="))))
    return cfg


@functools.lru_cache(maxsize=8)
def defaults(config_dir: str, model: tuple[str, ...]) -> dict:
    """The config of ``config_dir`` with no overrides but the model's, as a plain tree: the types' reference."""
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(model)), resolve=False)


def explain_override_error(message: str, overrides: list[str], base: DictConfig, config_dir: Path) -> str:
    known = config_keys(base)
    groups = [p.name for p in config_dir.iterdir() if p.is_dir()]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in groups:
            options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
            if value not in options:
                near = difflib.get_close_matches(value, options, n=1)
                return f"config: {key}={value} is not an option of {key} ({', '.join(options)})" + (f"; did you mean {key}={near[0]}?" if near else "")
        elif key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            return f"config: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "; see conf/config.yaml")
    return "config: " + message.splitlines()[0]


# command -> "module" whose run(cfg), or "module:function", implements it; imported on use,
# so each command loads only its step
COMMANDS = {
    "prepare-lang": "asrkd.kaldi.lang",
    "make-feats": "asrkd.kaldi.features",
    "speed-perturb": "asrkd.kaldi.perturb",
    "train-gmm": "asrkd.kaldi.gmm",
    "align": "asrkd.kaldi.gmm:run_align",
    "train-dnn": "asrkd.nnet.train",
    "train-ensemble": "asrkd.nnet.ensemble",
    "soft-targets": "asrkd.distill.soft_targets",
    "train-student": "asrkd.distill.student",
    "make-graph": "asrkd.kaldi.graph",
    "decode": "asrkd.nnet.decode",
    "evaluate": "asrkd.evaluate",
    "prepare-images": "asrkd.experiments.images:run_prepare",
    "train-image-nets": "asrkd.experiments.images:run_train_nets",
    "train-image-students": "asrkd.experiments.images:run_train_students",
    "report-images": "asrkd.experiments.images:run_report",
    "export": "asrkd.nnet.export",
    "results": "asrkd.report:run_results",
    "publish": "asrkd.report:run_publish",
    "check-paper-machine": "asrkd.experiments.paper_schedule:check_machine",
}

# experiment -> (its module, its steps): ``asrkd <step>-<experiment>`` is the module's
# EXPERIMENT.step(<step>) (asrkd.experiments.base); a new experiment is one entry here, its steps
# listed so that a command loads only its own module (tests check they are the experiment's)
def discovered_experiments() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every module of asrkd.experiments that ends with ``EXPERIMENT = Experiment(...)``: its
    command -> (module, the steps it has). An experiment is found here, not listed: its module
    is the one place that says what it is and which steps it has."""
    out = {}
    for info in sorted(pkgutil.iter_modules(experiments_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{experiments_package.__name__}.{info.name}")
        experiment = getattr(module, "EXPERIMENT", None)
        if isinstance(experiment, Experiment):
            out[experiment.command] = (module.__name__, experiment.steps())
    return out


EXPERIMENTS = discovered_experiments()

COMMANDS |= {f"{step}-{name}": f"{module}:EXPERIMENT.{step}" for name, (module, steps) in EXPERIMENTS.items() for step in steps}


def step_function(command: str) -> Callable[[DictConfig], None]:
    """The function of ``command``: a module's run, a module's function, or an experiment's step (its module imported now)."""
    module, _, function = COMMANDS[command].partition(":")
    target, _, step = function.partition(".")
    found = getattr(importlib.import_module(module), target or "run")
    return found.step(step) if step else found


class Terminated(BaseException):
    """SIGTERM (a scheduler's or a user's ``kill``), raised where the command is so that it stops as
    Ctrl-C does: what it had made is put right before it exits."""


def on_sigterm(signum: int, _frame) -> None:
    raise Terminated(signum)


def os_error_line(err: OSError) -> str:
    """An OSError as one line naming the file: a full or unwritable disk with its fix (asrkd.files.disk_error), else its own words."""
    known = disk_error(err.filename or "", err)
    if known is not None:
        return str(known)
    where = f" {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{':' if where else ''}{where}"


def run_command(function: Callable[[DictConfig], None], overrides: list[str], name: str, config_dir: Path | None = None) -> None:
    """Compose the config, set up logging and run ``function``; fixable errors exit with one line.
    Stages the command planned and did not finish are abandoned on any error (a redo's old
    output goes back in place, locks are released). Ctrl-C and SIGTERM stop it the same way and
    say in one line what was kept (exit 130 and 143, as a shell reports them); an OS error (a
    full disk in any stage) is one line naming the file (exit 1)."""
    try:
        cfg = load_config(overrides, config_dir)
    except ConfigError as err:
        sys.exit(f"asrkd {name}: {err}")
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    launch = parallel.launch_command(name, overrides + (["--config-dir", str(config_dir)] if config_dir else []), int(cfg.train.nproc))
    if launch is not None:  # train.nproc > 1: the same command on that many ranks (torchrun)
        logging.getLogger("asrkd").info("%s on %d processes: %s", name, cfg.train.nproc, " ".join(launch))
        sys.exit(subprocess.run(launch).returncode)
    parallel.init_from_environment()
    verify_every_file(bool(cfg.verify))
    logging.getLogger("asrkd").info("%s with overrides %s", name, overrides)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with invoked_as(name, overrides):
            function(cfg)
    except (StageError, ValueError, FileNotFoundError) as err:
        abandon_open_stages(failed=True)
        if cfg.log_level == "DEBUG":
            raise
        sys.exit(f"asrkd {name}: error: {err}")
    except OSError as err:
        abandon_open_stages(failed=True)
        if cfg.log_level == "DEBUG":
            raise
        sys.exit(f"asrkd {name}: error: {os_error_line(err)}")
    except (KeyboardInterrupt, Terminated) as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the putting right short
        jobs.stop_workers()
        kept = abandon_open_stages()
        if cfg.log_level == "DEBUG":
            raise
        what = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
        print(f"asrkd {name}: stopped by {what}; " + ("; ".join(kept) if kept else "every finished stage is kept"), file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except BaseException:
        abandon_open_stages()
        raise
    finally:
        parallel.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asrkd", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=paper train.epochs=3")
    parser.add_argument("--config-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    step = step_function(args.command)
    code_record()  # the source hashes of the modules just imported: what runs, even if a file is edited while it does
    run_command(step, args.overrides, args.command, args.config_dir)


if __name__ == "__main__":
    main()
