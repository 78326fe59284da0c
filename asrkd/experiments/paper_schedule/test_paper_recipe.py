"""The paper-size recipe's plumbing (recipes/an4/run_paper.sh) and what carries a prepared recipe
to a machine without the corpus (tools/pack_prepared.py): the GPU run itself needs a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from asrkd.stage import input_fingerprint

from conftest import REPO, TINY

PREPARED = ["data/lang", "data/train", "data/test", "exp/feats/fbank/train", "exp/feats/fbank/test",
            "exp/tri", "exp/tri/ali_train", "exp/tri/ali_test", "exp/graph", "exp/decode/gmm"]


def pack(run_dir: Path, dest: Path) -> str:
    result = subprocess.run(["python", str(REPO / "tools" / "pack_prepared.py"), str(run_dir), str(dest), *PREPARED],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_packed_recipe_keeps_its_fingerprints_without_frames_it_does_not_need(run_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "an4"
    assert "without their frames (exp/feats/mfcc/test, exp/feats/mfcc/train)" in pack(run_dir, dest)
    assert not (dest / "exp" / "feats" / "mfcc" / "train" / "frames.npy").exists()
    assert (dest / "exp" / "feats" / "mfcc" / "train" / "index.json").is_file()  # training checks it against the fbank
    assert (dest / "exp" / "feats" / "fbank" / "train" / "frames.npy").is_file()
    assert not (dest / "exp" / "dnn").exists() and not (dest / "exp" / "mono").exists()
    for path in ("exp/tri/ali_train", "exp/graph", "exp/decode/gmm"):
        assert input_fingerprint(dest / path) == input_fingerprint(run_dir / path)

    result = subprocess.run(["python", str(REPO / "tools" / "pack_prepared.py"), str(run_dir), str(tmp_path / "x"), "exp/tri/ali_nothing"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "exp/tri/ali_nothing" in result.stderr and "run its stage first" in result.stderr


@pytest.fixture
def recipe_copy(tmp_path: Path) -> Path:
    """recipes/{stages.sh,an4/run*.sh} under tmp_path: the recipe's data/ exp/ results/ land there."""
    (tmp_path / "recipes" / "an4").mkdir(parents=True)
    shutil.copy2(REPO / "recipes" / "stages.sh", tmp_path / "recipes")
    for script in (REPO / "recipes" / "an4").glob("run*.sh"):
        shutil.copy2(script, tmp_path / "recipes" / "an4")
    return tmp_path / "recipes" / "an4"


SCHEDULE = ["paper_schedule.learning_rates=[0.001,0.003]", "paper_schedule.batch_size=128", "paper_schedule.epochs=2",
            "paper_schedule.patience=1"]  # a sweep of the tiny model, in seconds


def test_the_paper_recipe_says_what_a_cpu_without_bf16_matrix_units_would_cost(run_dir: Path) -> None:
    from asrkd.experiments.paper_schedule.experiment import FP32_BENCH, RECIPE_MODEL_EPOCHS
    from asrkd.machine import cpu_flags

    def check(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "asrkd.cli", "check-paper-machine", "exp_dir=exp", "model=paper", "train.device=cpu",
                               *overrides], cwd=run_dir, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    refused = check()  # fp32 on a CPU: the hours it would take, one line, and no
    frames = json.loads((run_dir / "exp" / "feats" / "fbank" / "train" / "index.json").read_text())["offsets"][-1]
    fps = max(run["trainer_fps"] for run in json.loads(FP32_BENCH.read_text())["runs"])
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("asrkd check-paper-machine: error: ")
    assert f"take about {RECIPE_MODEL_EPOCHS * frames / fps / 3600:.0f} hours" in refused.stderr
    assert check("train.bf16_autocast=true").returncode == (0 if {"amx_bf16", "avx512_bf16"} & cpu_flags() else 1)


