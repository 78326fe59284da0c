"""Views of a training batch: what the student (and a consistent teacher) see (function matching).

Beyer et al. (CVPR 2022, "Knowledge distillation: a good teacher is patient and consistent"):
a student matched to its teacher's outputs on the very inputs it trains on, augmented
aggressively and for long, matches the teacher; one trained on outputs precomputed on clean
inputs over-fits them. A view here is drawn per batch, on the training device, from the
``views`` config and a seed that depends on the step alone (so a resumed run draws the same
views, bit for bit on CPU), and is applied to the spliced input windows (B, 26, 40):

* ``freq_masks`` bands of up to ``freq_width`` mel bins and ``time_masks`` spans of up to
  ``time_width`` of the window's frames set to zero, the speaker's mean after CMVN
  (SpecAugment, Park et al. 2019, inside the DNN's window);
* ``noise_std``: Gaussian noise added to every feature (log-mel units);
* ``mixup_alpha``: each frame mixed with another frame of the batch, lambda ~ Beta(alpha, alpha)
  per frame (Zhang et al. 2018): the hard term is then lambda CE(own pdf-id) + (1 - lambda)
  CE(the partner's), stored soft targets mix the same way, a teacher on the fly scores the
  mixed input itself.

A view with nothing switched on is the identity (no random draw at all): the plain recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

VIEW_KEYS = ("freq_masks", "freq_width", "time_masks", "time_width", "noise_std", "mixup_alpha", "seed")


@dataclass(frozen=True)
class ViewSpec:
    freq_masks: int = 0
    freq_width: int = 8
    time_masks: int = 0
    time_width: int = 4
    noise_std: float = 0.0
    mixup_alpha: float = 0.0
    seed: int = 0

    @classmethod
    def of(cls, view) -> "ViewSpec":
        """The view a config entry describes (a mapping of VIEW_KEYS; others are ignored)."""
        return cls(**{key: view[key] for key in VIEW_KEYS if key in view})

    @property
    def active(self) -> bool:
        return bool(self.freq_masks or self.time_masks or self.noise_std or self.mixup_alpha)


@dataclass
class View:
    """A batch as the model sees it: ``inputs``; with mixup, the ``partner`` (positions in the
    batch) each frame is mixed with and its weight ``lam`` (B,) on its own frame."""

    inputs: torch.Tensor
    partner: torch.Tensor | None = None
    lam: torch.Tensor | None = None

    def mix(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-frame rows (targets, soft targets) mixed as the inputs were."""
        if self.partner is None:
            return rows
        lam = self.lam.to(rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
        return lam * rows + (1 - lam) * rows[self.partner]

    def hard_cross_entropy(self, logits: torch.Tensor, hard: torch.Tensor, weight: float = 1.0) -> torch.Tensor | float:
        """weight * CE against the pdf-ids, mixed as the inputs were; frames whose pdf-id (or
        whose partner's) is -1 carry no hard term for that part (as losses.hard_term)."""
        if not weight:
            return 0.0
        own = F.cross_entropy(logits.float(), hard.long(), ignore_index=-1, reduction="none")
        if self.partner is None:
            return weight * own.sum() / (hard >= 0).sum().clamp(min=1)
        other = F.cross_entropy(logits.float(), hard[self.partner].long(), ignore_index=-1, reduction="none")
        lam = self.lam.float()
        labeled = (lam * (hard >= 0) + (1 - lam) * (hard[self.partner] >= 0)).sum().clamp(min=1e-6)
        return weight * (lam * own + (1 - lam) * other).sum() / labeled


def draw(spec: ViewSpec, inputs: torch.Tensor, step: int) -> View:
    """The view of ``inputs`` (B, frames, dims) at training step ``step``: the masks, mixup weights
    and partners are drawn on the host from (seed, step) (a few numbers per frame), the noise on
    the device from a generator seeded the same way."""
    if not spec.active:
        return View(inputs)
    rng = np.random.default_rng([int(spec.seed), int(step)])
    batch, frames, dims = inputs.shape
    device = inputs.device
    x = inputs
    if spec.freq_masks:
        x = x * band_mask(rng, batch, dims, spec.freq_masks, spec.freq_width).to(device)[:, None, :]
    if spec.time_masks:
        x = x * band_mask(rng, batch, frames, spec.time_masks, spec.time_width).to(device)[:, :, None]
    if spec.noise_std:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**62)))
        x = x + float(spec.noise_std) * torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    if not spec.mixup_alpha:
        return View(x)
    lam = torch.from_numpy(rng.beta(spec.mixup_alpha, spec.mixup_alpha, size=batch).astype(np.float32)).to(device)
    partner = torch.from_numpy(rng.permutation(batch)).to(device)
    weight = lam.to(x.dtype).view(-1, 1, 1)
    return View(weight * x + (1 - weight) * x[partner], partner, lam)


def band_mask(rng: np.random.Generator, batch: int, size: int, count: int, width: int) -> torch.Tensor:
    """(batch, size) of ones with ``count`` bands per row, each of width 0..``width`` at a uniform
    start, set to zero."""
    positions = np.arange(size)[None, :]
    keep = np.ones((batch, size), dtype=np.float32)
    for _ in range(count):
        widths = rng.integers(0, width + 1, size=(batch, 1))
        starts = rng.integers(0, size - widths + 1)
        keep[(positions >= starts) & (positions < starts + widths)] = 0.0
    return torch.from_numpy(keep)
