"""Multi-step distillation (asrkd/experiments/chains/experiment.py): the chains each method builds, how its
teachers mix per batch, and the three stages end to end on the tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from asrkd.experiments.chains import experiment as chains

from conftest import tiny_config


def test_each_method_builds_its_chain_and_shares_the_first_assistant(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "chains.sizes=[[2,48],[1,32],[1,16]]")
    takd, dgkd, direct, hard = (chains.chain(cfg.chains, cfg.exp_dir, m, 2.0) for m in ("takd", "dgkd", "direct", "hard"))
    assert [link.name for link in takd] == ["chain_T2_2x48", "chain_T2_takd_1x32", "chain_T2_takd_1x16"]
    assert takd[0] == dgkd[0] and takd[0].teachers == ("ensemble",)  # one model: the teacher alone above it
    assert takd[2].teachers == ("chain_T2_takd_1x32",) and takd[2].rule == "all"
    assert dgkd[2].teachers == ("ensemble", "chain_T2_2x48", "chain_T2_dgkd_1x32") and dgkd[2].rule == "drop"
    assert [(link.name, link.teachers) for link in direct] == [("chain_T2_1x16", ("ensemble",))]
    assert hard[0].name == "chain_hard_1x16" and hard[0].rule == "none"
    assert chains.teacher_passes(dgkd[2], "ensemble", 10, 0.5) == pytest.approx(0.5 * 12 + 0.125 * 4)
    assert chains.teacher_passes(chains.chain(cfg.chains, cfg.exp_dir, "switching", 2.0)[2], "ensemble", 10, 0.5) == pytest.approx(4.0)
    summed = chains.chain(cfg.chains, cfg.exp_dir, "dgkd_summed", 2.0)
    assert summed[0] == takd[0] and summed[2].teachers == ("ensemble", "chain_T2_2x48", "chain_T2_dgkd_summed_1x32") and summed[2].rule == "drop_sum"
    with pytest.raises(ValueError, match="unknown method"):
        chains.chain(cfg.chains, cfg.exp_dir, "avalanche", 2.0)
    with pytest.raises(ValueError, match="switching_members switches among an ensemble's members"):
        chains.chain(cfg.chains, cfg.exp_dir, "switching_members", 2.0)  # no exp/dnn/ensemble/member-* here
    for i in range(3):
        (tmp_path / "exp" / "dnn" / "ensemble" / f"member-{i}").mkdir(parents=True)
    [members] = chains.chain(cfg.chains, cfg.exp_dir, "switching_members", 2.0)
    assert members.teachers == ("ensemble/member-0", "ensemble/member-1", "ensemble/member-2") and members.rule == "one"
    assert chains.teacher_passes(members, "ensemble", 10, 0.5) == 1.0  # one member per batch
    assert [(link.name, link.replicate) for link in chains.seeds_of(cfg.chains, members)] == [
        ("chain_T2_switching_members_1x16", 0), ("chain_T2_switching_members_1x16_seed1", 1), ("chain_T2_switching_members_1x16_seed2", 2)]


def test_the_teacher_mix_averages_drops_and_switches_reproducibly() -> None:
    teachers = [lambda b, v=v: torch.full((len(b), 3), float(v)) for v in (1, 2, 3)]
    batch = torch.arange(5, 9)
    assert torch.equal(chains.TeacherMix(teachers, "all", 0.5, 0)(batch), torch.full((4, 3), 2.0))
    drop = chains.TeacherMix(teachers, "drop", 0.5, 0)
    kept = [drop.chosen(torch.tensor([start])) for start in range(200)]
    assert all(k for k in kept) and kept == [drop.chosen(torch.tensor([start])) for start in range(200)]  # seeded by the batch
    assert 1.2 < sum(len(k) for k in kept) / 200 < 1.8  # each of 3 kept with probability 0.5, at least one: 1.625 expected
    switch = chains.TeacherMix(teachers, "one", 0.5, 0)
    picks = [switch.chosen(torch.tensor([start]))[0] for start in range(300)]
    assert {picks.count(i) for i in range(3)} <= set(range(70, 131))
    assert chains.TeacherMix(teachers, "one", 0.5, 0)(batch).unique().numel() == 1
    summed, mean = chains.TeacherMix(teachers, "drop_sum", 0.5, 0), chains.TeacherMix(teachers, "drop", 0.5, 0)
    for start in range(20):  # the same teachers kept; their sum, one cross-entropy each, against their mean
        one = torch.tensor([start])
        assert summed.chosen(one) == mean.chosen(one)
        torch.testing.assert_close(summed(one), mean(one) * len(mean.chosen(one)))


def test_chains_train_decode_and_report_on_the_tiny_run(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.distill import soft_targets

    root = tmp_path
    shutil.copytree(run_dir / "data", root / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", root / "exp", symlinks=True)
    overrides = ["chains.teacher=baseline", "chains.sizes=[[1,32],[1,16]]", "chains.temperatures=[2]", "chains.epochs=1", "chains.seeds=2",
                 "chains.methods=[hard,direct,takd,dgkd_summed,ensemble_kd,switching]",
                 "distill.teacher=baseline", "distill.temperatures=[2]", "distill.logit_matching=false"]
    cfg = tiny_config(root, *overrides)
    soft_targets.run(cfg)
    chains.EXPERIMENT.train(cfg)
    chains.EXPERIMENT.decode(cfg)
    chains.EXPERIMENT.publish(cfg)
    report = json.loads((root / "exp" / "report" / "report.json").read_text())["chains"]
    assert set(report["rows"]) == {"small_hard", "small_direct_kd", "takd", "dgkd_summed", "ensemble_kd", "teacher_switching"}
    assert all(entry["seeds"] == 2 and len(entry["per_seed"]["test_frame_accuracy"]) == 2 for entry in report["rows"].values())
    for row, entry in report["rows"].items():
        assert set(entry["frame_accuracy"]) >= {"train", "valid", "test"} and "test" in entry["wer"]
        assert entry["train_seconds"] > 0
        lo, hi = entry["frame_accuracy_ci"]["test"]
        assert lo <= entry["frame_accuracy"]["test"] <= hi
    assert len(report["rows"]["takd"]["chain"]) == 2 and len(report["rows"]["small_direct_kd"]["chain"]) == 1
    assert "ci" in report["rows"]["takd"]["vs_direct"] and "vs_direct" not in report["rows"]["small_direct_kd"]
    passes = {row: entry["teacher_passes"] for row, entry in report["rows"].items()}
    assert (passes["small_hard"], passes["small_direct_kd"], passes["takd"], passes["ensemble_kd"], passes["teacher_switching"]) == (0, 1, 1, 2, 1)
    md = (root / "exp" / "report" / "chains.md").read_text()
    assert "| takd | 2 | chain_T2_takd_1x16 (+1 seeds) |" in md and (root / "exp" / "report" / "chains.png").is_file()
    assert "T = 2 for every method (the only one in chains.temperatures: no choice made)" in md and "T chosen" not in md
    # the assistant is shared: trained once, then every chain reads it
    assert json.loads((root / "exp" / "dnn" / "chain_T2_1x32" / "stage.json").read_text())["config"]["teachers"] == ["baseline"]
    seed1 = json.loads((root / "exp" / "dnn" / "chain_T2_takd_1x16_seed1" / "stage.json").read_text())["config"]
    assert seed1["replicate"] == 1 and seed1["teachers"] == ["chain_T2_1x32"]  # a student's seeds share the assistant above it
