"""The paths to the hardware's pace, checked on CPU: the fused ensemble, the teacher on the fly,
torchrun + DDP, torch.compile, large-batch learning rates, the export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asrkd import sections
from asrkd.nnet import ensemble, train
from asrkd.nnet.checkpoints import load_system, read_history
from asrkd.nnet.training_set import TrainingSet

from asrkd.distill import soft_targets, student

from asrkd.distill.soft_targets import current_checksum
from asrkd.distill.target_store import TeacherLogits, logits_dir
from asrkd.distill.target_store import SoftTargetStore, store_dir
from asrkd.stage import read_record

from conftest import REPO, TINY, tiny_config
from .test_reliability import clone

QUICK = ["train.epochs=2", "train.max_frames_per_epoch=3000", "train.accuracy_sample_frames=500"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def max_difference(a: Path, b: Path) -> float:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def test_fused_ensemble_equals_training_the_members_one_by_one(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    dnn = root / "exp" / "dnn"
    few_steps = [*QUICK, "train.max_frames_per_epoch=640"]  # 2 epochs of 5 steps: Adam amplifies summation-order noise later on
    for name, fused in (("one_by_one", "false"), ("fused", "true")):
        ensemble.run(tiny_config(root, *few_steps, "ensemble.size=3", f"ensemble.name={name}", f"ensemble.fused={fused}"))
    for i in range(3):
        # at most two Adam steps (lr 1e-3): Adam's normalized step turns a last-bit difference in a gradient near 0 (the
        # stack sums in another order) into a step of up to lr; on the held-out-GMM alignment one weight moved by 0.88 of one
        assert max_difference(dnn / "one_by_one" / f"member-{i}" / "final.pt", dnn / "fused" / f"member-{i}" / "final.pt") < 2e-3
        one, fused_history = (read_history(dnn / name / f"member-{i}") for name in ("one_by_one", "fused"))
        assert [h["valid_frame_accuracy"] for h in one] == pytest.approx([h["valid_frame_accuracy"] for h in fused_history], abs=2e-3)
        assert read_record(dnn / "fused" / f"member-{i}")["summary"]["fused"] == 3
    assert max_difference(dnn / "fused" / "member-0" / "final.pt", dnn / "fused" / "member-1" / "final.pt") > 1e-3  # own init seeds
    # the stage is as resumable and skippable fused as one by one: a second run trains nothing
    before = (dnn / "fused" / "member-2" / "stage.json").read_text()
    ensemble.run(tiny_config(root, *few_steps, "ensemble.size=3", "ensemble.name=fused", "ensemble.fused=true"))
    assert (dnn / "fused" / "member-2" / "stage.json").read_text() == before


def test_teacher_on_the_fly_matches_the_stored_soft_targets(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    common = [*QUICK, "ensemble.size=2", "ensemble.name=pair", "distill.teacher=pair", "distill.temperatures=[2]",
              "distill.students.dense=[2]", "distill.students.topk=[]", "distill.students.compact=[]", "distill.students.compact_prior=[]",
              "distill.seeds.dense=1",
              "distill.logit_matching=true"]
    cfg = tiny_config(root, *common)
    ensemble.run(cfg)
    soft_targets.run(cfg)
    training = TrainingSet(cfg)
    data, train_idx, _, _ = training.load()
    teacher = student.TeacherOnTheFly.of_system(sections.layout(cfg), str(cfg.distill.teacher), data)
    batch = torch.from_numpy(train_idx[::37])
    stored = SoftTargetStore.load(store_dir(sections.layout(cfg), cfg.distill.teacher, 2.0), current_checksum(root / "exp", "train")).rows("dense").batch(batch)
    np.testing.assert_allclose(teacher.soft_targets(batch, 2.0).numpy(), stored.numpy(), atol=1e-3)  # fp16 storage
    logits = TeacherLogits.load(logits_dir(sections.layout(cfg), cfg.distill.teacher), current_checksum(root / "exp", "train")).rows().batch(batch)
    np.testing.assert_allclose(teacher.zero_mean_logits(batch).numpy(), logits.numpy(), atol=2e-2)  # fp16 of logits ~ 10
    # a student trained each way: the same run, but for the targets' fp16 rounding (which Adam's first steps
    # turn into at most a step's size, lr, for weights of near-zero gradient)
    student.run(tiny_config(root, *common, "train.max_frames_per_epoch=640"))
    student_dir = root / "exp" / "dnn" / "student_pair_T2_dense"
    stored_weights, stored_history = weights(student_dir / "final.pt"), read_history(student_dir)
    student.run(tiny_config(root, *common, "train.max_frames_per_epoch=640", "distill.on_the_fly=true", "redo=true"))
    assert read_record(student_dir)["config"]["on_the_fly"] is True and "teacher member-0" in read_record(student_dir)["inputs"]
    fly_weights = weights(student_dir / "final.pt")
    assert max(float((stored_weights[k] - fly_weights[k]).abs().max()) for k in stored_weights) < 10 * 1e-3  # 10 steps
    assert [h["valid_frame_accuracy"] for h in read_history(student_dir)] == pytest.approx(
        [h["valid_frame_accuracy"] for h in stored_history], abs=0.01)
    with pytest.raises(ValueError, match="on_the_fly computes dense targets"):
        student.run(tiny_config(root, *common, "train.max_frames_per_epoch=640", "distill.on_the_fly=true", "distill.students.topk=[2]"))
    # the loss apart from the form: reverse KL on dense and on top-k targets from the store, and on the fly
    reverse = [*common, "train.max_frames_per_epoch=640", "distill.loss=reverse_kl", "distill.logit_matching=false"]
    student.run(tiny_config(root, *reverse, "distill.students.topk=[2]"))
    for form in ("dense", "topk"):
        assert read_record(root / "exp" / "dnn" / f"student_pair_T2_{form}_reverse_kl")["config"]["loss"] == "reverse_kl"
    reverse_dir = root / "exp" / "dnn" / "student_pair_T2_dense_reverse_kl"
    stored_reverse = weights(reverse_dir / "final.pt")
    assert max(float((stored_reverse[k] - stored_weights[k]).abs().max()) for k in stored_weights) > 10 * 1e-3  # another loss, another model
    student.run(tiny_config(root, *reverse, "distill.on_the_fly=true", "redo=true"))
    fly_reverse = weights(reverse_dir / "final.pt")
    assert read_record(reverse_dir)["config"]["on_the_fly"] is True
    assert max(float((stored_reverse[k] - fly_reverse[k]).abs().max()) for k in stored_reverse) < 10 * 1e-3  # as the cross-entropy's pair
    assert "loss" not in read_record(student_dir)["config"]  # the paper's students keep their fingerprints


def test_two_processes_with_ddp_train_the_model_of_one_at_the_same_global_batch(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    overrides = [f"corpus_dir={root}/corpus", f"data_dir={root}/data", f"exp_dir={root}/exp", *TINY, *QUICK,
                 "train.batch_size=256", "train.num_threads=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, nproc in (("single", 1), ("ddp", 2)):
        result = subprocess.run([sys.executable, "-m", "asrkd.cli", "train-dnn", f"train.name={name}", f"train.nproc={nproc}", *overrides],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run" in result.stderr  # the same command, relaunched on 2 ranks
    dnn = root / "exp" / "dnn"
    # each rank took half of every global batch; DDP averaged the gradients: the same model up to summation order
    assert max_difference(dnn / "single" / "final.pt", dnn / "ddp" / "final.pt") < 1e-4
    assert read_record(dnn / "ddp")["fingerprint"] != read_record(dnn / "single")["fingerprint"]  # the names differ, nothing else
    assert read_record(dnn / "ddp")["config"] == read_record(dnn / "single")["config"]


def test_compiled_training_equals_eager(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    train.run(tiny_config(root, *QUICK, "train.name=eager"))
    train.run(tiny_config(root, *QUICK, "train.name=compiled", "train.compile=aot_eager"))
    assert max_difference(root / "exp" / "dnn" / "eager" / "final.pt", root / "exp" / "dnn" / "compiled" / "final.pt") < 1e-5


def test_large_batch_learning_rate_rules_and_their_fingerprint(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.cli import load_config

    cfg = load_config(["train.batch_size=4096", "train.lr=0.001"])
    assert train.learning_rate(cfg.train) == pytest.approx(0.001)  # none: as given
    assert train.learning_rate(load_config(["train.batch_size=4096", "train.lr_scaling=sqrt"]).train) == pytest.approx(0.004)
    assert train.learning_rate(load_config(["train.batch_size=4096", "train.lr_scaling=linear"]).train) == pytest.approx(0.016)
    with pytest.raises(ValueError, match="lr_scaling"):
        train.learning_rate(load_config(["train.lr_scaling=cubic"]).train)
    root = clone(run_dir, tmp_path)
    train.run(tiny_config(root, *QUICK, "train.name=scaled", "train.lr_scaling=sqrt", "train.warmup_steps=5"))
    recorded = read_record(root / "exp" / "dnn" / "scaled")["config"]
    assert recorded["train.lr_scaling"] == "sqrt" and recorded["train.warmup_steps"] == 5 and recorded["train.lr_reference_batch"] == 256
    assert "train.lr_scaling" not in read_record(root / "exp" / "dnn" / "baseline")["config"]  # defaults leave old fingerprints alone


def test_export_reproduces_the_decoders_log_likelihoods_and_cost_is_recorded(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.kaldi import decode
    from asrkd.nnet import cost, export
    from asrkd.nnet.decode import dnn_loglikes
    from asrkd.nnet.model import SplicedFrames
    from asrkd.stores import FeatureStore

    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root)
    export.run(cfg)
    out = root / "exp" / "export" / "baseline"
    exported = torch.export.load(str(out / "model.pt2")).module()
    model = load_system(root / "exp", "baseline", torch.device("cpu")).eval()
    store = FeatureStore.load(root / "exp" / "feats" / "fbank" / "test", mmap=False)
    frames = SplicedFrames(store, model.config["left_context"], model.config["right_context"])
    utt = store.utt_ids[0]
    start, end = store.span(utt)
    log_priors = np.log(np.array((out / "priors.vec").read_text().strip(" []\n").split(), dtype=np.float64))
    expected = dnn_loglikes(model, frames, utt, decode.log_priors(
        np.load(root / "exp" / "tri" / "ali_train" / "pdf_counts.npy"), cfg.decode.prior_floor))
    windows = frames.context(torch.arange(start, end))
    with torch.no_grad():
        np.testing.assert_allclose(exported(windows).numpy(), expected, atol=1e-4)  # any number of frames: the first utterance's
    np.testing.assert_allclose(log_priors, decode.log_priors(np.load(root / "exp" / "tri" / "ali_train" / "pdf_counts.npy"),
                                                             cfg.decode.prior_floor), atol=1e-5)
    onnx = read_record(out)["summary"]["onnx"]
    try:
        import onnxruntime
    except ImportError:  # without the export extra the export says so and writes model.pt2 only
        assert not onnx or (out / "model.onnx").is_file()
    else:
        assert onnx
        session = onnxruntime.InferenceSession(str(out / "model.onnx"))
        np.testing.assert_allclose(session.run(None, {"spliced_fbank": windows.numpy()})[0], expected, atol=1e-4)
    pdf_map = [line.split() for line in (out / "tid2pdf.txt").read_text().splitlines()]
    assert pdf_map[0][0] == "1" and max(int(p) for _, p in pdf_map) == model.config["num_pdfs"] - 1
    # the cost of a system: its parameters (an ensemble's: all members') and its scoring time, measured once
    first = cost.system_cost(cfg, "baseline")
    assert first["parameters"] == sum(p.numel() for p in model.parameters()) and first["ms_per_1000_frames"] > 0
    assert cost.system_cost(cfg, "baseline") == first  # recorded: a rerun report quotes the same time


def test_progress_shows_the_rate_and_time_left_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from asrkd.progress import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress(range(4), "baseline epoch 0", unit="frames", scale=256)) == [0, 1, 2, 3]
        text = stream.getvalue()
        assert (("1024/1024 frames" in text and "frames/s" in text and "s left" in text and "done" in text) if shown else text == "")


def test_a_long_loop_hands_freed_heap_pages_back_once_a_second_on_a_terminal_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from asrkd import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    progress.trim_heap()  # the real one (glibc's malloc_trim, or nothing where there is none) runs
    for stream in (Terminal(), io.StringIO()):
        clock = iter(range(0, 1000, 2))  # two seconds pass between items
        monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
        trims: list[int] = []
        monkeypatch.setattr(progress, "trim_heap", lambda: trims.append(1))
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress.progress(range(5), "soft targets")) == [0, 1, 2, 3, 4]
        assert len(trims) == 5  # without: glibc keeps freed batches' pages, and memory grows with the batches run


def test_early_stopping_ends_training_patience_epochs_after_the_best(run_dir: Path, tmp_path: Path) -> None:
    assert train.epochs_since_best([{"valid_frame_accuracy": a} for a in (0.2, 0.5, 0.4, 0.5)]) == 2  # ties do not count as better
    root = clone(run_dir, tmp_path)
    train.run(tiny_config(root, *QUICK, "train.name=patient", "train.epochs=10", "train.patience=1"))
    record = read_record(root / "exp" / "dnn" / "patient")
    history = read_history(root / "exp" / "dnn" / "patient")
    best = max(range(len(history)), key=lambda e: history[e]["valid_frame_accuracy"])
    assert len(history) == best + 2 < 10  # stopped one epoch (the patience) after its best, before the ceiling
    assert record["summary"]["epochs"] == len(history) and record["summary"]["best_epoch"] == best and record["config"]["train.patience"] == 1
    assert "train.patience" not in read_record(root / "exp" / "dnn" / "baseline")["config"]  # null: old fingerprints kept
