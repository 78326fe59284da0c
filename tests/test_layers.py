"""The layers hold: ground < kaldi < nnet < distill < evaluate < experiments < cli, as pyproject's
import-linter contract says, with every module in a layer and every import at its module's top."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asrkd.cli import COMMANDS, EXPERIMENTS, step_function

from conftest import REPO

# third-party imports that stay inside the function that needs them, and why
LAZY = {
    "matplotlib": "reports only; slow to import for every command",
    "matplotlib.pyplot": "reports only",
    "submitit": "jobs.backend=submitit only",
    "kaldi_decoder": "kaldilm hangs when imported before it: graph.py imports it right before kaldilm",
    "kaldilm": "after kaldi_decoder (above)",
    "_kaldifst": "graph.py's one low-level call",
}


def library_files() -> list[Path]:
    """The package's modules but an experiment's tests (which import where a test needs and spell paths to check them)."""
    return sorted(path for path in (REPO / "asrkd").rglob("*.py") if not path.name.startswith("test_"))


def layered_modules() -> set[str]:
    """Every module or package named in a layer of pyproject's first import-linter contract."""
    text = (REPO / "pyproject.toml").read_text()
    layers = re.search(r"type = \"layers\"\nlayers = \[(.*?)\]", text, re.S).group(1)
    return {name.strip() for line in re.findall(r'"([^"]+)"', layers) for name in line.split("|")}


def test_every_module_imports_only_from_layers_below_its_own() -> None:
    # in a process of its own: import-linter reconfigures logging, which would blind later tests' caplog
    check = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr  # the broken contract and its import chain


def test_every_module_has_a_layer() -> None:
    package = REPO / "asrkd"
    top = {f"asrkd.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"} | {f"asrkd.{p.name}" for p in package.iterdir()
                                                                                      if (p / "__init__.py").is_file()}
    assert top - layered_modules() == set(), "add the new module to a layer of [tool.importlinter] in pyproject.toml"


def test_imports_sit_at_the_top_of_their_module() -> None:
    inside = []
    for path in library_files():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if module not in LAZY:
                    inside.append(f"{path.relative_to(REPO)}:{node.lineno} {module}")
    assert inside == []


MAX_MODULE_LINES = 500  # issue 53: a module over this holds more than one idea; split it by concern


