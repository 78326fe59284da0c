"""Specialists with a generalist (§5): the groups, the KL combination, and the stages on the tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from asrkd.experiments.specialists.experiment import confusable_groups, coverage_counts, labels_alone_shift, mixed_frames, specialist_start
from asrkd.experiments.specialists.model import SpecialistCombination
from asrkd.nnet.model import HybridDNN, model_from_config

from conftest import tiny_config


def combination(groups: list[list[int]], top_n: int = 1, iterations: int = 200, pdfs: int = 6) -> SpecialistCombination:
    torch.manual_seed(0)
    generalist = HybridDNN(feat_dim=3, num_pdfs=pdfs, left_context=1, right_context=0, num_hidden_layers=1, hidden_dim=8)
    specialists = [HybridDNN(**(generalist.config | {"num_pdfs": len(g) + 1})) for g in groups]
    return SpecialistCombination.of(generalist, specialists, groups, [0.3] * len(groups), top_n, iterations)


def kl_objective(q_logits: torch.Tensor, general: torch.Tensor, opinions, membership: torch.Tensor) -> torch.Tensor:
    """Sum of the KL divergences the combination minimizes (up to terms without q), computed directly."""
    log_q = torch.log_softmax(q_logits, -1)
    loss = -(general * log_q).sum()
    for m, where, probs in opinions:
        inside = membership[m]
        collapsed = torch.cat([log_q[where][:, inside], log_q[where][:, ~inside].logsumexp(-1, keepdim=True)], dim=1)
        loss = loss - (probs * collapsed).sum()
    return loss


def test_em_finds_the_distribution_gradient_descent_finds() -> None:
    model = combination([[0, 1, 2], [2, 3]])
    torch.manual_seed(1)
    general = torch.softmax(torch.randn(5, 6) * 2, -1)
    opinions = [(0, torch.tensor([0, 1, 3]), torch.softmax(torch.randn(3, 4) * 2, -1)),
                (1, torch.tensor([1, 2, 4]), torch.softmax(torch.randn(3, 3) * 2, -1))]
    q = model.combine(general, opinions)
    torch.testing.assert_close(q.sum(-1), torch.ones(5))
    logits = general.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(3000):
        optimizer.zero_grad()
        kl_objective(logits, general, opinions, model.membership).backward()
        optimizer.step()
    torch.testing.assert_close(q, torch.softmax(logits.detach(), -1), atol=2e-3, rtol=0)
    assert kl_objective(q.log(), general, opinions, model.membership) <= kl_objective(general.log(), general, opinions, model.membership)
    assert not torch.allclose(q, general, atol=1e-2)  # the specialists moved it


def test_a_frame_without_active_specialists_keeps_the_generalist_and_the_checkpoint_round_trips() -> None:
    model = combination([[0, 1]], pdfs=4)
    x = torch.randn(50, 2, 3)
    general = torch.log_softmax(model.generalist(x), -1)
    out = model(x)
    idle = ~model.active(general)[:, 0]
    assert idle.any() and (~idle).any()
    torch.testing.assert_close(out[idle], general[idle])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(50))
    copy = model_from_config(model.config)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.eval()(x), out)


def test_groups_are_the_pdfs_that_are_predicted_together() -> None:
    rng = np.random.default_rng(0)
    # two blocks of pdf-ids (0-3 and 4-7): a frame's mass moves within one block
    frames = []
    for _ in range(400):
        probs = np.zeros(8)
        block = rng.integers(2) * 4
        probs[block : block + 4] = rng.dirichlet(np.ones(4))
        frames.append(probs)
    groups, clusters = confusable_groups(np.array(frames), 2, None, seed=0)
    assert sorted(map(tuple, clusters)) == [(0, 1, 2, 3), (4, 5, 6, 7)] and groups == [sorted(c) for c in clusters]
    wider, _ = confusable_groups(np.array(frames), 2, 6, seed=0)
    assert [len(g) for g in wider] == [6, 6] and all(set(c) <= set(g) for c, g in zip(clusters, wider))


def test_a_specialist_starts_from_the_generalist() -> None:
    torch.manual_seed(0)
    generalist = HybridDNN(feat_dim=3, num_pdfs=6, left_context=1, right_context=0, num_hidden_layers=2, hidden_dim=8).eval()
    specialist = specialist_start(generalist, [1, 4]).eval()
    x = torch.randn(7, 2, 3)
    general, special = generalist(x), specialist(x)
    torch.testing.assert_close(special[:, :2], general[:, [1, 4]])  # the group's logits are the generalist's
    assert special.shape == (7, 3)


def test_specialist_stages_on_the_tiny_run(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.experiments.specialists import experiment as specialists

    shutil.copytree(run_dir / "data", tmp_path / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", tmp_path / "exp", symlinks=True)
    cfg = tiny_config(tmp_path, "specialists.count=3", "specialists.group_size=40", "specialists.epochs=1", "train.epochs=1")
    specialists.EXPERIMENT.train(cfg)
    layout = json.loads((tmp_path / "exp" / "specialists" / "specialists" / "groups.json").read_text())
    assert len(layout["groups"]) == 3 and all(len(g) >= 40 for g in layout["groups"])
    history = json.loads((tmp_path / "exp" / "dnn" / "specialists_0" / "history.json").read_text())
    assert 0 < history[0]["valid_frame_accuracy"] <= 1
    assert (tmp_path / "exp" / "dnn" / specialists.student_of(cfg).name / "final.pt").is_file()
    specialists.EXPERIMENT.decode(cfg)
    specialists.EXPERIMENT.publish(cfg)
    report = json.loads((tmp_path / "exp" / "report" / "report.json").read_text())["specialists"]
    assert report["combined"]["system"] == "specialists" and "test" in report["redistilled"]["wer"]
    for coverage in (report["coverage"], report["coverage_active"]):
        frames = sum(row["frames"] for row in coverage)
        for key in ("generalist", "combined"):  # each breakdown adds up to the systems' accuracies
            assert abs(sum(row[key]["correct"] for row in coverage) / frames - report[key]["frame_accuracy"]["test"]) < 1e-9
    assert report["generalist_student"]["system"] == f"student_{cfg.specialists.generalist}_T2_dense"  # the control: the generalist's student
    assert report["redistilled"]["system"] == "student_specialists_T2_dense" and "ci" in report["redistilled_minus_generalist_student"]
    assert len(report["dustbin"]["fitted_shifts"]) == len(report["dustbin"]["labels_alone_shifts"]) == 3
    assert "the paper's count" in (tmp_path / "exp" / "report" / "specialists.md").read_text()
    specialists.EXPERIMENT.train(cfg)  # every stage is current: nothing is remade


def test_pdfs_the_generalist_finds_all_but_impossible_keep_finite_scores() -> None:
    model = combination([[0, 1], [1, 2, 3]], pdfs=6)
    with torch.no_grad():
        model.generalist.layers[-1].bias.copy_(torch.tensor([0.0, -10.0, -20.0, -150.0, -300.0, -900.0]))  # exp underflows in float32
    scores = model(torch.randn(20, 2, 3))
    assert torch.isfinite(scores).all() and scores[:, 5].max() < -100  # what the decoder divides by priors stays a number


def test_the_dustbin_shift_makes_the_mean_dustbin_probability_the_share_outside_the_group() -> None:
    from asrkd.experiments.specialists.experiment import dustbin_shift

    torch.manual_seed(0)
    logits = torch.randn(500, 4) * 2
    shift = dustbin_shift(logits, 0.7)
    shifted = logits.clone()
    shifted[:, -1] += shift
    assert abs(float(torch.softmax(shifted, -1)[:, -1].mean()) - 0.7) < 1e-6
    assert dustbin_shift(logits, 0.9) > shift  # more mass outside: a larger shift


def test_coverage_counts_every_group_holding_the_true_pdf_and_the_active_ones_apart() -> None:
    groups = [[0, 1], [1, 2], [1, 3]]
    model = combination(groups, pdfs=4)
    x = torch.randn(40, 2, 3)
    pdf_ids = torch.arange(40) % 4

    class Frames:
        def context(self, batch: torch.Tensor) -> torch.Tensor:
            return x[batch]

    class Data:
        frames = Frames()

    data = Data()
    data.pdf_ids = pdf_ids
    every, active = coverage_counts(model, data, np.arange(40), 16)
    holding = np.array([sum(p in g for g in groups) for p in range(4)])
    assert (every == holding[pdf_ids.numpy()]).all()  # the paper's count: every group that holds it, active or not
    assert (active <= every).all() and (active < every).any()


def test_the_random_half_is_the_remainder_and_the_labels_alone_shift_undoes_its_odds() -> None:
    in_group, outside = np.arange(0, 10), np.arange(10, 100)
    frames = mixed_frames(in_group, outside, np.random.default_rng(0))
    assert len(frames) == 20 and set(frames) >= set(in_group) and len(set(frames) - set(in_group)) == 10
    assert np.isclose(labels_alone_shift(0.1, "remainder"), np.log(9.0))  # trained at odds 1:1, the data's are 1:9
    assert np.isclose(labels_alone_shift(0.1, "all"), np.log((0.55 / 0.45) / (0.1 / 0.9)))
