"""Stages you can trust: fingerprints, atomic writes, kills and resumes, numerics, bad input.

Every case here is a row of docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.kaldi import features, gmm, lang
from asrkd.nnet import decode

from asrkd import cli, evaluate, sections
from asrkd.report import markdown_table

from asrkd.distill import soft_targets

from asrkd.distill.target_store import ArrayWriter

from asrkd.cli import ConfigError, load_config
from asrkd.data import DataDir, DataDirError
from asrkd.distill.target_store import SoftTargetMismatch, SoftTargetStore
from asrkd.drops import TooManyDropped, account_dropped
from asrkd.errors import StageError, StageMismatch, StaleInput
from asrkd.files import atomic_write, write_json
from asrkd.nnet import checkpoints, train
from asrkd.nnet.checkpoints import load_model, load_system
from asrkd.nnet.training_set import FrameData, TrainingSet
from asrkd.stage import input_fingerprint, plan
from asrkd.stores import FeatureStore
from local import an4 as an4_prep

from conftest import REPO, make_mini_an4, tiny_config


def clone(run_dir: Path, dest: Path, *, exp: bool = True) -> Path:
    """A copy of a run's data (and exp) dirs, to break without touching the shared run."""
    shutil.copytree(run_dir / "data", dest / "data", symlinks=True)
    if exp:
        shutil.copytree(run_dir / "exp", dest / "exp", symlinks=True)
    return dest


def state_dicts_equal(a: Path, b: Path) -> bool:
    first, second = torch.load(a, weights_only=False)["model"], torch.load(b, weights_only=False)["model"]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- fingerprints