def test_no_module_is_longer_than_one_idea() -> None:
    long = {str(path.relative_to(REPO)): n for path in library_files() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these by concern (one idea a file): {long}"


def test_every_path_into_an_experiment_directory_is_built_by_the_layout() -> None:
    # a stage's output directory spelled out elsewhere ('exp / "dnn" / name') drifts from where the others look for it
    spelled = re.compile(r'/\s*"(dnn|soft_targets|decode|feats|graph|tri|mono|report|lang|specialists|cost|export)"')
    found = [f"{path.relative_to(REPO)}:{number} {line.strip()}" for path in library_files()
             if path.name != "layout.py" for number, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    assert found == [], "build these paths with asrkd.layout.Layout"


def experiment_modules() -> list[tuple[Path, str]]:
    """Every module of every experiment's folder but its tests: (path, dotted name)."""
    return [(path, ".".join(path.relative_to(REPO).with_suffix("").parts)) for path in sorted((REPO / "asrkd" / "experiments").glob("*/*.py"))
            if not path.name.startswith("test_") and path.name != "__init__.py"]


def test_every_command_names_a_step_that_exists_and_every_experiment_step_is_a_command() -> None:
    for command in COMMANDS:
        assert callable(step_function(command)), command
    modules = [(path, module, getattr(importlib.import_module(module), "EXPERIMENT", None)) for path, module in experiment_modules()]
    folders: dict[Path, list] = {}  # an experiment's folder -> the commands of its EXPERIMENTs (a step may live in any module of it)
    for path, _, experiment in modules:
        folders.setdefault(path.parent, []).extend(experiment.commands.values() if experiment is not None else [])
    for path, module, experiment in modules:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("run_") and [a.arg for a in node.args.args] == ["cfg"]:
                function = getattr(importlib.import_module(module), node.name)
                assert function in folders[path.parent], f"{module}.{node.name} has no command: add it to its folder's EXPERIMENT's commands"
        if experiment is not None:  # discovered: each of its steps and commands is a command, run by this module's EXPERIMENT
            assert EXPERIMENTS[experiment.command][0] == module
            assert all(COMMANDS[command] == f"{module}:EXPERIMENT.{step}" for command, step in experiment.command_names().items()), module
            assert all(step_function(command) is function for command, function in experiment.commands.items()), module


def test_experiments_publish_and_decode_only_through_their_base() -> None:
    # one publisher and one decode path: an experiment that writes its own report drifts from the others'
    private = re.compile(r"\b(publish_experiment|merge_into_report|write_text|decode\.run)\(")
    found = [f"{module}:{number}" for path, module in experiment_modules()
             for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == []


def test_an_experiment_has_the_steps_it_defines_and_names_the_ones_it_lacks() -> None:
    from asrkd.experiments.base import Experiment, Report
    from asrkd.layout import System

    scored = Experiment("toy", "toy", lambda cfg: [System("baseline", "baseline")], report=lambda cfg: Report({}, ""))
    assert scored.steps() == ("decode", "report")
    assert Experiment("toy", "toy", scored.systems, train=print, decodes=False).steps() == ("train",)
    with pytest.raises(ValueError, match="toy has no train step .it has decode, report."):
        scored.step("train")


def test_an_experiment_report_says_over_how_many_utterances_when_some_were_not_aligned(monkeypatch, tmp_path) -> None:
    from omegaconf import OmegaConf

    from asrkd.experiments import base

    published = {}
    monkeypatch.setattr(base, "publish_experiment", lambda cfg, section, result, markdown, figures, systems: published.update({section: markdown}))
    for aligned, note in ((130, False), (128, True)):
        counts = {"test": {"aligned": aligned, "of": 130}}
        base.Experiment("toy", "toy", lambda cfg: [], report=lambda cfg: base.Report({}, "# toy\n", aligned=counts)).publish(
            OmegaConf.create({"exp_dir": str(tmp_path), "results_dir": None, "train": {"device": "cpu"}}))
        assert ("Frame accuracy is over the utterances the GMM aligned: test 128 of 130." in published["toy"]) == note


def test_every_experiments_section_names_the_machine_and_code_that_made_it(tmp_path) -> None:
    # RESULTS.md's "Made by" said "not recorded" for the sections of the experiments (distillation, function matching...)
    import json

    from omegaconf import OmegaConf

    from asrkd.experiments import base
    from asrkd.report import machine, results_listing

    rows = {"rows": {"student": {"system": "student", "frame_accuracy": {"test": 0.5}}}}
    cfg = OmegaConf.create({"exp_dir": str(tmp_path / "exp"), "results_dir": str(tmp_path / "results"), "train": {"device": "cpu"}})
    base.Experiment("toy", "toy", lambda cfg: [], report=lambda cfg: base.Report(rows, "# toy\n")).publish(cfg)
    for place in (tmp_path / "exp" / "report", tmp_path / "results"):
        report = json.loads((place / "report.json").read_text())
        assert report["toy"]["machine"] == machine("cpu")
        assert f"- toy: {machine('cpu')}" in results_listing(report).splitlines()


def test_render_writes_a_sections_markdown_again_from_the_report_and_refuses_a_missing_section(tmp_path) -> None:
    # a report made before a change of wording (here: intervals over speakers, written as over utterances) reads as the code now writes it
    import json

    from omegaconf import OmegaConf

    from asrkd.experiments.distillation import experiment as distillation

    committed = REPO / "results" / "an4"
    results = tmp_path / "results"
    results.mkdir()
    report = json.loads((committed / "report.json").read_text())
    assert report["distillation"]["bootstrap_unit"] == "speaker"
    (results / "report.json").write_text(json.dumps(report))
    (results / "distillation.md").write_text("stale: bootstrap over test utterances\n")
    cfg = OmegaConf.create({"corpus": "an4", "exp_dir": str(tmp_path / "exp"), "results_dir": str(results)})
    step_function("render-distill")(cfg)
    rendered = (results / "distillation.md").read_text()
    assert rendered == (committed / "distillation.md").read_text() == (tmp_path / "exp" / "report" / "distillation.md").read_text()
    assert "bootstrap over test speakers" in rendered and "utterances" not in rendered
    assert distillation.EXPERIMENT.steps() == ("decode", "report", "render")
    del report["distillation"]
    (results / "report.json").write_text(json.dumps(report))
    with pytest.raises(FileNotFoundError, match="no 'distillation' section in .*report.json: run asrkd report-distill first"):
        step_function("render-distill")(cfg)


def test_an_experiment_imports_no_other_experiments_folder_nor_the_cli() -> None:
    # each folder is a room: what two experiments share lives in a layer below them
    found = []
    for path, module in experiment_modules():
        own = module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{module} imports {name}" for name in names if name.startswith("asrkd.cli")
                      or (name.startswith("asrkd.experiments.") and not name.startswith((own + ".", "asrkd.experiments.base")) and name != own)]
    assert found == []


def test_contributing_lists_what_an_experiment_folder_holds() -> None:
    page = (REPO / "docs" / "contributing.md").read_text()
    listed = [line.split()[0] for line in re.search(r"```text\n(.*?)```", page, re.S).group(1).splitlines() if line.strip()]
    assert [path for path in listed if not (REPO / path).is_file()] == []
    kinds = ("__init__.py", "experiment.py", ".yaml", "test_", "model.py", "loss.py")
    assert all(any(Path(path).name.startswith(kind) or path.endswith(kind) for path in listed) for kind in kinds)
    folders = sorted(path for path in (REPO / "asrkd" / "experiments").iterdir() if (path / "__init__.py").is_file())
    assert len(folders) >= 9
    for folder in folders:  # each names its recipe and write-up, which exist; it holds code, config and tests only
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        recipe, write_up = re.search(r"Recipe: ([^;\s]+)", doc).group(1), re.search(r"write-up: ([^;\s]+)", doc).group(1)
        assert (REPO / recipe).is_file() and (REPO / write_up).is_file(), folder.name
        assert [p.name for p in folder.iterdir() if p.suffix not in (".py", ".yaml") and p.name != "__pycache__"] == [], folder.name


def test_a_folder_copied_under_another_name_is_a_new_experiment(tmp_path) -> None:
    # what docs/contributing.md promises: the folder alone makes an experiment, its commands and its config section
    for part in ("asrkd", "conf"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    toy = tmp_path / "asrkd" / "experiments" / "toy"
    shutil.copytree(tmp_path / "asrkd" / "experiments" / "bf16_check", toy)
    (toy / "bf16_check.yaml").rename(toy / "toy.yaml")
    code = (toy / "experiment.py").read_text()
    (toy / "experiment.py").write_text(code.replace('Experiment("bf16-check", "bf16_check"', 'Experiment("toy", "toy"'))
    check = ("from asrkd.cli import COMMANDS, load_config\nfrom asrkd.schema import ConfigError\n"
             "print(sorted(c for c in COMMANDS if c.endswith('-toy')), load_config(['toy.seeds=2']).toy.seeds)\n"
             "try:\n    load_config(['toy.seeds=0'])\nexcept ConfigError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['render-toy', 'report-toy', 'train-toy'] 2", "config: toy.seeds=0 is outside [1, inf) (default: 3)"]


def config_takers(path: Path) -> list[str]:
    """The functions of a module with a parameter named ``cfg`` (the whole config), as module.function."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return [f"{module}.{node.name}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and "cfg" in [a.arg for a in node.args.args + node.args.kwonlyargs]]


# the kaldi layer's functions that take the whole config: each stage's entry point and the readers of its sections
KALDI_CONFIG_READERS = {"run", "run_align", "train", "training_settings", "of", "language_model"}


def test_below_the_experiments_the_config_comes_in_sections() -> None:
    """Ground modules take no config (``asrkd.sections`` reads it for them); a kaldi module takes it
    only at its stage's entry point; and nothing below the experiments builds a changed config (a
    stage reads the config it is given; an experiment composes the configs of its stages)."""
    ground = [path for path in library_files() if path.parent == REPO / "asrkd" and path.stem not in ("cli", "evaluate", "sections", "__init__")]
    assert {"data", "stage", "jobs", "report", "layout"} <= {path.stem for path in ground}
    assert [f for path in ground for f in config_takers(path)] == []
    kaldi = [f for path in (REPO / "asrkd" / "kaldi").glob("*.py") for f in config_takers(path)]
    assert kaldi and [f for f in kaldi if f.rsplit(".", 1)[1] not in KALDI_CONFIG_READERS] == []
    below = [path for path in library_files() if "experiments" not in path.parts and path.stem != "cli"]
    rewrites = re.compile(r"OmegaConf\.(merge|update)\(|\.merge_with\(|\bcfg(\.\w+)+ = |\bcfg\[[^]]+\] = ")
    assert [f"{path.relative_to(REPO)}:{n}" for path in below for n, line in enumerate(path.read_text().splitlines(), 1)
            if rewrites.search(line)] == []
