"""A mistake never costs a trained model: validate first, replace last, lock, say the fix.

Each test is a row of docs/reliability.md; each is a careless user's mistake on a finished run.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from omegaconf import OmegaConf

from asrkd import cli, evaluate, files, locks, sections, stage
from asrkd.errors import CorruptOutput, StageError, StageLocked
from asrkd.nnet import decode, train
from asrkd.nnet.training_set import TrainingSet
from asrkd.report import merge_into_report, portable
from asrkd.schema import DECLARED, ConfigError, leaves
from asrkd.stage import input_fingerprint, plan, previous_path
from local import an4 as an4_prep

from conftest import REPO, TINY, tiny_config
from .test_reliability import clone, state_dicts_equal, training_command

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def cli_args(root: Path, *overrides: str) -> list[str]:
    return [f"corpus_dir={root}/corpus", f"data_dir={root}/data", f"exp_dir={root}/exp", *TINY, *overrides]


# ----------------------------------------------------------------------------- validate first


def test_a_value_of_the_wrong_type_is_one_line_and_changes_nothing(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    before = snapshot(model_dir)
    for override, expected in (("train.epochs=l2", "config: train.epochs='l2' is not an integer (default: 12)"),
                               ("train.lr=fast", "config: train.lr='fast' is not a number (default: 0.001)"),
                               ("stats.unit=speakers", "config: stats.unit='speakers' is not one of utterance, speaker (default: 'utterance')")):
        result = subprocess.run([sys.executable, "-m", "asrkd.cli", "train-dnn", *cli_args(root, "redo=true", override)],
                                capture_output=True, text=True, env=ENV)
        assert result.returncode != 0 and result.stderr.strip().splitlines() == [f"asrkd train-dnn: {expected}"]
    assert snapshot(model_dir) == before and not previous_path(model_dir).exists()
    train.run(tiny_config(root))  # the right command finds the model complete and current: no leftover plan refuses it


def test_a_value_out_of_range_or_an_unknown_key_is_one_line_and_changes_nothing(run_dir: Path, tmp_path: Path) -> None:
    """A value of the right type but out of range (a percentage given for a fraction) is refused
    before any stage plans, as is a key added with ``+`` that no section has."""
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    before = snapshot(model_dir)
    for override, expected in (("train.valid_fraction=10", "config: train.valid_fraction=10 is outside (0, 1) (default: 0.1)"),
                               ("train.valid_fraction=1", "config: train.valid_fraction=1 is outside (0, 1) (default: 0.1)"),
                               ("model.hidden_dim=0", "config: model.hidden_dim=0 is outside [1, inf) (default: 64)"),
                               ("train.epochs=-3", "config: train.epochs=-3 is outside [1, inf) (default: 12)"),
                               ("train.batch_size=0", "config: train.batch_size=0 is outside [1, inf) (default: 256)"),
                               ("model.dropout=1.0", "config: model.dropout=1.0 is outside [0, 1) (default: 0.0)"),
                               ("+train.epoch=3", "config: unknown key 'train.epoch'; did you mean 'train.epochs'?")):
        result = subprocess.run([sys.executable, "-m", "asrkd.cli", "train-dnn", *cli_args(root, "redo=true", override)],
                                capture_output=True, text=True, env=ENV)
        assert result.returncode != 0 and result.stderr.strip().splitlines() == [f"asrkd train-dnn: {expected}"], override
    assert snapshot(model_dir) == before and not previous_path(model_dir).exists()
    cli.load_config(["+distill.students.top1=[2]", "+function_matching.views.loud={noise_std: 1.0}"])  # sections of names take new ones


def test_a_training_that_learns_nothing_fails_and_keeps_the_old_model(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    before = snapshot(model_dir)
    with pytest.raises(SystemExit) as exit_:  # a rate so small the weights stay where they started
        cli.main(["train-dnn", *cli_args(root, "train.lr=1e-12", "redo=true")])
    message = str(exit_.value.code)
    assert message.startswith(f"asrkd train-dnn: error: {model_dir}: learned nothing: its best validation frame accuracy")
    assert "is no better than before training" in message and "(the old output, if any, is kept)" in message
    assert snapshot(model_dir) == before and not previous_path(model_dir).exists() and not locks.lock_path(model_dir).exists()
    history = [{"valid_frame_accuracy": 0.05}, {"valid_frame_accuracy": 0.1}]
    with pytest.raises(train.LearnedNothing, match=r"its best validation frame accuracy 0.1000 is no better than before training \(0.1000\)"):
        train.check_learned("m", history, 0.1)  # held to where it started
    train.check_learned("m", history, 0.0999)
    data, _, valid_idx, _ = TrainingSet(tiny_config(root)).load()
    with pytest.raises(train.LearnedNothing, match="no training frames"):
        train.train_model(train.TrainSections.of(tiny_config(root)), data, valid_idx[:0], valid_idx, [tmp_path / "none"])


def test_every_key_has_a_type() -> None:
    """A key whose default is null must say its type (else any value passes): a shared section's in
    asrkd.schema.DECLARED, an experiment's in its Experiment's config; each declared key exists."""
    defaults = OmegaConf.to_container(cli.load_config(["model=paper"]), resolve=False)
    declared = cli.CONFIG_TYPES.declared
    keys = leaves(defaults, declared)
    untyped = [k for k, v in keys.items() if v is None and k not in declared]
    assert untyped == [], f"declare their types (asrkd/schema.py, or the experiment's ConfigTypes): {untyped}"
    assert [k for k in declared if k not in keys] == []
    shared = {key.split(".")[0] for key in DECLARED}
    assert not shared & {path.stem for path in (REPO / "asrkd" / "experiments").glob("*/*.yaml")}, "an experiment's keys are typed beside it"
    with pytest.raises(ConfigError, match=r"chains.sizes=\[\[3, 'x'\]\] is not a list of lists of numbers"):
        cli.load_config(["chains.sizes=[[3,x]]"])
    cli.load_config(["distill.temperatures=[1.5,3]", "specialists.epochs=null", "ensemble.fused=true", "train.max_norm=2"])


# ----------------------------------------------------------------------------- replace last


def test_a_failed_redo_puts_the_old_model_and_its_record_back(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    before = snapshot(model_dir)

    def crash(*_args, **_kwargs):
        assert previous_path(model_dir).is_dir()  # the old model is kept aside while the new one trains
        raise RuntimeError("the machine fell over")

    monkeypatch.setattr(train, "train_model", crash)
    with pytest.raises(RuntimeError, match="fell over"):
        cli.main(["train-dnn", *cli_args(root, "train.lr=0.002", "redo=true")])
    assert snapshot(model_dir) == before and not previous_path(model_dir).exists() and not locks.lock_path(model_dir).exists()


def kill_when(command: list[str], ready: Path) -> None:
    """Run ``command`` and SIGKILL it once ``ready`` exists."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_killed_redo_is_put_back_or_finished(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    before = snapshot(model_dir)
    redo = training_command(root, "baseline", "redo=true")  # other settings than the run's baseline
    kill_when(redo, model_dir / "last.pt")
    assert json.loads((previous_path(model_dir) / "stage.json").read_text())["config"]["model.dropout"] == 0.0
    train.run(tiny_config(root))  # the old settings again: the old model is back, current, nothing retrained
    assert snapshot(model_dir) == before and not previous_path(model_dir).exists()
    kill_when(redo, model_dir / "last.pt")
    finished = subprocess.run(redo, env=ENV, capture_output=True, text=True, check=True)  # the redo again: it resumes
    assert "resuming" in finished.stderr and not previous_path(model_dir).exists()
    assert json.loads((model_dir / "stage.json").read_text())["config"]["model.dropout"] == 0.2


