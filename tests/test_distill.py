import torch
import torch.nn.functional as F

from asrkd.distill.losses import distillation_loss, logit_distillation_loss, logit_matching_loss


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