def test_a_changed_config_is_refused_with_the_keys_and_both_values(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    with pytest.raises(StageMismatch) as err:
        train.run(tiny_config(root, "train.lr=0.01", "model.hidden_dim=32"))
    message = str(err.value)
    assert "train-dnn baseline" in message and "model.hidden_dim: 64 -> 32" in message and "train.lr: 0.001 -> 0.01" in message
    assert "redo=true" in message


def test_redo_remakes_a_stage_and_what_depends_on_it_is_stale(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    train.run(tiny_config(root, "train.lr=0.002", "redo=true"))
    assert json.loads((root / "exp" / "dnn" / "baseline" / "stage.json").read_text())["config"]["train.lr"] == 0.002
    with pytest.raises(StageMismatch, match="decode baseline.*input model baseline"):
        decode.run(tiny_config(root, "train.lr=0.002"))  # its decode was made from the old model
    decode.run(tiny_config(root, "train.lr=0.002", "redo=true"))
    assert json.loads((root / "exp" / "decode" / "baseline" / "stage.json").read_text())["inputs"]["model baseline"]["fingerprint"] == \
        input_fingerprint(root / "exp" / "dnn" / "baseline")


def test_an_eval_set_with_new_words_leaves_the_lang_dir_and_the_models_and_is_aligned_with_its_words(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    test, trained_words = DataDir.read(root / "data" / "test"), set((root / "data" / "train" / "text").read_text().split())
    new_words = {u: set(t.split()) - trained_words for u, t in test.text.items()}
    extra = test.subset([u for u in test.utt_ids if new_words[u]])  # test's own audio, under a new name
    word = sorted(set().union(*new_words.values()))[0]
    extra.write(root / "data" / "eval_new")
    lang_fingerprint = json.loads((root / "data" / "lang" / "stage.json").read_text())["fingerprint"]
    cfg = tiny_config(root, "eval_sets=[test,eval_new]", "jobs.nj=1")
    lang.run(cfg)
    features.run(cfg)
    gmm.run(cfg)  # the GMM stays; only the new set is aligned, with a lang of its own
    assert json.loads((root / "data" / "lang" / "stage.json").read_text())["fingerprint"] == lang_fingerprint
    alignment = root / "exp" / "tri" / "ali_eval_new"
    assert f"\n{word} " not in (root / "data" / "lang" / "words.txt").read_text()
    assert f"\n{word} " in (alignment / "lang" / "words.txt").read_text()
    assert json.loads((alignment / "stage.json").read_text())["summary"]["aligned"] >= len(extra.utt_ids) - 1
    load_system(root / "exp", "baseline", torch.device("cpu"))  # not stale



def test_prepare_lang_refuses_an_eval_set_spelling_a_training_word_in_another_case(run_dir: Path, tmp_path: Path) -> None:
    """The stage itself, not only its helper: an eval set's transcript with a training word lower-cased
    stops prepare-lang before it plans, and the lang dir stays as it was."""
    root = clone(run_dir, tmp_path, exp=False)
    text = root / "data" / "test" / "text"
    utt, words = text.read_text().splitlines()[0].split(" ", 1)
    word = next(w for w in words.split() if f" {w} " in f" {(root / 'data' / 'train' / 'text').read_text()} ")
    lines = text.read_text().splitlines()
    text.write_text("\n".join([f"{utt} {words.replace(word, word.lower(), 1)}", *lines[1:]]) + "\n")
    record = (root / "data" / "lang" / "stage.json").read_bytes()
    with pytest.raises(ValueError, match=f"spelled in two cases across .*: {word}/{word.lower()}"):
        lang.run(tiny_config(root, "redo=true"))
    assert (root / "data" / "lang" / "stage.json").read_bytes() == record


def test_the_align_stage_stops_past_max_drop_fraction_on_a_set_that_trains_and_never_on_a_scored_one(run_dir: Path, tmp_path: Path) -> None:
    """A data dir a quarter of whose transcripts the audio cannot hold (a sentence said 40 times over:
    more HMM states than frames, no alignment): aligned as a set that is not scored (as train is),
    the stage stops past prep.max_drop_fraction; named in eval_sets, the same drops are counted and listed."""
    root = clone(run_dir, tmp_path)
    test = DataDir.read(root / "data" / "test")
    broken = test.utt_ids[: max(2, len(test.utt_ids) // 4)]
    DataDir(wav_scp=dict(test.wav_scp), utt2spk=dict(test.utt2spk),
            text={u: (" ".join([t] * 40) if u in broken else t) for u, t in test.text.items()}).write(root / "data" / "heard")
    features.run(tiny_config(root, "features.sets=[heard]", "jobs.nj=1"))
    with pytest.raises(TooManyDropped, match=f"align heard: dropped {len(broken)} of {len(test.utt_ids)} utterances, more than "
                                             "prep.max_drop_fraction=0.05"):
        gmm.run_align(tiny_config(root, "features.sets=[heard]", "jobs.nj=1"))
    gmm.run_align(tiny_config(root, "features.sets=[heard]", "eval_sets=[test,heard]", "jobs.nj=1"))
    listed = json.loads((root / "exp" / "tri" / "ali_heard" / "dropped.json").read_text())
    assert sorted(listed["dropped"]) == broken and listed["total"] == len(test.utt_ids)
    # frame accuracy on the set is over the utterances it aligned: the same audio and transcripts as test's others,
    # so it is test's per-utterance counts summed over those (a second route), never counting the dropped ones' frames
    scored = evaluate.FrameScorer(tiny_config(root, "eval_sets=[test,heard]")).score("baseline", {})
    kept = {u: counts for u, counts in scored["test"]["utterances"].items() if u not in broken}
    assert sorted(scored["heard"]["utterances"]) == sorted(kept)
    correct, frames = (sum(counts[i] for counts in kept.values()) for i in (0, 1))
    assert scored["heard"]["frames"] == frames and scored["heard"]["frame_accuracy"] == pytest.approx(correct / frames, abs=1e-12)

def test_new_words_in_train_make_the_lang_dir_and_everything_built_on_it_stale(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    text = root / "data" / "train" / "text"
    lines = text.read_text().splitlines()
    text.write_text("\n".join([lines[0] + " ZEBRA", *lines[1:]]) + "\n")
    with pytest.raises(StageMismatch, match="prepare-lang.*vocabulary"):
        lang.run(tiny_config(root))
    lang.run(tiny_config(root, "redo=true"))
    features.run(tiny_config(root, "redo=true", "features.sets=[train]"))  # the data dir changed too
    with pytest.raises(StageMismatch, match="train-gmm.*input lang"):
        gmm.run(tiny_config(root))
    with pytest.raises(StaleInput, match="baseline is stale"):  # trained on the transcripts and alignment as they were
        load_system(root / "exp", "baseline", torch.device("cpu"))


def test_a_partial_run_of_other_settings_and_unrecorded_outputs_are_refused(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, "train.name=other")
    stage = plan("train-dnn other", root / "exp" / "dnn" / "other", sections.settings(cfg, train.TRAIN_KEYS))
    assert not stage.up_to_date and (root / "exp" / "dnn" / "other" / "stage.partial.json").is_file()
    # a run that failed before making anything (its plan alone on disk) does not stand in the way of the right command
    replanned = plan("train-dnn other", root / "exp" / "dnn" / "other", sections.settings(tiny_config(root, "train.name=other", "train.epochs=3"), train.TRAIN_KEYS))
    assert json.loads((root / "exp" / "dnn" / "other" / "stage.partial.json").read_text())["fingerprint"] == replanned.fingerprint
    (root / "exp" / "dnn" / "other" / "last.pt").write_bytes(b"progress")  # one that got somewhere is refused
    with pytest.raises(StageMismatch, match="partly made \\(interrupted\\)"):
        plan("train-dnn other", root / "exp" / "dnn" / "other", sections.settings(tiny_config(root, "train.name=other", "train.epochs=5"), train.TRAIN_KEYS))
    replanned.abandon(failed=True)  # a run that stopped on an error (not a kill) left it: no run to resume, cleared for the right command
    fixed = plan("train-dnn other", root / "exp" / "dnn" / "other", sections.settings(tiny_config(root, "train.name=other", "train.epochs=5"), train.TRAIN_KEYS))
    assert not (root / "exp" / "dnn" / "other" / "last.pt").exists() and not fixed.up_to_date
    legacy = root / "exp" / "dnn" / "legacy"
    legacy.mkdir()
    (legacy / ".done").write_text("")
    with pytest.raises(StageMismatch, match="without a stage record"):
        plan("train-dnn legacy", legacy, sections.settings(cfg, train.TRAIN_KEYS))


def test_a_report_carries_each_systems_fingerprint_and_config(run_dir: Path) -> None:
    report = json.loads((run_dir / "exp" / "report" / "report.json").read_text())
    stage = report["systems"]["baseline"]["stage"]["baseline"]
    assert stage["fingerprint"] == input_fingerprint(run_dir / "exp" / "dnn" / "baseline")
    assert stage["config"]["train.epochs"] == 2 and stage["decode_fingerprint"] == input_fingerprint(run_dir / "exp" / "decode" / "baseline")
    assert report["gmm"]["fingerprint"] == input_fingerprint(run_dir / "exp" / "tri")


def test_reports_merge_into_the_committed_results(run_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    committed = json.loads((run_dir / "exp" / "report" / "report.json").read_text())
    committed["distillation"] = {"gain_kept": 0.5}
    committed["systems"]["ensemble"] = {"model": "10 x 4x512", "frame_accuracy": {"test": 0.58}}
    write_json(results / "report.json", committed)
    root = clone(run_dir, tmp_path / "fresh")
    shutil.rmtree(root / "exp" / "report")  # a fresh clone's run: no exp/report yet
    evaluate.run(tiny_config(root, f"results_dir={results}"))
    merged = json.loads((results / "report.json").read_text())
    assert merged["distillation"] == {"gain_kept": 0.5} and "ensemble" in merged["systems"] and "baseline" in merged["systems"]
    assert "| ensemble |" in (results / "report.md").read_text()


def test_a_run_writes_under_its_exp_dir_and_publish_merges_into_the_committed_results(run_dir: Path, tmp_path: Path) -> None:
    """No recipe names results_dir: a run never modifies a committed file; `asrkd publish`
    (recipes: --publish) is the explicit step that merges its reports into results/."""
    for recipe in sorted((REPO / "recipes").rglob("run*.sh")):
        assert "results_dir=$root" not in recipe.read_text(), recipe
    results = tmp_path / "results"
    results.mkdir()
    committed = json.loads((run_dir / "exp" / "report" / "report.json").read_text())
    committed["distillation"] = {"gain_kept": 0.5}
    committed["systems"]["ensemble"] = {"system": "ensemble", "model": "10 x 4x512", "frame_accuracy": {"test": 0.58}}
    write_json(results / "report.json", committed)
    before = (results / "report.json").read_bytes()
    root = clone(run_dir, tmp_path / "fresh")
    shutil.rmtree(root / "exp" / "report")
    evaluate.run(tiny_config(root))  # a recipe's report stage: exp/report alone
    assert (results / "report.json").read_bytes() == before and (root / "exp" / "report" / "report.md").is_file()
    (root / "exp" / "report" / "figure.png").write_bytes(b"png")
    cli.main(["publish", f"data_dir={root}/data", f"exp_dir={root}/exp", f"results_dir={results}"])
    merged = json.loads((results / "report.json").read_text())
    assert merged["distillation"] == {"gain_kept": 0.5} and {"ensemble", "baseline", "gmm"} <= set(merged["systems"])
    assert merged["systems"]["baseline"] == json.loads((root / "exp" / "report" / "report.json").read_text())["systems"]["baseline"]
    table = (results / "report.md").read_text()
    assert (results / "figure.png").read_bytes() == b"png"
    # the committed row was scored against labels it does not record: a table of its own, after the current rows
    assert table.index("| baseline |") < table.index("Scored against other labels") < table.index("| ensemble |")
    assert merged["systems"]["baseline"]["labels"] == merged["labels"] and set(merged["labels"]) == {"train", "test"}
    assert "| ensemble | 10 x 4x512 | 1 | – | 58.00% | earlier |" in (results / "RESULTS.md").read_text()
    with pytest.raises(SystemExit, match="publish needs results_dir=DIR"):
        cli.main(["publish", f"exp_dir={root}/exp"])


def test_a_row_whose_intervals_resample_other_units_says_so(run_dir: Path) -> None:
    """The main report's table holds rows later reports added (the distillation's, over speakers):
    each entry records what its intervals resample, and the table names the rows that differ."""
    report = json.loads((run_dir / "exp" / "report" / "report.json").read_text())
    assert report["systems"]["baseline"]["bootstrap_unit"] == report["bootstrap_unit"] == "utterance"
    assert "instead" not in markdown_table(report)
    report["systems"]["ensemble"] = {**report["systems"]["baseline"], "system": "ensemble", "bootstrap_unit": "speaker"}
    assert "Intervals over speakers instead (made by a report with stats.unit=speaker): ensemble." in markdown_table(report).splitlines()



def test_rows_are_comparable_when_their_pdf_ids_are_however_the_alignment_was_made(run_dir: Path, tmp_path: Path) -> None:
    """A report's labels are the alignments' content (pdf-ids and the store index they follow), not
    their history: an alignment remade identically (another lang record, another commit: another
    fingerprint) keeps its rows comparable; other pdf-ids do not."""
    root = clone(run_dir, tmp_path)
    alignment = root / "exp" / "tri" / "ali_test"
    labels, fingerprint = gmm.alignment_labels(alignment), input_fingerprint(alignment)
    record = json.loads((alignment / "stage.json").read_text())
    write_json(alignment / "stage.json", {**record, "fingerprint": "0" * 16, "made_with": "another commit"})
    assert input_fingerprint(alignment) != fingerprint and gmm.alignment_labels(alignment) == labels
    files = {**record["files"], "pdf_ids.npy": {**record["files"]["pdf_ids.npy"], "sha256": "1" * 64}}
    write_json(alignment / "stage.json", {**record, "files": files})
    assert gmm.alignment_labels(alignment) != labels


# ----------------------------------------------------------------------------- atomic writes, kills


def test_an_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text('{"a": ')
            raise KeyboardInterrupt  # a kill mid-write
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_full_disk_or_an_unwritable_dir_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StageError, match="no space left on the device writing .*x.json.*earlier outputs are intact"):
        write_json(target, {"a": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config([f"exp_dir={blocker}/exp", f"data_dir={tmp_path}/data"])
    with pytest.raises(StageError, match="cannot write to .*a-file/exp/x.*writable"):
        plan("x", blocker / "exp" / "x", sections.settings(cfg, ("seed",)))


def training_command(root: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "asrkd.cli", "train-dnn", f"data_dir={root}/data", f"exp_dir={root}/exp", "model=tiny",
            "model.dropout=0.2", "train.epochs=3", "train.batch_size=16", f"train.name={name}", *overrides]


def test_sigkill_during_training_resumes_to_the_same_model(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(training_command(root, "whole"), check=True, env=env, capture_output=True)
    process = subprocess.Popen(training_command(root, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = root / "exp" / "dnn" / "killed" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # during epoch 1: epoch 0 is in last.pt
    process.wait()
    assert not (root / "exp" / "dnn" / "killed" / "stage.json").exists()
    resumed = subprocess.run(training_command(root, "killed"), check=True, env=env, capture_output=True, text=True)
    assert "resuming" in resumed.stderr
    assert state_dicts_equal(root / "exp" / "dnn" / "whole" / "final.pt", root / "exp" / "dnn" / "killed" / "final.pt")
    assert state_dicts_equal(root / "exp" / "dnn" / "whole" / "best.pt", root / "exp" / "dnn" / "killed" / "best.pt")


def test_a_kill_during_a_checkpoint_write_or_a_cut_checkpoint_resumes_to_the_same_model(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    root = clone(run_dir, tmp_path)
    overrides = ("model.dropout=0.2", "train.epochs=3", "train.batch_size=64")
    train.run(tiny_config(root, "train.name=whole", *overrides))
    real_write, calls = checkpoints.write_bytes, []

    def dying_write(path, data):
        calls.append(path)
        if "last.pt" in str(path) and len([c for c in calls if "last.pt" in str(c)]) == 2:
            with atomic_write(path) as tmp:
                tmp.write_bytes(bytes(data)[: len(data) // 2])  # the second epoch's checkpoint, cut by the kill
                raise KeyboardInterrupt
        return real_write(path, data)

    monkeypatch.setattr(checkpoints, "write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(root, "train.name=killed", *overrides))
    monkeypatch.undo()
    out = root / "exp" / "dnn" / "killed"
    assert torch.load(out / "last.pt", weights_only=False)["history"][-1]["epoch"] == 0  # the previous checkpoint, intact
    train.run(tiny_config(root, "train.name=killed", *overrides))
    assert state_dicts_equal(root / "exp" / "dnn" / "whole" / "final.pt", out / "final.pt")
    # a checkpoint cut short by something else (a disk, a copy) in an interrupted run: ignored with a warning, training restarts
    (out / "stage.json").rename(out / "stage.partial.json")
    shutil.copyfile(root / "exp" / "dnn" / "whole" / "final.pt", out / "last.pt")
    with open(out / "last.pt", "r+b") as f:
        f.truncate(200)
    train.run(tiny_config(root, "train.name=killed", *overrides))
    assert "unreadable" in caplog.text and state_dicts_equal(root / "exp" / "dnn" / "whole" / "final.pt", out / "final.pt")


def test_checkpoints_keep_the_last_and_the_best_not_every_epoch(run_dir: Path) -> None:
    out = run_dir / "exp" / "dnn" / "baseline"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "final.pt", "history.json", "stage.json"]


def interrupt_once(monkeypatch: pytest.MonkeyPatch, module, name: str, when) -> None:
    """Make ``module.name`` raise KeyboardInterrupt (a kill) on the first call that ``when`` picks."""
    real = getattr(module, name)

    def dying(*args, **kwargs):
        if when(*args, **kwargs):
            monkeypatch.setattr(module, name, real)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def test_interrupted_feature_alignment_and_soft_target_stages_finish_identically(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asrkd.kaldi.gmm
    import asrkd.stores

    root = clone(run_dir, tmp_path)
    for kind in ("fbank", "mfcc"):
        shutil.rmtree(root / "exp" / "feats" / kind / "test")
    shutil.rmtree(root / "exp" / "tri" / "ali_train")
    cfg = tiny_config(root, "distill.teacher=baseline", "distill.temperatures=[2]", "distill.logit_matching=false")
    # killed after the frames were written, before the index
    interrupt_once(monkeypatch, asrkd.stores, "write_json", lambda path, value: str(path).endswith("test/index.json"))
    with pytest.raises(KeyboardInterrupt):
        features.run(cfg)
    features.run(cfg)
    for kind in ("fbank", "mfcc"):
        a, b = (FeatureStore.load(r / "exp" / "feats" / kind / "test") for r in (run_dir, root))
        assert a.utt_ids == b.utt_ids and np.array_equal(a.frames, b.frames)
    # killed with transition_ids.npy half made, as pdf_ids.npy is opened: neither is left, under any name
    interrupt_once(monkeypatch, np.lib.format, "open_memmap", lambda path, **kwargs: "pdf_ids.npy" in str(path))
    with pytest.raises(KeyboardInterrupt):
        gmm.run_align(cfg)
    assert not any(p.name.endswith(".npy") or ".tmp-" in p.name for p in (root / "exp" / "tri" / "ali_train").iterdir())
    gmm.run_align(cfg)
    assert np.array_equal(np.load(run_dir / "exp" / "tri" / "ali_train" / "pdf_ids.npy"), np.load(root / "exp" / "tri" / "ali_train" / "pdf_ids.npy"))
    soft_targets.run(cfg)
    whole = np.load(root / "exp" / "soft_targets" / "baseline" / "train" / "T2" / "dense.npy")
    shutil.rmtree(root / "exp" / "soft_targets")
    interrupt_once(monkeypatch, ArrayWriter, "close", lambda self: True)
    with pytest.raises(KeyboardInterrupt):
        soft_targets.run(cfg)
    assert not (root / "exp" / "soft_targets" / "baseline" / "train" / "T2" / "dense.npy").exists()  # no half store under the final name
    soft_targets.run(cfg)
    assert np.array_equal(whole, np.load(root / "exp" / "soft_targets" / "baseline" / "train" / "T2" / "dense.npy"))


# ----------------------------------------------------------------------------- numerics


def test_a_loss_turning_nan_stops_training_naming_epoch_and_batch(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, "train.name=diverging")
    training = TrainingSet(cfg)
    data, train_idx, valid_idx, hard = training.load()
    steps = []

    def loss_fn(logits, batch):
        steps.append(1)
        loss = torch.nn.functional.cross_entropy(logits, hard[batch].long())  # the alignment's int32, as int64
        return loss * float("nan") if len(steps) == 4 else loss

    with pytest.raises(train.TrainingDiverged, match="loss is nan at epoch 0, batch 3"):
        train.train_model(train.TrainSections.of(cfg), data, train_idx, valid_idx, [root / "exp" / "dnn" / "diverging"], loss_fn)


def test_non_finite_features_are_dropped_or_refused(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = clone(run_dir, tmp_path)
    test = DataDir.read(root / "data" / "test")
    bad = test.utt_ids[3]
    real = features.compute_fbank

    def fbank(samples, cfg):
        out = real(samples, cfg)
        if len(samples) == len(features.read_waveform(test.wav_scp[bad], bad, 16000)):
            out[5, 2] = np.nan
        return out

    monkeypatch.setattr(features, "compute_fbank", fbank)
    store, dropped = features.make_features(test, tiny_config(root).features, "fbank", tmp_path / "fbank")
    assert bad not in store and "NaN or infinite fbank features" in dropped[bad]
    refuse = partial(account_dropped, "make-feats fbank test", len(test.utt_ids), max_fraction=0.0, report=tmp_path / "refused.json")
    with pytest.raises(TooManyDropped, match="more than prep.max_drop_fraction=0.0"):  # refused before the store is written: none is left behind
        features.make_features(test, tiny_config(root).features, "fbank", tmp_path / "refused", accept_dropped=refuse)
    assert not list((tmp_path / "refused").iterdir())
    path = root / "exp" / "feats" / "fbank" / "test"
    frames = np.load(path / "frames.npy")
    frames[10, 0] = np.inf
    np.save(path / "frames.npy", frames)
    with pytest.raises(ValueError, match="NaN/inf features in 1 utterance"):
        FrameData.load(root / "exp", "test", tiny_config(root).model, torch.device("cpu"))


def test_alignments_that_do_not_fit_the_features_are_refused(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    ali = root / "exp" / "tri" / "ali_test" / "pdf_ids.npy"
    pdf_ids = np.load(ali)
    model_cfg = tiny_config(root).model
    np.save(ali, pdf_ids[:-5])
    with pytest.raises(ValueError, match="has .* frames, the features .*realign"):
        FrameData.load(root / "exp", "test", model_cfg, torch.device("cpu"))
    pdf_ids[7] = 10_000
    np.save(ali, pdf_ids)
    with pytest.raises(ValueError, match="pdf-ids outside"):
        FrameData.load(root / "exp", "test", model_cfg, torch.device("cpu"))


def test_a_cut_model_file_is_named(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "final.pt"
    path.write_bytes((run_dir / "exp" / "dnn" / "baseline" / "final.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="final.pt is truncated or corrupt"):
        load_model(path, torch.device("cpu"))


def test_soft_target_stores_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(12), size=30).astype(np.float32)
    SoftTargetStore.from_probs(probs, 2.0, 3, "abc").save(tmp_path)
    for expected, match in (({"temperature": 5.0}, "temperature=2.0, 5.0 was asked"), ({"num_pdfs": 40}, "num_pdfs=12, 40"), ({"k": 20}, "k=3, 20")):
        with pytest.raises(SoftTargetMismatch, match=match):
            SoftTargetStore.load(tmp_path, "abc", **expected)
    with open(tmp_path / "dense.npy", "r+b") as f:
        f.truncate(500)
    with pytest.raises(ValueError, match="dense.npy is truncated or corrupt.*soft-targets"):
        SoftTargetStore.load(tmp_path, "abc")


# ----------------------------------------------------------------------------- bad input


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    path.unlink(missing_ok=True)
    sf.write(path, samples, rate, subtype="PCM_16")


@pytest.fixture(scope="module")
def defect_run(an4: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An AN4-layout corpus of 40 good utterances and one of every defect, through prep and make-feats."""
    root = tmp_path_factory.mktemp("defects")
    corpus = make_mini_an4(an4, root / "corpus", train_speakers=5, test_speakers=1)
    fileids_path = corpus / "etc" / "an4_train.fileids"
    fileids = fileids_path.read_text().split()[:49]
    wav = {f: corpus / "wav" / f"{f}.wav" for f in fileids}
    audio = {f: sf.read(wav[f], dtype="int16")[0] for f in fileids[:10]}
    defects = {}
    write_wav(wav[fileids[0]], np.stack([audio[fileids[0]]] * 2, axis=1)); defects["stereo"] = fileids[0]  # noqa: E702
    data = wav[fileids[1]].read_bytes()
    wav[fileids[1]].unlink(); wav[fileids[1]].write_bytes(data[: len(data) // 2]); defects["truncated"] = fileids[1]  # noqa: E702
    wav[fileids[2]].unlink(); wav[fileids[2]].write_bytes(b"\x00\x17garbage" * 500); defects["corrupt"] = fileids[2]  # noqa: E702
    wav[fileids[3]].unlink(); wav[fileids[3]].write_text("this is not audio\n"); defects["not audio"] = fileids[3]  # noqa: E702
    write_wav(wav[fileids[4]], audio[fileids[4]][::2], 8000); defects["8 kHz"] = fileids[4]  # noqa: E702
    write_wav(wav[fileids[5]], np.zeros(0, dtype=np.int16)); defects["zero length"] = fileids[5]  # noqa: E702
    wav[fileids[6]].unlink(); defects["missing"] = fileids[6]  # noqa: E702
    transcription = corpus / "etc" / "an4_train.transcription"
    lines = transcription.read_text().splitlines()
    name = lambda f: Path(f).name  # noqa: E731
    lines = [f"<s> </s> ({name(fileids[7])})" if line.endswith(f"({name(fileids[7])})") else line for line in lines]
    lines.append(f"<s> SOMETHING ELSE </s> ({name(fileids[8])})")
    transcription.write_text("\n".join(lines) + "\n")
    defects |= {"empty transcript": fileids[7], "two transcripts": fileids[8], "duplicate id": fileids[9]}
    fileids_path.write_text("\n".join([*fileids, fileids[9]]) + "\n")  # listed twice: 50 lines, 49 utterances, 40 good
    cfg = tiny_config(root, "prep.max_drop_fraction=0.5", "prep.subset_fractions=[]")
    an4_prep.prepare(cfg)
    features.run(cfg)
    utt = lambda f: f"{Path(f).parent.name}-{name(f)}"  # noqa: E731
    return {"root": root, "cfg": cfg, "defects": {k: utt(f) for k, f in defects.items()}, "listed": 50}


def test_the_defect_corpus_is_counted_and_every_defect_named(defect_run: dict) -> None:
    root, defects = defect_run["root"], defect_run["defects"]
    prep = json.loads((root / "data" / "local" / "dropped_train.json").read_text())
    assert prep["total"] == defect_run["listed"]  # the duplicate is counted, not silently replaced
    assert prep["total"] == len(DataDir.read(root / "data" / "train").utt_ids) + len(prep["dropped"])
    reasons = prep["dropped"]
    assert "missing audio" in reasons[defects["missing"]] and "empty transcript" in reasons[defects["empty transcript"]]
    assert "two different transcripts" in reasons[defects["two transcripts"]]
    assert any("duplicate utterance id" in r and defects["duplicate id"] in r for r in reasons.values())
    feats = json.loads((root / "exp" / "feats" / "fbank" / "train" / "dropped.json").read_text())["dropped"]
    expected = {"stereo": "2 channels .*; set features.channel", "truncated": "truncated wav .*its header declares",
                "corrupt": "unreadable audio", "not audio": "unreadable audio", "8 kHz": "sample rate 8000 .*features.resample=true",
                "zero length": "zero-length audio"}
    import re

    for defect, pattern in expected.items():
        assert re.search(pattern, feats[defects[defect]]), (defect, feats[defects[defect]])
    assert len(feats) == len(expected)
    store = FeatureStore.load(root / "exp" / "feats" / "fbank" / "train")
    assert len(store.utt_ids) == 40


def test_a_channel_and_resampling_are_options(defect_run: dict, tmp_path: Path) -> None:
    root, defects = defect_run["root"], defect_run["defects"]
    data = DataDir.read(root / "data" / "train")
    cfg = tiny_config(root, "features.channel=0", "features.resample=true").features
    store, dropped = features.make_features(data.subset([defects["stereo"], defects["8 kHz"]]), cfg, "fbank", tmp_path / "fbank")
    assert not dropped and set(store.utt_ids) == {defects["stereo"], defects["8 kHz"]}
    duration = sf.info(data.wav_scp[defects["8 kHz"]]).duration
    assert abs(len(store[defects["8 kHz"]]) - round(100 * duration)) <= 3  # 10 ms frames of the resampled audio
    with pytest.raises(features.AudioError, match="2 channel.*features.channel=3 is not one of them"):
        features.read_waveform(data.wav_scp[defects["stereo"]], defects["stereo"], 16000, channel=3)


def test_data_dir_defects_are_errors_naming_the_file_and_the_fix(defect_run: dict, tmp_path: Path) -> None:
    source = defect_run["root"] / "data" / "train"
    bad = tmp_path / "unsorted"
    shutil.copytree(source, bad)
    lines = (bad / "wav.scp").read_text().splitlines()
    (bad / "wav.scp").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(DataDirError, match="wav.scp: not sorted.*LC_ALL=C sort"):
        DataDir.read(bad)
    bad = tmp_path / "mismatched"
    shutil.copytree(source, bad)
    (bad / "text").write_text("".join(line + "\n" for line in (bad / "text").read_text().splitlines()[1:]))
    with pytest.raises(DataDirError, match="text: utterance sets differ from utt2spk"):
        DataDir.read(bad)
    bad = tmp_path / "latin1"
    shutil.copytree(source, bad)
    (bad / "text").write_bytes((bad / "text").read_bytes().replace(b" ", b" CAF\xe9 ", 1))
    with pytest.raises(DataDirError, match="text:1: not UTF-8 \\(byte 0xe9\\).*iconv"):
        DataDir.read(bad)


def test_a_mistyped_config_key_is_one_line_naming_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(["train.epoch=3"])
    with pytest.raises(ConfigError, match="model=smal is not an option.*did you mean model=small"):
        load_config(["model=smal"])
    result = subprocess.run([sys.executable, "-m", "asrkd.cli", "train-dnn", "trian.lr=0.1"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["asrkd train-dnn: config: unknown key 'trian.lr'; did you mean 'train.lr'?"]