# ----------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("signal_, code, said", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_an_interrupted_redo_is_one_line_and_gives_the_old_model_back(run_dir: Path, tmp_path: Path, signal_: int, code: int,
                                                                      said: str) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    before = snapshot(model_dir)
    # Ctrl-C's default action in the child, as at a terminal: a suite started as a background job (no job control)
    # has SIGINT ignored, which every child inherits, and the training would never see it
    process = subprocess.Popen(training_command(root, "baseline", "redo=true", "train.epochs=30"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (model_dir / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal_)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"asrkd train-dnn: stopped by {said}; {model_dir}: the old output is back in place"
    assert snapshot(model_dir) == before and not previous_path(model_dir).exists() and not locks.lock_path(model_dir).exists()


def test_a_full_disk_in_make_feats_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path, exp=False)
    with small_disk(root / "exp", 300_000) as limited:  # the features of 8 speakers take megabytes
        result = subprocess.run([sys.executable, "-m", "asrkd.cli", "make-feats", f"data_dir={root}/data", f"exp_dir={root}/exp",
                                 "jobs.nj=1", "log_level=WARNING"], capture_output=True, text=True, env=ENV, **limited)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("asrkd make-feats: error: ") and str(root / "exp" / "feats") in last
    assert "no space left" in last or "file too large" in last


# ----------------------------------------------------------------------------- checksums


def test_a_model_changed_in_place_with_its_size_and_time_kept_is_found(run_dir: Path, tmp_path: Path) -> None:
    """A model's SHA-256 is compared whenever it is read, not only when its time moved."""
    root = clone(run_dir, tmp_path)
    model = root / "exp" / "dnn" / "baseline" / "final.pt"
    times = model.stat()
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # one byte of the weights
    model.write_bytes(bytes(data))
    os.utime(model, ns=(times.st_atime_ns, times.st_mtime_ns))
    with pytest.raises(CorruptOutput, match="final.pt changed since its stage wrote it"):
        decode.run(tiny_config(root, "redo=true"))
    features = root / "exp" / "feats" / "fbank" / "test"
    index = features / "index.json"
    text, times = index.read_text(), index.stat()
    index.write_text(text.replace("0", "1", 1))
    os.utime(index, ns=(times.st_atime_ns, times.st_mtime_ns))
    input_fingerprint(features)  # any other file: compared when its time moved, or at verify=true
    files.verify_every_file(True)
    try:
        with pytest.raises(CorruptOutput, match="index.json changed since its stage wrote it"):
            input_fingerprint(features)
    finally:
        files.verify_every_file(False)


# ----------------------------------------------------------------------------- one writer of a shared report


def test_reports_merging_at_once_each_keep_their_keys(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, f"results_dir={root}/results")
    script = ("import sys; from asrkd import sections; from asrkd.cli import load_config; from asrkd.report import merge_into_report; "
              "merge_into_report(sections.report_place(load_config(sys.argv[1:])), {'second': 2})")
    with locks.exclusive(root / "results" / ".report.lock"):  # as a first merge would hold it
        second = subprocess.Popen([sys.executable, "-c", script, *cli_args(root, f"results_dir={root}/results")], env=ENV)
        time.sleep(3)
        assert second.poll() is None  # waits for the first
    assert second.wait(timeout=60) == 0
    merge_into_report(sections.report_place(cfg), {"first": 1})
    report = json.loads((root / "results" / "report.json").read_text())
    assert report["first"] == 1 and report["second"] == 2


# ----------------------------------------------------------------------------- checksums, truncation


def test_a_corrupt_model_is_named_and_redo_remakes_it(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "baseline"
    shutil.copyfile(model_dir / "final.pt", tmp_path / "good.pt")
    with open(model_dir / "final.pt", "r+b") as f:
        f.truncate(1000)
    message = r"baseline is corrupt: final.pt has 1000 bytes, its stage wrote \d+ .*rerun its stage \(train-dnn baseline\) with redo=true"
    with pytest.raises(CorruptOutput, match=message):
        decode.run(tiny_config(root))  # found when read
    with pytest.raises(CorruptOutput, match=message):
        train.run(tiny_config(root))  # and when its stage is planned without redo
    train.run(tiny_config(root, "redo=true"))  # the fix the message gives works though the settings did not change
    assert state_dicts_equal(tmp_path / "good.pt", model_dir / "final.pt")
    history = model_dir / "history.json"
    history.write_text(history.read_text().replace("0.", "1.", 1))  # same size, other bytes
    with pytest.raises(CorruptOutput, match="history.json changed since its stage wrote it"):
        input_fingerprint(model_dir)


# ----------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(where: Path, size: int) -> Iterator[dict]:
    """``where`` on a real file system of ``size`` bytes (a tmpfs) when this machine lets us mount
    one; else the same limit as the process's file size limit (RLIMIT_FSIZE: writes past it fail
    with EFBIG). Yields the subprocess.run keywords that put a command under the limit."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                                       capture_output=True).returncode == 0
    if mounted:
        try:
            yield {}
        finally:
            subprocess.run(["umount", str(where)], check=True)
        return

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    yield {"preexec_fn": limit}


def test_a_full_disk_during_a_checkpoint_or_an_array_write_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    with small_disk(root / "exp" / "dnn" / "full", 200_000) as limited:  # a checkpoint of the tiny model is ~330 kB
        result = subprocess.run(training_command(root, "full", "log_level=WARNING"), capture_output=True, text=True, env=ENV, **limited)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("asrkd train-dnn: error: ") and "full/best.pt" in last and "(earlier outputs are intact)" in last
        assert "no space left" in last or "file too large" in last
        script = ("from pathlib import Path; from asrkd.distill.soft_targets import ArrayWriter; "
                  f"ArrayWriter(Path({str(root / 'exp' / 'dnn' / 'full' / 'store')!r}), {{'dense': ((4000, 400), 'float16')}})")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, **limited)
        assert result.returncode != 0 and ("no space left" in result.stderr or "file too large" in result.stderr)
        assert result.returncode != -signal.SIGBUS


# ----------------------------------------------------------------------------- one run at a time


def test_a_second_run_of_a_stage_is_refused_and_a_dead_runs_lock_taken_over(
        run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = clone(run_dir, tmp_path)
    model_dir = root / "exp" / "dnn" / "second"
    first = subprocess.Popen(training_command(root, "second", "train.epochs=30"), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (model_dir / "stage.partial.json").exists() and time.time() < deadline:
            time.sleep(0.01)
        cfg = tiny_config(root, "model.dropout=0.2", "train.epochs=30", "train.batch_size=16", "train.name=second")
        with pytest.raises(StageLocked, match=f"being made by another run: pid {first.pid} on {socket.gethostname()} .*train-dnn"):
            train.run(cfg)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    stage_ = plan("train-dnn second", model_dir, sections.settings(tiny_config(root, "train.name=second", "redo=true"), train.TRAIN_KEYS))  # its holder is gone:
    assert f"taking over the lock {locks.lock_path(model_dir)} of pid {first.pid}" in caplog.text
    stage_.abandon()  # taken over, and said so
    assert not locks.lock_path(model_dir).exists()


# ----------------------------------------------------------------------------- code and commands in the record


def test_a_rerun_under_other_code_warns_and_redo_remakes(run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = clone(run_dir, tmp_path)
    record_path = root / "exp" / "dnn" / "baseline" / "stage.json"
    record = json.loads(record_path.read_text())
    assert record["code"]["version"] and record["code"]["modules"]["asrkd.nnet.train"] == stage.module_source_hash("asrkd.nnet.train")
    record["code"]["modules"]["asrkd.nnet.train"] = "0" * 16  # as if the training code had changed since
    record_path.write_text(json.dumps(record))
    before = snapshot(root / "exp" / "dnn" / "baseline")
    train.run(tiny_config(root))
    assert "made by other code (changed since: asrkd.nnet.train)" in caplog.text and snapshot(root / "exp" / "dnn" / "baseline") == before
    train.run(tiny_config(root, "redo=true"))
    assert json.loads(record_path.read_text())["code"]["modules"]["asrkd.nnet.train"] == stage.module_source_hash("asrkd.nnet.train")


def test_the_report_names_each_rows_command_and_says_when_configs_mix(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cli.main(["train-dnn", *cli_args(root, "model.hidden_dim=32", "redo=true")])
    decode.run(tiny_config(root, "redo=true"))
    evaluate.run(tiny_config(root))
    report = json.loads((root / "exp" / "report" / "report.json").read_text())
    made_by = report["systems"]["baseline"]["stage"]["baseline"]["made_by"]
    assert "model.hidden_dim=32" in made_by["overrides"] and made_by["command"].startswith("asrkd train-dnn")
    assert report["mixed_configs"]["baseline"]["differs"] == ["model.hidden_dim=32 (here 64)"]
    assert "**This report mixes configs**: baseline was made with model.hidden_dim=32 (here 64)" in (root / "exp" / "report" / "report.md").read_text()
    assert report["mixed_configs"].keys() == {"baseline"}  # the GMM row was made under this config


def test_reports_commit_relative_paths_and_a_rerun_changes_no_byte(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reports = []
    for where in ("one", "elsewhere/two"):
        root = clone(run_dir, tmp_path / where)
        monkeypatch.chdir(root)
        for _ in range(2):
            evaluate.run(tiny_config(Path("."), "results_dir=results"))
            reports.append((root / "results" / "report.json").read_bytes())
    config = json.loads(reports[0])["config"]
    assert len(set(reports)) == 1 and not [v for v in leaves(config, DECLARED).values() if isinstance(v, str) and v.startswith("/")]
    assert portable({"results_dir": str(REPO / "results" / "an4"), "n": 3, "overrides": [f"results_dir={REPO}/results"]}) == \
        {"results_dir": "results/an4", "n": 3, "overrides": ["results_dir=results"]}


# ----------------------------------------------------------------------------- a missing corpus


def test_a_missing_corpus_is_one_line_naming_the_path_and_the_fix(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default place (../../../shared/corpora/an4) holds nothing from here
    result = subprocess.run([sys.executable, "-m", "local.an4", "corpus_dir=/nonexistent/an4", f"data_dir={tmp_path}/data"],
                            capture_output=True, text=True, env=ENV)
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == (
        "asrkd an4 prep: error: corpus_dir /nonexistent/an4 does not exist: pass --corpus-dir (or $AN4_DIR) the folder holding "
        f"AN4's etc/ and wav/, or leave it out to read {(tmp_path / '../../../shared/corpora/an4').resolve()} or download "
        "http://www.speech.cs.cmu.edu/databases/an4/an4_sphere.tar.gz")
    with pytest.raises(StageError, match=r"could not download AN4 from file:///nonexistent/an4_sphere.tar.gz \(.*\); .*--corpus-dir"):
        an4_prep.prepare(tiny_config(tmp_path, "corpus_dir=null", "prep.download_url=file:///nonexistent/an4_sphere.tar.gz"))
    root = clone(run_dir, tmp_path / "prepared", exp=False)
    with pytest.raises(StageError, match="corpus_dir .*/typo does not exist"):  # prepared data dirs do not excuse a typo
        an4_prep.prepare(tiny_config(root, f"corpus_dir={root}/typo"))
    an4_prep.prepare(tiny_config(root, "corpus_dir=null"))  # no corpus given, none at the default place: the data dirs stand


def test_torch_threads_wait_passively_unless_the_environment_chooses() -> None:
    """asrkd sets OMP_WAIT_POLICY before torch loads (spinning threads on shared cores: results/bench/thread_contention.md)."""
    probe = "import os, asrkd, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.strip() == "PASSIVE"
    chosen = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "ACTIVE"
