"""The image experiment's convolutional big net (``kind: conv``), a model kind of the one training
loop: its checkpoints load as any model's once this module is imported (:mod:`.nets` imports it for
``CONV_KEYS``, the keys a conv variant of the big net adds)."""

from __future__ import annotations

import torch

from asrkd.nnet.model import register_model_kind


class ConvImageNet(torch.nn.Module):
    """The image experiment's convolutional big net (``kind: conv``): each of ``channels`` a block of
    a ``kernel`` x ``kernel`` convolution (same padding), ReLU, 2x2 max pooling and dropout
    ``conv_dropout``; then ``num_hidden_layers`` dense ReLU layers of ``hidden_dim`` with dropout
    ``dropout``, and the class logits. It takes what a HybridDNN without context takes (a batch of
    one "frame" of 784 pixels) and trains and scores through the same loop; its config holds every
    constructor argument, so its checkpoints load as any model's (:func:`register_model_kind`)."""

    def __init__(self, feat_dim: int, num_pdfs: int, left_context: int, right_context: int, num_hidden_layers: int, hidden_dim: int,
                 dropout: float = 0.0, channels: list[int] | None = None, kernel: int = 5, conv_dropout: float = 0.0, init: str = "default"):
        super().__init__()
        side = int(round(feat_dim ** 0.5))
        if side * side != feat_dim or left_context or right_context or not channels:
            raise ValueError(f"a conv net takes square images without context and at least one channel count, got feat_dim={feat_dim}, "
                             f"context {left_context}+{right_context}, channels {channels}")
        channels = [int(c) for c in channels]
        self.config = dict(kind="conv", feat_dim=feat_dim, num_pdfs=num_pdfs, left_context=0, right_context=0,
                           num_hidden_layers=num_hidden_layers, hidden_dim=hidden_dim, dropout=dropout, channels=channels,
                           kernel=int(kernel), conv_dropout=float(conv_dropout))
        self.side = side
        layers: list[torch.nn.Module] = []
        previous = 1
        for count in channels:
            layers += [torch.nn.Conv2d(previous, count, int(kernel), padding=int(kernel) // 2), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            if conv_dropout > 0:
                layers.append(torch.nn.Dropout(float(conv_dropout)))
            previous, side = count, side // 2
        layers.append(torch.nn.Flatten())
        width = previous * side * side
        for _ in range(num_hidden_layers):
            layers += [torch.nn.Linear(width, hidden_dim), torch.nn.ReLU()]
            if dropout > 0:
                layers.append(torch.nn.Dropout(dropout))
            width = hidden_dim
        layers.append(torch.nn.Linear(width, num_pdfs))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, spliced: torch.Tensor) -> torch.Tensor:
        """(B, 1, pixels) -> (B, classes) logits."""
        return self.layers(spliced.float().reshape(-1, 1, self.side, self.side))


register_model_kind("conv", ConvImageNet)
CONV_KEYS = ("kind", "channels", "kernel", "conv_dropout")  # a big-net variant's keys beyond images.big's: a conv net's
