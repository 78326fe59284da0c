"""The distillation losses of Hinton, Vinyals & Dean (2015).

``distillation_loss`` is the paper's objective: the soft term, cross-entropy between the
teacher's soft targets at temperature T and the student's softmax(z/T), multiplied by T^2 so
its gradients keep their size as T changes (they scale as 1/T^2), plus the hard term,
cross-entropy with the forced alignment's pdf-ids at T = 1, weighted relative to the soft
term (0.5 in the paper). ``logit_matching_loss`` is the soft term's high-temperature limit
(§2.1): squared error between zero-mean student and teacher logits. BYOT's loss (a network's
deepest exit teaching its shallow ones) lives with its experiment, asrkd/experiments/self_distillation/.

The soft term is a registered function of (student logits, teacher probabilities, T), apart
from how the targets were stored (dense, top-k, compact, on the fly: :mod:`asrkd.distill.forms`):
``distill.loss`` names it for every student (:data:`SOFT_TERMS`; a new one is a function and
a :func:`register_soft_term` line, as torchdistill's loss registry).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over frames of -sum_k q_k log softmax(z/T)_k, with q the teacher's soft targets."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(soft_targets.float() * log_probs).sum(-1).mean()


def reverse_kl(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float, floor: float = 1e-6) -> torch.Tensor:
    """Mean over frames of KL(softmax(z/T) || q): the student pays for mass where the teacher has
    little (mode-seeking), where cross-entropy makes it cover all the teacher's mass. The targets are
    floored at ``floor`` and renormalized first: a top-k form holds zeros, whose log is -inf."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    targets = soft_targets.float().clamp(min=floor)
    log_targets = torch.log(targets / targets.sum(-1, keepdim=True))
    return (log_probs.exp() * (log_probs - log_targets)).sum(-1).mean()


SoftTerm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (student logits, teacher probabilities, T) -> a scalar

DEFAULT_SOFT_TERM = "cross_entropy"  # the paper's
SOFT_TERMS: dict[str, SoftTerm] = {DEFAULT_SOFT_TERM: soft_cross_entropy, "reverse_kl": reverse_kl}


def register_soft_term(name: str, term: SoftTerm) -> SoftTerm:
    """Make ``term`` a soft term ``distill.loss`` can name (a later registration of the name replaces it)."""
    SOFT_TERMS[name] = term
    return term


def soft_term_of(name: str) -> SoftTerm:
    if name not in SOFT_TERMS:
        raise ValueError(f"distill.loss={name}: no such soft term (known: {', '.join(SOFT_TERMS)}); a new one is a function "
                         "registered with asrkd.distill.losses.register_soft_term, from a module named in distill.methods")
    return SOFT_TERMS[name]


def hard_term(student_logits: torch.Tensor, hard_targets: torch.Tensor, hard_weight: float) -> torch.Tensor | float:
    """hard_weight * CE(pdf-ids, softmax(z)): the forced alignment's term, at T = 1.

    Frames whose target is -1 (a transfer set's unaligned or unlabeled frames) have no hard
    term: the mean is over the labeled frames of the batch, and a batch without one adds 0.
    """
    if not hard_weight:
        return 0.0
    labeled = (hard_targets >= 0).sum().clamp(min=1)
    return hard_weight * F.cross_entropy(student_logits.float(), hard_targets.long(), ignore_index=-1, reduction="sum") / labeled


def distillation_loss(
    student_logits: torch.Tensor,
    soft_targets: torch.Tensor,
    hard_targets: torch.Tensor,
    temperature: float,
    soft_weight: float = 1.0,
    hard_weight: float = 0.5,
    soft_term: SoftTerm = soft_cross_entropy,
) -> torch.Tensor:
    """soft_weight * T^2 * CE(soft targets, softmax(z/T)) + hard_weight * CE(pdf-ids, softmax(z)),
    or another ``soft_term`` in CE's place (reverse KL: its gradient also scales as 1/T^2)."""
    soft = soft_weight * temperature**2 * soft_term(student_logits, soft_targets, temperature)
    return soft + hard_term(student_logits, hard_targets, hard_weight)


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Squared error between zero-mean logits, 0.5 * ||z - v||^2 / N averaged over frames.

    The 1/N (N pdfs) makes it the T -> inf limit of T^2 * CE(soft targets, softmax(z/T)) in
    gradient, so soft_weight and hard_weight mean the same as in distillation_loss.
    """
    student = student_logits.float() - student_logits.float().mean(-1, keepdim=True)
    teacher = teacher_logits.float() - teacher_logits.float().mean(-1, keepdim=True)
    return 0.5 * (student - teacher).pow(2).mean(-1).mean()


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    hard_targets: torch.Tensor,
    soft_weight: float = 1.0,
    hard_weight: float = 0.5,
) -> torch.Tensor:
    """soft_weight * logit matching + hard_weight * CE(pdf-ids, softmax(z)): §2.1's high-T limit of the objective."""
    return soft_weight * logit_matching_loss(student_logits, teacher_logits) + hard_term(student_logits, hard_targets, hard_weight)
