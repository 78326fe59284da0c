"""Function matching: views drawn per step, the teacher scoring the student's own view, controls
on the same views and schedules, the report's gain kept (speaker intervals) and fidelity."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.distill import soft_targets
from asrkd.evaluate import FrameScorer
from asrkd.experiments.function_matching import experiment as function_matching
from asrkd.experiments.function_matching import report as fm_report
from asrkd.experiments.function_matching import runs as fm_runs
from asrkd.nnet import ensemble, train
from asrkd.nnet.checkpoints import read_history
from asrkd.nnet.training_set import TrainingSet
from asrkd.nnet.views import View, ViewSpec, draw

from conftest import REPO, assert_drawn, frame_accuracy_by_argmax, load_config, tiny_config
from tests.test_reliability import clone, state_dicts_equal

ALL = ViewSpec(freq_masks=2, freq_width=8, time_masks=2, time_width=4, noise_std=0.3, mixup_alpha=0.4, seed=5)


def test_a_view_is_a_function_of_its_seed_and_step_and_the_plain_view_is_the_identity() -> None:
    x = torch.randn(64, 26, 40)
    first, again, later = draw(ALL, x, 7), draw(ALL, x, 7), draw(ALL, x, 8)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.partner, again.partner) and torch.equal(first.lam, again.lam)
    assert not torch.equal(first.inputs, later.inputs)
    assert draw(ViewSpec(seed=3), x, 7).inputs is x  # nothing switched on: no draw at all
    masked = draw(ViewSpec(freq_masks=1, freq_width=8, time_masks=1, time_width=4), torch.ones(500, 26, 40), 0).inputs
    zero_bins = (masked == 0).all(1).sum(1)  # mel bins zero across the window
    zero_frames = (masked == 0).all(2).sum(1)
    assert zero_bins.max() <= 8 and zero_frames.max() <= 4 and zero_bins.float().mean() > 2 and zero_frames.float().mean() > 1
    assert sorted(first.partner.tolist()) == list(range(64)) and ((first.lam >= 0) & (first.lam <= 1)).all()


def test_mixup_mixes_the_labels_and_the_soft_targets_as_it_mixed_the_inputs() -> None:
    x, hard = torch.randn(32, 26, 40), torch.randint(0, 10, (32,))
    view = draw(ViewSpec(mixup_alpha=0.4, seed=1), x, 0)
    lam = view.lam.view(-1, 1, 1)
    assert torch.allclose(view.inputs, lam * x + (1 - lam) * x[view.partner])
    logits = torch.randn(32, 10)
    expected = (view.lam * F.cross_entropy(logits, hard, reduction="none")
                + (1 - view.lam) * F.cross_entropy(logits, hard[view.partner], reduction="none")).mean()
    assert torch.allclose(view.hard_cross_entropy(logits, hard), expected)
    rows = torch.softmax(torch.randn(32, 10), -1)
    assert torch.allclose(view.mix(rows).sum(-1), torch.ones(32)) and torch.allclose(View(x).mix(rows), rows)
    assert torch.allclose(View(x).hard_cross_entropy(logits, hard), F.cross_entropy(logits, hard))


def test_training_on_views_is_reproducible_and_records_the_view(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, "train.max_frames_per_epoch=3000", "train.epochs=1")
    training = TrainingSet(cfg)
    for name in ("a", "b"):
        train.train_stage(cfg, [train.Model(f"train-dnn {name}", root / "exp" / "dnn" / name, views=ALL)], training)
    assert state_dicts_equal(root / "exp" / "dnn" / "a" / "final.pt", root / "exp" / "dnn" / "b" / "final.pt")
    record = json.loads((root / "exp" / "dnn" / "a" / "stage.json").read_text())
    assert record["config"]["views"]["mixup_alpha"] == 0.4
    assert "views" not in json.loads((root / "exp" / "dnn" / "baseline" / "stage.json").read_text())["config"]  # plain runs keep their fingerprints


def test_function_matching_trains_controls_and_students_and_reports_gain_kept_and_fidelity(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, "ensemble.size=2", "ensemble.name=pair", "distill.teacher=pair", "distill.temperatures=[2]",
                      "train.epochs=1", "train.max_frames_per_epoch=1000", f"results_dir={root}/results",
                      "function_matching.ablation=[all,clean]", "function_matching.headline=all",
                      "function_matching.schedules=[1,2]", "function_matching.headline_schedule=2", "function_matching.seeds=2",
                      "function_matching.subset={fraction:0.1,schedule:2}", "function_matching.teachers=[{name:pair_b,first_seed:50}]")
    ensemble.run(cfg)
    soft_targets.run(cfg)
    # the consistent student's targets are the teacher's on the student's own view
    data, train_idx, _, hard = TrainingSet(cfg).load()
    batch = torch.from_numpy(train_idx[:16])
    view = draw(fm_runs.view_spec(cfg.function_matching, cfg.seed, fm_runs.Run("all", 1, "consistent", 0)), data.frames.context(batch), 3)
    teacher = function_matching.TeacherOnTheFly.of_system(sections.layout(cfg), str(cfg.distill.teacher), data)
    logits = torch.randn(16, data.num_pdfs)
    loss = function_matching.consistent_loss(cfg, 2.0)(data, hard)(logits, batch, view)
    expected = 4.0 * function_matching.soft_cross_entropy(logits, teacher.soft_targets(batch, 2.0, view.inputs), 2.0) \
        + view.hard_cross_entropy(logits, hard[batch], 0.5)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(teacher.soft_targets(batch, 2.0, view.inputs), teacher.soft_targets(batch, 2.0))

    function_matching.EXPERIMENT.train(cfg)
    exp = root / "exp" / "dnn"
    assert len(read_history(exp / "fm_all_x2_consistent_T2_seed1")) == 2
    x2 = json.loads((exp / "fm_all_x2_hard" / "stage.json").read_text())["config"]
    assert x2["train.epochs"] == 2 and x2["train.lr_decay"] == pytest.approx(0.85 ** 0.5) and x2["views"]["seed"] == 0
    assert json.loads((exp / "fm_all_x2_hard_seed1" / "stage.json").read_text())["config"]["views"]["seed"] == 100
    clean = json.loads((exp / "fm_clean_x1_consistent_T2" / "stage.json").read_text())  # the teacher's outputs on clean frames: its store
    assert any("soft_targets" in entry["path"] for entry in clean["inputs"].values()) and not any(key.startswith("teacher") for key in clean["inputs"])
    kinds = {run.kind for run in fm_runs.runs(OmegaConf.merge(cfg, {"function_matching": {"headline": "clean"}}).function_matching)}
    assert "precomputed" not in kinds  # on clean frames the precomputed student is the consistent one
    function_matching.EXPERIMENT.publish(cfg)
    result = json.loads((root / "results" / "report.json").read_text())["function_matching"]
    assert result["bootstrap_unit"] == "speaker" and result["missing"] == []
    headline = result["rows"]["all x2 consistent"]
    assert headline["seeds"] == 2 and headline["control"] == "all x2 hard"
    assert result["gain_kept"]["row"] == "all x2 consistent" and result["gain_kept"]["unit"] == "speaker"
    student, control, teacher_acc = (result["rows"]["all x2 consistent"]["frame_accuracy"]["test"], result["rows"]["all x2 hard"]["frame_accuracy"]["test"],
                                     result["teacher"]["frame_accuracy"]["test"])
    assert result["gain_kept"]["estimate"] == pytest.approx((student - control) / (teacher_acc - control))
    for name, accuracy in (("all x2 consistent", student), ("all x2 hard", control)):  # the rows counted a second way
        assert accuracy == pytest.approx(frame_accuracy_by_argmax(root / "exp", result["rows"][name]["systems"]), abs=1e-9)
    assert teacher_acc == pytest.approx(frame_accuracy_by_argmax(root / "exp", "pair"), abs=1e-9)
    fid = result["fidelity"]["all x2 precomputed"]
    scorer = FrameScorer(cfg)
    data, indices = scorer.eval["test"]
    teacher_posteriors = fm_report.log_posteriors(root / "exp", "pair", data.frames, indices, 256)
    itself = fm_report.fidelity(root / "exp", teacher_posteriors, ["pair"], data.frames, indices, 256)
    assert itself["top1_agreement"] == 1.0 and itself["kl_teacher_student"] == pytest.approx(0.0, abs=1e-5)
    student_posteriors = torch.cat(fm_report.log_posteriors(root / "exp", result["rows"]["all x2 precomputed"]["systems"][0],
                                                                    data.frames, indices, 256))
    agreement = float((torch.cat(teacher_posteriors).argmax(-1) == student_posteriors.argmax(-1)).double().mean())
    assert fid["top1_agreement"] == pytest.approx(agreement) and fid["seeds"] == 1 and fid["kl_teacher_student"] > 0
    assert {c["schedule"] for c in result["curve"]} == {1, 2}
    assert "| all x2 consistent | 2 | 2 |" in (root / "results" / "function_matching.md").read_text()
    choice = result["view_choice"]  # the ablation's views ranked on validation, never on test
    valid = choice["valid_frame_accuracy"]
    assert set(valid) == {"all", "clean"} and choice["best_on_valid"] == max(valid, key=valid.get) and choice["complete"]
    assert valid["all"] == result["rows"]["all x1 consistent"]["frame_accuracy"]["valid"]
    said = "The headline view (all) is the best of them." if choice["best_on_valid"] == "all" else "The headline view (all) is not the best: clean is"
    assert said in (root / "results" / "function_matching.md").read_text()
    assert_drawn(root / "results" / "function_matching.png")
    assert np.isfinite(headline["minus_control"]["estimate"])
    effect = result["views_effect"]  # each control against the plain baseline, and whether it moves by half the teacher's gain
    assert set(effect["controls_above_half_the_gain"]) == {"all x1 hard", "all x2 hard", "clean x1 hard"}
    moved = result["rows"]["all x2 hard"]["minus_baseline"]["estimate"] > 0.5 * effect["teacher_minus_baseline"]["estimate"]
    assert effect["controls_above_half_the_gain"]["all x2 hard"] == moved and effect["teacher_on_views_needed"] == any(effect["controls_above_half_the_gain"].values())
    over = result["gain_kept_over_baseline"]  # the paper's measure beside it: against the plain baseline
    baseline_acc = teacher_acc - effect["teacher_minus_baseline"]["estimate"]
    assert over["row"] == "all x2 consistent" and over["estimate"] == pytest.approx((student - baseline_acc) / (teacher_acc - baseline_acc))
    # another teacher of the same recipe (other member seeds), trained by the stage: its students against the same control
    assert not state_dicts_equal(exp / "pair" / "member-0" / "final.pt", exp / "pair_b" / "member-0" / "final.pt")
    other = result["rows"]["all x2 consistent (pair_b)"]
    assert other["seeds"] == 2 and other["control"] == "all x2 hard" and other["teacher"] == "pair_b" and headline["teacher"] == "pair"
    assert any("pair_b" in entry["path"] for entry in json.loads((exp / "fm_all_x2_consistent_T2_pair_b_seed1" / "stage.json").read_text())["inputs"].values())
    teacher_b = result["teachers"]["pair_b"]["frame_accuracy"]["test"]
    assert teacher_b == pytest.approx(frame_accuracy_by_argmax(root / "exp", "pair_b"), abs=1e-9)
    student_b = other["frame_accuracy"]["test"]
    assert other["gain_kept"]["estimate"] == pytest.approx((student_b - control) / (teacher_b - control))
    drawn = result["gain_kept_teachers"]  # the teacher drawn with the speakers and seeds
    assert drawn["teachers"] == ["pair", "pair_b"] and drawn["pairs"] == 2 and drawn["unit"] == "speaker, seed and teacher"
    assert drawn["estimate"] == pytest.approx(((student + student_b) / 2 - control) / ((teacher_acc + teacher_b) / 2 - control))
    assert "The teacher drawn too (2 ensembles of the same recipe" in (root / "results" / "function_matching.md").read_text()
    assert all(c["schedule"] in (1, 2) for c in result["curve"]) and len(result["curve"]) == 4  # distill.teacher's rows alone
    subset = json.loads((root / "results" / "report.json").read_text())["three_percent"]["function_matching"]
    assert subset["row"] == "all x2 consistent train_10pct" and subset["seeds"] == 2 and len(subset["gap_closed_ci"]) == 2
    assert json.loads((exp / "fm_all_x2_hard_train_10pct" / "stage.json").read_text())["config"]["train.data"] == "train_10pct"


def test_the_subset_rows_keep_their_view_when_the_headline_takes_another() -> None:

    cfg = load_config(["function_matching.headline=clean", "function_matching.subset.view=all"])
    subset = [run for run in fm_runs.runs(cfg.function_matching) if run.data != "train"]
    assert subset and {run.view for run in subset} == {"all"}  # on 3% of the frames the views widen the support the student is matched on
    assert {run.view for run in fm_runs.runs(cfg.function_matching) if run.data == "train" and run.replicate > 0} == {"clean"}
    headline_too = load_config(["function_matching.subset.view=null"])
    assert {run.view for run in fm_runs.runs(headline_too.function_matching) if run.data != "train"} == {str(headline_too.function_matching.headline)}
    with pytest.raises(ValueError, match="function_matching.subset.view names typo"):
        fm_runs.runs(load_config(["function_matching.subset.view=typo"]).function_matching)


def test_another_teacher_trains_the_headline_students_alone_under_names_of_its_own() -> None:
    cfg = load_config(["function_matching.headline=clean", "function_matching.seeds=2", "function_matching.teachers=[{name:ens_b,first_seed:1001}]"])
    others = [run for run in fm_runs.runs(cfg.function_matching) if run.teacher]
    assert [(run.view, run.schedule, run.kind, run.replicate) for run in others] == [("clean", 2, "consistent", 0), ("clean", 2, "consistent", 1)]
    assert [fm_runs.run_name(cfg.function_matching, run) for run in others] == ["fm_clean_x2_consistent_T2_ens_b", "fm_clean_x2_consistent_T2_ens_b_seed1"]
    run_cfg = fm_runs.run_cfg(cfg, others[0])
    assert run_cfg.distill.teacher == "ens_b" and run_cfg.ensemble.name == "ens_b" and run_cfg.ensemble.first_seed == 1001
    assert fm_runs.run_cfg(cfg, fm_runs.runs(cfg.function_matching)[0]).distill.teacher == "ensemble"  # the others keep theirs
    with pytest.raises(ValueError, match="ensemble is distill.teacher"):
        fm_runs.teacher_cfg(load_config(["function_matching.teachers=[{name:ensemble,first_seed:7}]"]), "ensemble")
    with pytest.raises(ValueError, match=r"function_matching.teachers\[0\] = \{'name': 'b'\}: give each teacher a name and a first_seed"):
        fm_runs.runs(load_config(["function_matching.teachers=[{name:b}]"]).function_matching)


def test_the_patience_curve_stops_at_a_validation_plateau_and_never_skips_a_headline_row(tmp_path: Path) -> None:

    cfg = load_config([f"exp_dir={tmp_path}", "function_matching.headline=clean", "function_matching.schedules=[1,2,4,8]",
                       "function_matching.headline_schedule=2", "function_matching.plateau=0.25", "function_matching.temperature=2"])

    def trained(schedule: int, valid: float) -> None:
        model_dir = tmp_path / "dnn" / fm_runs.run_name(cfg.function_matching, fm_runs.Run("clean", schedule, "consistent", 0))
        model_dir.mkdir(parents=True)
        (model_dir / "history.json").write_text(json.dumps([{"valid_frame_accuracy": 0.1}, {"valid_frame_accuracy": valid}]))
        (model_dir / "stage.json").write_text("{}")

    def pending(schedule: int, kind: str = "hard") -> bool:
        return fm_runs.plateau_pending(cfg.function_matching, tmp_path, fm_runs.Run("clean", schedule, kind, 0))

    trained(1, 0.5638)
    assert pending(4) and pending(8, "consistent") and not pending(2) and not pending(1)  # the headline schedule never waits
    trained(2, 0.5706)  # +0.68 points: patience still pays
    assert fm_runs.curve_stop(cfg.function_matching, tmp_path) is None
    assert not pending(4) and pending(8)  # 4x is decided (trained), 8x waits for the 4x student
    trained(4, 0.5718)  # +0.12 points: the plateau
    stop = fm_runs.curve_stop(cfg.function_matching, tmp_path)
    assert not pending(8)  # decided: left out
    assert stop["schedule"] == 4 and stop["previous"] == 2 and stop["skipped"] == [8] and stop["gain_points"] == pytest.approx(0.12)
    skipped = [run for run in fm_runs.runs(cfg.function_matching) if fm_runs.beyond_plateau(cfg.function_matching, run, stop)]
    assert {(run.schedule, run.kind) for run in skipped} == {(8, "hard"), (8, "consistent")}
    assert fm_runs.curve_stop(OmegaConf.merge(cfg, {"function_matching": {"plateau": None}}).function_matching, tmp_path) is None
    assert fm_runs.curve_stop(OmegaConf.merge(cfg, {"function_matching": {"plateau": 0.1}}).function_matching, tmp_path) is None  # +0.12 still counts
    assert fm_runs.curve_stop(OmegaConf.merge(cfg, {"function_matching": {"schedules": [1, 2, 4]}}).function_matching, tmp_path) is None  # nothing left to stop
    # the headline schedule is never skipped, even past a plateau reached before it
    late = OmegaConf.merge(cfg, {"function_matching": {"headline_schedule": 8}})
    assert not any(fm_runs.beyond_plateau(late.function_matching, run, stop) for run in fm_runs.runs(late.function_matching) if run.schedule == 8)


def test_the_controls_train_alone_without_a_teacher(run_dir: Path, tmp_path: Path) -> None:
    root = clone(run_dir, tmp_path)
    cfg = tiny_config(root, "distill.teacher=absent_ensemble", "train.epochs=1", "train.max_frames_per_epoch=1000",
                      "function_matching.ablation=[clean]", "function_matching.headline=clean", "function_matching.schedules=[1,2]",
                      "function_matching.headline_schedule=1", "function_matching.seeds=1", "function_matching.subset=null",
                      "function_matching.train_kinds=[hard]")
    dnn = root / "exp" / "dnn"
    dnn.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(["sleep", "60"]) as other:  # another process of the stage holds the noise view's control
        lock = dnn / ".fm_noise_x1_hard.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "command": "another worker", "since": "now"}))
        function_matching.EXPERIMENT.train(OmegaConf.merge(cfg, {"function_matching": {"ablation": ["clean", "noise"]}}))
        other.kill()
    # no teacher exists: only the controls train; the one another process holds is passed over; the 2x
    # control waits for the plateau rule, which needs the 1x student: left for a later run
    assert sorted(p.name for p in dnn.glob("fm_*")) == ["fm_clean_x1_hard"] and lock.is_file()
    assert not (dnn / "ensemble_b").exists()  # nor the other teacher (function_matching.teachers' default): controls need none

    with pytest.raises(ValueError, match=r"function_matching.train_kinds=\['hardd'\] is not a list of one of hard, consistent, precomputed"):
        load_config(["function_matching.train_kinds=[hardd]"])  # refused before any stage looks at its outputs


def test_the_views_sentence_says_which_controls_rise_and_which_fall_by_half_the_teachers_gain() -> None:
    """On the committed report: no control rises by half the teacher's gain (+2.34), two fall by more
    (specaugment -3.02, all -3.52); the sentence says both, and the committed text is the code's."""
    result = json.loads((REPO / "results" / "an4" / "report.json").read_text())["function_matching"]
    effect = result["views_effect"]
    assert not effect["teacher_on_views_needed"] and fm_report.fallen(result, effect) == ["specaugment x1 hard", "all x1 hard"]
    (line,) = [line for line in fm_report.markdown(result, "an4").splitlines() if "half of it" in line]
    assert line.endswith("No control rises by half of it: the teacher trained on clean frames stays the reference. specaugment x1 hard, "
                         "all x1 hard fall by more than half of it: those views cost the plain model accuracy.")
    assert line in (REPO / "results" / "an4" / "function_matching.md").read_text().splitlines()