def test_the_paper_recipe_needs_the_prepared_stages(recipe_copy: Path) -> None:
    result = subprocess.run(["bash", str(recipe_copy / "run_paper.sh")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "exp/feats/fbank/train/stage.json is missing: run recipes/an4/run.sh --stop-stage 6 first" in result.stderr


def copy_from_repo(root: Path, *paths: str) -> None:
    """The repository's ``paths`` into ``root`` at the same places (a recipe copy's tools and bench)."""
    for path in paths:
        (root / path).parent.mkdir(exist_ok=True)
        shutil.copy2(REPO / path, root / path)


def test_the_gpu_run_script_runs_the_paper_recipe_from_a_packed_recipe_with_its_models_apart(run_dir: Path, recipe_copy: Path,
                                                                                           tmp_path: Path) -> None:
    """tools/gpu_paper_run.sh, dry on CPU with the tiny model: the prepared recipe unpacked, the
    bench, run_paper.sh's baseline, and what comes back (few files, the tar of the results)."""
    root = recipe_copy.parent.parent
    copy_from_repo(root, "tools/gpu_paper_run.sh", "tools/offline_env.sh", "bench/train_throughput.py")
    pack(run_dir, tmp_path / "carry")
    env = {k: v for k, v in os.environ.items() if k not in ("ASRKD_OUTER_RECIPE", "ASRKD_RECIPE_COMMAND")}
    env |= {"PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    command = ["bash", str(root / "tools" / "gpu_paper_run.sh"), str(out), "--prepared", str(tmp_path / "carry"),
               "--stop-stage", "2", "--dry-run", "--", *TINY, "train.num_threads=1", *SCHEDULE]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "exp_paper/graph is complete and current, skipping" in log
    assert "exp_paper/decode/gmm is complete and current, skipping" in log
    for link in ("feats", "tri", "graph", "decode/gmm"):
        assert (recipe_copy / "exp_paper" / link).is_symlink()
    assert (recipe_copy / "exp_paper" / "dnn" / "baseline" / "stage.json").is_file()
    assert not (recipe_copy / "exp" / "dnn").exists()  # the small model's place stays untouched
    report = json.loads((root / "results" / "an4_paper" / "report.json").read_text())
    assert report["command"].startswith("recipes/an4/run_paper.sh -- train.bf16_autocast=true")  # the recipe run, not the inner one
    assert report["command"].endswith(" ".join([*TINY, "train.num_threads=1", *SCHEDULE])) and report["config"]["model"]["hidden_dim"] == 64  # the overrides follow
    assert report["config"]["exp_dir"] == "exp_paper" and set(report["systems"]) >= {"gmm", "baseline"}
    # what the device returns: at most 8 plain files, one folder down at most
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["an4_paper.tar", "run.log", "steps.json", "train_throughput.json"], returned
    steps = json.loads((out / "steps.json").read_text())
    assert [(name, step["status"]) for name, step in steps.items()] == [("check", 0), ("bench", 0), ("paper-0-2", 0), ("paper-3", 0), ("paper-5", 0)]
    check = report["bf16_check"]  # bf16 against fp32 first, the same seeds and frames: a difference with its interval
    assert check["rows"]["fp32"]["systems"] == ["bf16check_fp32", "bf16check_fp32_seed1", "bf16check_fp32_seed2"]
    assert check["difference"]["ci"][0] <= check["difference"]["estimate"] <= check["difference"]["ci"][1] and check["unit"] == "speaker"
    assert (check["rows"]["bf16"]["stage"]["bf16check_bf16"]["config"]["train.bf16_autocast"],
            check["rows"]["fp32"]["stage"]["bf16check_fp32"]["config"]["train.bf16_autocast"]) == (True, False)
    chosen = report["paper_schedule"]["chosen"]  # stage 1 chose the schedule on validation; the baseline trained on it (TINY's epochs win)
    assert chosen["lr"] in (0.001, 0.003) and chosen["dropout"] in (0.0, 0.2) and chosen["batch_size"] == 128
    assert [(row["lr"], row["dropout"]) for row in report["paper_schedule"]["candidates"]] == [(0.001, 0.0), (0.003, 0.0), (0.001, 0.2), (0.003, 0.2)]
    baseline = json.loads((recipe_copy / "exp_paper" / "dnn" / "baseline" / "stage.json").read_text())["config"]
    assert (baseline["train.lr"], baseline["model.dropout"], baseline["train.epochs"]) == (chosen["lr"], chosen["dropout"], 2)
    bench = json.loads((out / "train_throughput.json").read_text())
    assert [run["batch"] for run in bench["runs"]] == [64] and bench["profile"] is None  # batches under 1024 are not profiled
    assert bench["model"] == "2x64" and bench["bf16_autocast"]  # the bench took the overrides given (model=tiny)
    with tarfile.open(out / "an4_paper.tar") as tar:
        names = set(tar.getnames())
    assert {"results/an4_paper/report.json", "recipes/an4/exp_paper/dnn/baseline/history.json",
            "recipes/an4/exp_paper/decode/baseline/wer.json"} <= names, sorted(names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check refuses a machine without a GPU")
def test_the_gpu_run_stops_at_once_where_torch_sees_no_gpu(recipe_copy: Path, tmp_path: Path) -> None:
    root = recipe_copy.parent.parent
    copy_from_repo(root, "tools/gpu_paper_run.sh", "tools/offline_env.sh")
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(root / "tools" / "gpu_paper_run.sh"), str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert "torch sees no GPU: the paper-size run would take days here (--dry-run runs on a CPU)" in (out / "run.log").read_text()
    assert list(json.loads((out / "steps.json").read_text())) == ["check"]  # nothing after it ran


def test_relative_corpus_and_results_dirs_are_read_from_where_the_recipe_is_run(tmp_path: Path) -> None:
    recipe = tmp_path / "repo" / "recipes" / "mine"
    recipe.mkdir(parents=True)
    shutil.copy2(REPO / "recipes" / "stages.sh", recipe.parent)
    (recipe / "run.sh").write_text('. "$(dirname "$0")/../stages.sh"\necho "$corpus_dir|$PWD|$ASRKD_RECIPE_COMMAND|${overrides[*]}"\n')
    (tmp_path / "work").mkdir()
    result = subprocess.run(["bash", str(recipe / "run.sh"), "--corpus-dir", "data/mine", "--", "corpus=mine", "results_dir=results/mine",
                             "exp_dir=exp", "graph.lm_arpa=lm/my.arpa"], cwd=tmp_path / "work", capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    corpus_dir, cwd, command, overrides = result.stdout.strip().split("|")
    assert corpus_dir == str(tmp_path / "work" / "data" / "mine") and cwd == str(recipe)  # not recipes/mine/data/mine
    # results_dir and the user's ARPA too (results were written under recipes/mine/results/mine); the recipe's own dirs stay the recipe's
    assert overrides == f"corpus=mine results_dir={tmp_path / 'work' / 'results' / 'mine'} exp_dir=exp graph.lm_arpa={tmp_path / 'work' / 'lm' / 'my.arpa'}"
    assert command == "recipes/mine/run.sh --corpus-dir data/mine -- corpus=mine results_dir=results/mine exp_dir=exp graph.lm_arpa=lm/my.arpa"  # as typed
