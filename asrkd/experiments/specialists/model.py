"""The specialists' combination (Hinton et al. 2015, §5.2) as one model, registered as model kind
``specialists`` (its checkpoints: a config with ``specialists``), so it scores, decodes and
teaches through the common code as any model."""

from __future__ import annotations

import torch
from torch import nn

from asrkd.nnet.model import HybridDNN, register_model_kind


class SpecialistCombination(nn.Module):
    """A generalist and its specialists as one model (Hinton et al. 2015, §5.2).

    Specialist m is a HybridDNN over its group of pdf-ids (``groups[m]``) plus a dustbin class
    (every other pdf), its dustbin logit raised by ``dustbin_shifts[m]`` (undoing the bias of
    its training frames' over-sampling of its group; fitted on held-out frames). For a frame, the active specialists are
    those whose group holds one of the generalist's ``top_n`` most probable pdfs; the output
    is the distribution q over all pdfs that minimizes KL(p_g || q) + the sum over active m of
    KL(p_m || q collapsed to m's group + dustbin). That objective is convex in q and a sum of
    cross-entropies whose dustbin terms are logs of sums of q, so EM solves it without a step
    size: each iteration gives every pdf the generalist's probability, the in-group probability
    of each active specialist, and each active dustbin's mass spread over the pdfs outside its
    group in proportion to the current q, then renormalizes (the objective never rises).
    ``forward`` returns log q (normalized: the logits of q), so the combination scores,
    decodes and teaches as any model. The generalist alone decides frames with no active
    specialist."""

    def __init__(self, config: dict):
        super().__init__()
        combination = config["specialists"]
        base = {key: value for key, value in config.items() if key != "specialists"}
        self.config = dict(config)
        self.generalist = HybridDNN(**base)
        self.specialists = nn.ModuleList(HybridDNN(**(base | {"num_pdfs": len(group) + 1})) for group in combination["groups"])
        membership = torch.zeros(len(combination["groups"]), base["num_pdfs"], dtype=torch.bool)
        for m, group in enumerate(combination["groups"]):
            membership[m, group] = True
        self.register_buffer("membership", membership)  # (specialists, pdfs): pdf in group m
        self.register_buffer("dustbin_shifts", torch.tensor(combination["dustbin_shifts"], dtype=torch.float32))
        self.top_n, self.iterations = int(combination["top_n"]), int(combination["iterations"])

    @classmethod
    def of(cls, generalist: HybridDNN, specialists: list[HybridDNN], groups: list[list[int]], dustbin_shifts: list[float],
           top_n: int, iterations: int) -> "SpecialistCombination":
        """The combination of trained models (their weights copied)."""
        settings = {"groups": [list(map(int, g)) for g in groups], "dustbin_shifts": [float(s) for s in dustbin_shifts],
                    "top_n": int(top_n), "iterations": int(iterations)}
        with torch.random.fork_rng(devices=[]):
            model = cls({**generalist.config, "specialists": settings}).to(generalist.feat_mean.device)
        model.generalist.load_state_dict(generalist.state_dict())
        for target, source in zip(model.specialists, specialists):
            target.load_state_dict(source.state_dict())
        return model.eval()

    def active(self, general_log_probs: torch.Tensor) -> torch.Tensor:
        """(B, specialists) bool: the specialists whose group holds one of the frame's top_n pdfs."""
        top = general_log_probs.topk(self.top_n, dim=-1).indices  # (B, n)
        return self.membership[:, top].any(-1).t()

    def specialist_log_probs(self, m: int, spliced: torch.Tensor) -> torch.Tensor:
        """(B, |group| + 1) log-probabilities of specialist m, its dustbin shift applied."""
        logits = self.specialists[m](spliced).float()
        logits[:, -1] += self.dustbin_shifts[m]
        return torch.log_softmax(logits, dim=-1)

    def forward(self, spliced: torch.Tensor) -> torch.Tensor:
        general = torch.log_softmax(self.generalist(spliced).float(), dim=-1)
        active = self.active(general)
        rows = active.any(1).nonzero().squeeze(1)
        if not len(rows):
            return general
        opinions = [(m, active[rows, m].nonzero().squeeze(1)) for m in range(len(self.specialists))]
        opinions = [(m, where, self.specialist_log_probs(m, spliced[rows[where]]).double().exp()) for m, where in opinions if len(where)]
        out = general.clone()
        q = self.combine(general[rows].double().exp(), opinions)  # float64: float32 probabilities of unlikely pdfs underflow to 0
        out[rows] = q.clamp_min(torch.finfo(q.dtype).tiny).log().float()
        return out

    def combine(self, general: torch.Tensor, opinions: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """q (R, pdfs) minimizing KL(general || q) + sum of KL(p_m || collapsed q) by EM, from
        ``opinions``: (specialist, the rows it is active on, its (rows, |group| + 1) probabilities)."""
        fixed = general.clone()  # what does not depend on q: the generalist's and the in-group probabilities
        weight = torch.ones(len(general), 1, dtype=general.dtype, device=general.device)
        dustbins = []
        for m, where, probs in opinions:
            group = self.membership[m].nonzero().squeeze(1)
            fixed[where[:, None], group[None, :]] += probs[:, :-1]
            weight[where] += 1.0
            dustbins.append((~self.membership[m], where, probs[:, -1:]))
        q = fixed / fixed.sum(-1, keepdim=True)
        for _ in range(self.iterations):
            mass = fixed.clone()
            for outside, where, dustbin in dustbins:
                share = q[where] * outside
                mass[where] += dustbin * share / share.sum(-1, keepdim=True).clamp_min(1e-30)
            q = mass / weight
        return q


register_model_kind("specialists", lambda **config: SpecialistCombination(config), marker="specialists")
