"""Self-distillation's loss over a network's exits (BYOT, Zhang et al. 2019): the paper's terms
(:mod:`asrkd.distill.losses`) arranged so that the deepest exit teaches the shallow ones."""

from __future__ import annotations

import torch

from asrkd.distill.losses import hard_term, soft_cross_entropy


def self_distillation_loss(
    logits: list[torch.Tensor],
    features: list[torch.Tensor],
    hard_targets: torch.Tensor,
    temperature: float,
    kd_weight: float,
    hint_weight: float,
) -> torch.Tensor:
    """"Be Your Own Teacher" (Zhang et al. 2019) over a network's exits, shallow to deep: the
    deepest exit learns the labels; each shallower one (1 - kd_weight) * its labels' CE +
    kd_weight * T^2 * CE(the deepest exit's softmax at T, its own) (the KL up to the teacher's
    entropy, which has no gradient) + hint_weight * the squared L2 distance between its
    bottleneck features and the deepest features, per dimension (so the weight does not
    depend on the width). The deepest exit's outputs are the teacher:
    no gradient flows into them from the shallow exits' terms."""
    loss = hard_term(logits[-1], hard_targets, 1.0)
    teacher = torch.softmax(logits[-1].detach().float() / temperature, dim=-1)
    deepest = features[-1].detach().float()
    for z, feature in zip(logits[:-1], features[:-1]):
        loss = loss + hard_term(z, hard_targets, 1.0 - kd_weight) + kd_weight * temperature**2 * soft_cross_entropy(z, teacher, temperature)
        loss = loss + hint_weight * (feature.float() - deepest).pow(2).mean()
    return loss
