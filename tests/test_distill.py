import pytest
import torch
import torch.nn.functional as F

from asrkd.distill.losses import distillation_loss, logit_distillation_loss, logit_matching_loss, reverse_kl
from asrkd.experiments.distillation.experiment import temperature_sentence


def soft_gradient(student: torch.Tensor, teacher: torch.Tensor, temperature: float, hard_weight: float = 0.0) -> torch.Tensor:
    student = student.clone().requires_grad_(True)
    soft = torch.softmax(teacher / temperature, dim=-1)
    distillation_loss(student, soft, torch.zeros(len(student), dtype=torch.long), temperature, 1.0, hard_weight).backward()
    return student.grad


def test_t_squared_keeps_the_gradient_size_at_high_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 50, generator=generator), torch.randn(8, 50, generator=generator)
    norms = [soft_gradient(student, teacher, t).norm().item() for t in (10.0, 20.0, 50.0, 100.0)]
    assert max(norms) / min(norms) < 1.05  # unscaled, it would shrink 100-fold from T=10 to T=100


def test_high_temperature_limit_is_logit_matching() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 30, generator=generator), torch.randn(4, 30, generator=generator)
    student, teacher = student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True)
    matched = student.clone().requires_grad_(True)
    logit_matching_loss(matched, teacher).backward()
    expected = matched.grad  # T^2 dC/dz -> (z - v) / N as T grows, the logit-matching gradient
    for temperature, tolerance in ((20.0, 0.05), (100.0, 0.01)):
        error = (soft_gradient(student, teacher, temperature) - expected).norm() / expected.norm()
        assert error < tolerance


def test_hard_weight_is_relative_to_the_soft_term() -> None:
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    soft = torch.softmax(torch.randn(6, 10), dim=-1)
    both = distillation_loss(logits, soft, labels, 2.0, soft_weight=1.0, hard_weight=0.5)
    soft_only = distillation_loss(logits, soft, labels, 2.0, soft_weight=1.0, hard_weight=0.0)
    torch.testing.assert_close(both - soft_only, 0.5 * F.cross_entropy(logits, labels))
    torch.testing.assert_close(distillation_loss(logits, soft, labels, 2.0, soft_weight=0.0, hard_weight=1.0), F.cross_entropy(logits, labels))
    teacher = torch.randn(6, 10)
    torch.testing.assert_close(logit_distillation_loss(logits, teacher, labels, 1.0, 0.5) - logit_matching_loss(logits, teacher),
                               0.5 * F.cross_entropy(logits, labels))


TOY_METHOD = '''"""A toy distillation method: the student learns the teacher's top-1 pdf as a one-hot target."""
import torch

from asrkd.distill.forms import FORMS, TargetForm, register

DENSE = FORMS["dense"]


class OneHot:
    def __init__(self, rows):
        self.rows, self.num_frames, self.num_pdfs = rows, rows.num_frames, rows.num_pdfs

    def batch(self, indices):
        dense = self.rows.batch(indices)
        return torch.nn.functional.one_hot(dense.argmax(-1), self.num_pdfs).to(dense.dtype)


register(TargetForm("top1", DENSE.store, lambda *args: OneHot(DENSE.rows(*args))))
'''


def test_a_new_distillation_method_is_one_module_and_a_config_entry(run_dir, tmp_path, monkeypatch) -> None:
    """The module registers its target form; distill.methods names the module, distill.students its T."""
    import json

    from asrkd.distill import soft_targets, student
    from asrkd.nnet.training_set import TrainingSet

    from .test_reliability import clone
    from conftest import tiny_config

    root = clone(run_dir, tmp_path / "run")
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["distill.teacher=baseline", "distill.temperatures=[2]", "distill.logit_matching=false", "train.epochs=1",
              "train.max_frames_per_epoch=640", "distill.methods=[toy_method]", "+distill.students.top1=[2]",
              *(f"distill.students.{form}=[]" for form in ("dense", "topk", "compact", "compact_prior"))]  # its student alone
    cfg = tiny_config(root, *common)
    soft_targets.run(cfg)
    student.run(cfg)
    record = json.loads((root / "exp" / "dnn" / "student_baseline_T2_top1" / "stage.json").read_text())
    assert record["config"]["form"] == "top1" and "soft targets" in record["inputs"]
    training = TrainingSet(cfg)
    data, train_idx, _, _ = training.load()
    batch = torch.from_numpy(train_idx[:64])
    top1 = student.target_source(cfg, student.Student("top1", 2.0, 0), training)[0](data)(batch)
    dense = student.target_source(cfg, student.Student("dense", 2.0, 0), training)[0](data)(batch)
    assert torch.equal(top1.argmax(-1), dense.argmax(-1)) and torch.equal(top1.sum(-1), torch.ones(64))


