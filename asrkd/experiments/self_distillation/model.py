"""Self-distillation's network: a HybridDNN with shallow exits (Be Your Own Teacher), registered as
model kind ``multi_exit`` (its checkpoints: a config with ``exits``), so it trains, resumes and
loads through the one training loop as any model."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from asrkd.nnet.model import HybridDNN, register_model_kind


class ExitOutputs(NamedTuple):
    """What a MultiExitDNN gives in training: every exit's logits and features, shallow to deep."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor]


class MultiExitDNN(HybridDNN):
    """A HybridDNN with shallow exits (self-distillation, "Be Your Own Teacher"): after each hidden
    layer k of ``exits``, a head and an output layer. The head is full-width (a Linear to the
    hidden width + ReLU) unless ``head_width`` is given: then BYOT's bottleneck, reduced to
    ``head_width`` and expanded back to the hidden width (W -> b -> b -> W, each a Linear +
    ReLU: its branch's 1x1, kxk and 1x1 convolutions as fully connected layers), so the head's
    features have the deepest features' width, as the hints' distance needs. In training
    ``forward`` returns ExitOutputs (the deepest exit is the network's own output, its features
    the last hidden layer's); in eval the deepest logits, so it validates, checkpoints and
    resumes as any model; the deepest features are the last hidden layer's before its dropout
    (dropout noise in the hints' target would be noise the shallow exits are asked to copy).
    ``exit_model(k)`` is exit k alone as a plain HybridDNN (k hidden layers, the head's as
    more), which decodes like any other."""

    def __init__(self, feat_dim: int, num_pdfs: int, left_context: int, right_context: int, num_hidden_layers: int, hidden_dim: int,
                 dropout: float = 0.0, exits: tuple[int, ...] | list[int] = (), init: str = "default", head_width: int | None = None):
        super().__init__(feat_dim, num_pdfs, left_context, right_context, num_hidden_layers, hidden_dim, dropout, init)
        exits = sorted({int(k) for k in exits})
        if not exits or exits[0] < 1 or exits[-1] >= num_hidden_layers:
            raise ValueError(f"exits {exits}: each must be a hidden layer below the last, in 1..{num_hidden_layers - 1}")
        self.config["exits"] = exits
        if head_width is not None:
            self.config["head_width"] = int(head_width)  # recorded only when set: full-width heads' checkpoints stay as they were
        self.heads = nn.ModuleList(head(hidden_dim, head_dims(hidden_dim, head_width), num_pdfs) for _ in exits)
        ends = [i for i, layer in enumerate(self.layers) if isinstance(layer, nn.ReLU)]  # a hidden layer's block ends here,
        self.block_ends = [end + 1 if dropout > 0 else end for end in ends]  # or at its dropout

    def forward(self, spliced: torch.Tensor) -> torch.Tensor | ExitOutputs:
        if not self.training:
            return super().forward(spliced)
        h = ((spliced - self.feat_mean) * self.feat_inv_std).flatten(1)
        logits, features = [], []
        heads = dict(zip(self.config["exits"], self.heads))
        for i, layer in enumerate(self.layers[:-1]):
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                undropped = h  # the hidden layer's features before its dropout: the hints' target is what the network computes
            hidden = self.block_ends.index(i) + 1 if i in self.block_ends else None
            if hidden in heads:
                feature = heads[hidden][:-1](h)
                features.append(feature)
                logits.append(heads[hidden][-1](feature))
        features.append(undropped)
        logits.append(self.layers[-1](h))
        return ExitOutputs(logits, features)

    def exit_model(self, k: int) -> HybridDNN:
        """Exit ``k`` as a HybridDNN: a shallow one (a hidden layer of ``exits``) with k hidden
        layers and its head's (one full-width, or the bottleneck's three); the deepest
        (k = num_hidden_layers) the network without its heads."""
        linears = [layer for layer in self.layers if isinstance(layer, nn.Linear)]
        deepest = k == self.config["num_hidden_layers"]
        if not deepest and k not in self.config["exits"]:
            raise ValueError(f"no exit after hidden layer {k}: the exits are {self.config['exits']} and {self.config['num_hidden_layers']}")
        config = {key: value for key, value in self.config.items() if key not in ("exits", "head_width")}
        if not deepest:
            config |= exit_shape(self.config["hidden_dim"], k, self.config.get("head_width"))
        with torch.random.fork_rng(devices=[]):
            model = HybridDNN(**config).to(self.feat_mean.device)
        head_linears = [] if deepest else [layer for layer in self.heads[self.config["exits"].index(k)] if isinstance(layer, nn.Linear)]
        sources = linears if deepest else [*linears[:k], *head_linears]
        with torch.no_grad():
            model.feat_mean.copy_(self.feat_mean)
            model.feat_inv_std.copy_(self.feat_inv_std)
            for target, source in zip([layer for layer in model.layers if isinstance(layer, nn.Linear)], sources):
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        return model.eval()


def head_dims(hidden_dim: int, head_width: int | None) -> list[int]:
    """The widths of a shallow exit's head layers: the hidden width (full-width), or BYOT's
    bottleneck reduced to ``head_width`` and expanded back to the hidden width."""
    return [hidden_dim] if head_width is None else [int(head_width), int(head_width), hidden_dim]


def head(hidden_dim: int, dims: list[int], num_pdfs: int) -> nn.Sequential:
    """A shallow exit's head: a Linear + ReLU per width of ``dims``, then the output layer."""
    layers: list[nn.Module] = []
    width = hidden_dim
    for dim in dims:
        layers += [nn.Linear(width, dim), nn.ReLU()]
        width = dim
    return nn.Sequential(*layers, nn.Linear(width, num_pdfs))


def exit_shape(hidden_dim: int, k: int, head_width: int | None) -> dict:
    """The HybridDNN shape of the shallow exit after hidden layer k: its k hidden layers and its
    head's; a uniform width (no ``hidden_dims``) when the head is full-width."""
    dims = head_dims(hidden_dim, head_width)
    shape = {"num_hidden_layers": k + len(dims)}
    return shape if head_width is None else shape | {"hidden_dims": [hidden_dim] * k + dims}


register_model_kind("multi_exit", MultiExitDNN, marker="exits")
