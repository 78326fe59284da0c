"""The distillation losses of Hinton, Vinyals & Dean (2015).

``distillation_loss`` is the paper's objective: the soft term, cross-entropy between the
teacher's soft targets at temperature T and the student's softmax(z/T), multiplied by T^2 so
its gradients keep their size as T changes (they scale as 1/T^2), plus the hard term,
cross-entropy with the forced alignment's pdf-ids at T = 1, weighted relative to the soft
term (0.5 in the paper). ``logit_matching_loss`` is its high-temperature limit (§2.1):
squared error between zero-mean student and teacher logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over frames of -sum_k q_k log softmax(z/T)_k, with q the teacher's soft targets."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(soft_targets.float() * log_probs).sum(-1).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    soft_targets: torch.Tensor,
    hard_targets: torch.Tensor,
    temperature: float,
    soft_weight: float = 1.0,
    hard_weight: float = 0.5,
) -> torch.Tensor:
    """soft_weight * T^2 * CE(soft targets, softmax(z/T)) + hard_weight * CE(pdf-ids, softmax(z))."""
    loss = soft_weight * temperature**2 * soft_cross_entropy(student_logits, soft_targets, temperature)
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(student_logits.float(), hard_targets)
    return loss


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * squared error between zero-mean logits, averaged over frames (the T -> inf limit)."""
    student = student_logits.float() - student_logits.float().mean(-1, keepdim=True)
    teacher = teacher_logits.float() - teacher_logits.float().mean(-1, keepdim=True)
    return 0.5 * (student - teacher).pow(2).sum(-1).mean()