def test_one_temperature_trained_is_no_choice() -> None:
    one = {"temperature": 2.0, "temperature_choice": {"runner_up": None, "difference": None, "significant": False}}
    assert temperature_sentence(one, 3) == ("T = 2 is the only temperature the dense students were trained at "
                                            "(distill.students.dense): no choice made.")
    two = {"temperature": 2.0, "temperature_choice": {"runner_up": 5.0, "significant": False,
                                                      "difference": {"estimate": 0.001, "ci": [-0.002, 0.004], "p_above_zero": 0.7}}}
    assert "against the runner-up (T = 5) by +0.10 [-0.20, +0.40] points on validation, P(> 0) = 0.70: not significant" in temperature_sentence(two, 3)


def test_three_percent_rows_are_the_replicates_their_stage_trains(tmp_path) -> None:
    """three_percent.seeds=3: each row is the hard run's or the student's three replicates, named as
    train-dnn and train-student name them; at 1 seed the names are the committed 4x512 rows'."""
    from asrkd.cli import load_config
    from asrkd.experiments.three_percent import experiment as three_percent

    def rows(*overrides: str) -> dict[str, list[str]]:
        cfg = load_config([f"exp_dir={tmp_path}", "three_percent.fractions=[0.03]", "three_percent.speed_perturbed=false", *overrides])
        return {row: [s.name for s in systems] for row, systems in three_percent.rows_by_fraction(cfg)[0.03].items()}

    assert rows() == {"sub_hard": ["hard_3pct"], "sub_hard_early_stop": ["hard_3pct@best"], "sub_soft": ["student_baseline_T2_dense_train_3pct"]}
    three = rows("three_percent.seeds=3")
    assert three["sub_hard"] == ["hard_3pct", "hard_3pct_seed1", "hard_3pct_seed2"]
    assert three["sub_hard_early_stop"] == ["hard_3pct@best", "hard_3pct_seed1@best", "hard_3pct_seed2@best"]
    assert three["sub_soft"] == ["student_baseline_T2_dense_train_3pct", "student_baseline_T2_dense_train_3pct_seed1",
                                 "student_baseline_T2_dense_train_3pct_seed2"]


def test_reverse_kl_is_the_divergence_of_the_student_from_the_teacher_on_any_form() -> None:
    """KL(softmax(z/T) || q) against torch's own KL; finite on top-k targets (zeros outside the k);
    the student's batch loss takes it in the cross-entropy's place, with the same T^2 and hard term."""
    from asrkd.distill.forms import FORMS
    from asrkd.distill.student import batch_loss_of
    from omegaconf import OmegaConf

    generator = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 30, generator=generator), torch.softmax(torch.randn(6, 30, generator=generator), -1)
    student = torch.log_softmax(logits / 2.0, -1)
    expected = F.kl_div(teacher.log(), student, log_target=True, reduction="batchmean")  # KL(student || teacher)
    torch.testing.assert_close(reverse_kl(logits, teacher, 2.0), expected)
    assert float(reverse_kl(logits / 2.0 * 2.0, torch.softmax(logits / 2.0, -1), 2.0)) == pytest.approx(0.0, abs=1e-6)
    top = torch.zeros_like(teacher).scatter(1, teacher.topk(3, -1).indices, teacher.topk(3, -1).values)
    assert torch.isfinite(reverse_kl(logits, top / top.sum(-1, keepdim=True), 2.0))
    hard = torch.randint(0, 30, (6,), generator=generator)
    dcfg = OmegaConf.create({"loss": "reverse_kl", "soft_weight": 1.0, "hard_weight": 0.5})
    for form in ("dense", "topk", "compact"):
        torch.testing.assert_close(batch_loss_of(dcfg, FORMS[form], 2.0)(logits, teacher, hard),
                                   distillation_loss(logits, teacher, hard, 2.0, 1.0, 0.5, reverse_kl))
    assert not torch.allclose(distillation_loss(logits, teacher, hard, 2.0, 1.0, 0.5, reverse_kl), distillation_loss(logits, teacher, hard, 2.0))
    with pytest.raises(ValueError, match="distill.loss=forward_kl: no such soft term"):
        batch_loss_of(OmegaConf.create({"loss": "forward_kl", "soft_weight": 1.0, "hard_weight": 0.5}), FORMS["dense"], 2.0)
