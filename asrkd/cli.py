"""``asrkd <command> [hydra overrides]``: one command per pipeline step.

Recipes call these; each command reads ``conf/config.yaml`` and every experiment's section
(``asrkd/experiments/<name>/<section>.yaml``) composed with the overrides. A
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
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asrkd import experiments as experiments_package
from asrkd import jobs, parallel, report, sections
from asrkd.errors import StageError
from asrkd.experiments.base import Experiment
from asrkd.files import disk_error, verify_every_file
from asrkd.machine import invoked_as
from asrkd.schema import SHARED, ConfigError, ConfigTypes, validate
from asrkd.stage import abandon_open_stages, code_record

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``node`` (the config or a group of it), leaves and groups."""
    keys = []
    for key, value in node.items():
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
            cfg = compose(config_name="config", overrides=SECTIONS + overrides)
        except HydraException as err:
            base = compose(config_name="config", overrides=SECTIONS)
            raise ConfigError(explain_override_error(str(err), overrides, base, Path(config_dir or CONF_DIR))) from None
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {str(err).splitlines()[0]}") from None
    validate(resolved, defaults(str(config_dir or CONF_DIR), tuple(o for o in overrides if o.startswith("model="))), CONFIG_TYPES)
    return cfg


@functools.lru_cache(maxsize=8)
def defaults(config_dir: str, model: tuple[str, ...]) -> dict:
    """The config of ``config_dir`` with no overrides but the model's, as a plain tree: the types' reference."""
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=SECTIONS + list(model)), resolve=False)


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
            return f"config: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "; see conf/config.yaml and asrkd/experiments/*/*.yaml")
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
    "export": "asrkd.nnet.export",
    "results": "asrkd.cli:run_results",
    "publish": "asrkd.cli:run_publish",
}

def run_publish(cfg: DictConfig) -> None:
    """``asrkd publish``: exp/report merged into ``results_dir`` (:func:`asrkd.report.publish`)."""
    report.publish(sections.report_place(cfg))


def run_results(cfg: DictConfig) -> None:
    """``asrkd results``: RESULTS.md again from report.json (:func:`asrkd.report.write_results`)."""
    report.write_results(sections.report_place(cfg))


EXPERIMENTS_DIR = Path(experiments_package.__file__).resolve().parent


def experiment_folders() -> list[Path]:
    """``asrkd/experiments/<name>/``: every experiment's folder (a package of asrkd.experiments)."""
    return sorted(path for path in EXPERIMENTS_DIR.iterdir() if (path / "__init__.py").is_file())


def discovered_experiments() -> dict[str, tuple[str, Experiment]]:
    """Every module of an experiment's folder (its tests aside) that ends with ``EXPERIMENT =
    Experiment(...)``: its command -> (module, the Experiment). An experiment is found here, not
    listed: its folder is the one place that says what it is, which steps and commands it has
    and what its config section takes."""
    out = {}
    for folder in experiment_folders():
        for info in pkgutil.iter_modules([str(folder)]):
            if info.name.startswith("test_"):
                continue
            module = importlib.import_module(f"{experiments_package.__name__}.{folder.name}.{info.name}")
            experiment = getattr(module, "EXPERIMENT", None)
            if isinstance(experiment, Experiment):
                if experiment.command in out:
                    raise ValueError(f"two experiments are called {experiment.command!r}: {out[experiment.command][0]} and {module.__name__}")
                out[experiment.command] = (module.__name__, experiment)
    return out


EXPERIMENTS = discovered_experiments()

# every experiment's commands: ``asrkd <step>-<experiment>`` is its module's EXPERIMENT.step(<step>)
# (asrkd.experiments.base), as is each command of its own
COMMANDS |= {command: f"{module}:EXPERIMENT.{step}" for module, experiment in EXPERIMENTS.values()
             for command, step in experiment.command_names().items()}

# every key's type: the shared sections' (asrkd.schema) and each experiment's section's
CONFIG_TYPES = functools.reduce(ConfigTypes.joined, (experiment.config for _, experiment in EXPERIMENTS.values()), SHARED)


def experiment_sections() -> list[str]:
    """The overrides that compose every experiment's section into the config: each
    ``<section>.yaml`` of an experiment's folder, stored as Hydra config group ``<section>``
    (option ``experiment``) and added as ``+<section>=experiment``, so that conf/config.yaml
    holds what every run shares and ``<section>.<key>=...`` overrides work as for any key."""
    store, overrides = ConfigStore.instance(), []
    for folder in experiment_folders():
        for path in sorted(folder.glob("*.yaml")):
            if f"+{path.stem}=experiment" in overrides:
                raise ValueError(f"two experiment folders have a config section {path.stem!r} (asrkd/experiments/*/{path.name})")
            store.store(group=path.stem, name="experiment", node=OmegaConf.load(path))
            overrides.append(f"+{path.stem}=experiment")
    return overrides


SECTIONS = experiment_sections()


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
