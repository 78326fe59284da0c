"""The hybrid acoustic model: spliced fbank frames -> ReLU MLP -> logits over pdf-ids.

The paper's model sees 26 frames (20 left, the current one, 5 right) of 40 log-mel filterbanks
through 8 hidden layers of 2560 ReLUs; every size here comes from ``conf/model/*.yaml``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch
from torch import nn

from asrkd.stores import ConcatenatedFrames, FeatureStore, index_dtype


def resident(array: np.ndarray | ConcatenatedFrames, device: torch.device) -> np.ndarray | ConcatenatedFrames | torch.Tensor:
    """``array`` where batches are gathered from it: on the CPU a memory-mapped array (or stores
    read end to end) stays mapped (a batch reads its rows from the file, so it may be larger than
    memory); anything else is copied to ``device`` once (resident: a batch never leaves it)."""
    if isinstance(array, (np.memmap, ConcatenatedFrames)) and device.type == "cpu":
        return array
    return torch.from_numpy(np.require(np.asarray(array), requirements=["C", "W"])).to(device)


def gather(rows: np.ndarray | ConcatenatedFrames | torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``rows[indices]`` as a tensor, from a mapped array or a resident tensor (:func:`resident`): the same values either way."""
    if isinstance(rows, (np.ndarray, ConcatenatedFrames)):
        return torch.from_numpy(rows[indices.numpy()])
    return rows[indices]


class SplicedFrames:
    """Frames of a FeatureStore with their context windows, gathered in one indexing operation.

    ``context(indices)`` returns ``(B, left + 1 + right, dim)``: the window of every requested
    frame, clamped to its own utterance, so edge frames are padded by repetition and no window
    crosses into a neighbouring utterance. There is no per-frame Python: a batch is one gather.

    The frames are :func:`resident`: on the CPU a memory-mapped store stays mapped, so a store
    larger than memory trains and scores as well; on another device they are copied there. A
    frame's utterance is found by binary search over the offsets, so nothing held here grows
    with the frames but the frames themselves.
    """

    def __init__(self, store: FeatureStore, left: int, right: int, device: torch.device | str = "cpu"):
        self.store, self.left, self.right = store, left, right
        self.device = torch.device(device)
        self.frames = resident(store.frames, self.device)
        self.offsets = torch.from_numpy(store.offsets).to(device)
        self.ends = self.offsets[1:].contiguous()
        self.window = torch.arange(-left, right + 1, device=device)

    def context(self, indices: torch.Tensor) -> torch.Tensor:
        utt = torch.searchsorted(self.ends, indices.contiguous(), right=True)
        first, last = self.offsets[utt], self.offsets[utt + 1] - 1
        positions = torch.maximum(torch.minimum(indices[:, None] + self.window[None, :], last[:, None]), first[:, None])
        return gather(self.frames, positions).float()

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """The frames ``indices`` themselves (no context), as float32 on the host."""
        return gather(self.frames, torch.from_numpy(indices).to(self.device)).float().cpu().numpy()

    def frame_indices(self, utt_ids: list[str]) -> np.ndarray:
        """Global indices of all frames of ``utt_ids``: int32 below 2^31 frames (~6,000 h at 100 frames/s),
        so the index arrays of an epoch (its frames, their order) cost 4 bytes a frame."""
        spans = [self.store.span(u) for u in utt_ids]
        dtype = index_dtype(self.store.num_frames)
        return np.concatenate([np.arange(s, e, dtype=dtype) for s, e in spans]) if spans else np.zeros(0, dtype=dtype)


class HybridDNN(nn.Module):
    """MLP acoustic model with the input normalization (from training data) built in.

    ``init``: ``default`` keeps PyTorch's Linear initialization (uniform, variance 1/(3 fan-in)),
    under which each ReLU layer shrinks the signal's variance about sixfold: harmless at 4
    layers, a near-constant output at the start of the paper's 8x2560 stack, which then learns
    slowly. ``he`` draws the weights from N(0, 2/fan-in) (He et al. 2015: variance kept
    through ReLUs) with zero biases.

    ``hidden_dims``: each hidden layer's own width (``num_hidden_layers`` of them) instead of
    ``hidden_dim`` for all: a shallow exit with BYOT's bottleneck head written as a model of its
    own, or the plain model of that shape it is compared with."""

    def __init__(self, feat_dim: int, num_pdfs: int, left_context: int, right_context: int, num_hidden_layers: int, hidden_dim: int,
                 dropout: float = 0.0, init: str = "default", hidden_dims: list[int] | None = None):
        super().__init__()
        self.config = dict(feat_dim=feat_dim, num_pdfs=num_pdfs, left_context=left_context, right_context=right_context,
                           num_hidden_layers=num_hidden_layers, hidden_dim=hidden_dim, dropout=dropout)
        if init != "default":
            self.config["init"] = init  # recorded only when set: the default models' checkpoints stay as they were
        if hidden_dims is not None:
            hidden_dims = [int(w) for w in hidden_dims]
            if len(hidden_dims) != num_hidden_layers:
                raise ValueError(f"hidden_dims {hidden_dims}: one width per hidden layer, {num_hidden_layers} of them")
            self.config["hidden_dims"] = hidden_dims  # recorded only when set, as init
        self.register_buffer("feat_mean", torch.zeros(feat_dim))
        self.register_buffer("feat_inv_std", torch.ones(feat_dim))
        layers: list[nn.Module] = []
        width = feat_dim * (left_context + 1 + right_context)
        for hidden in hidden_dims or [hidden_dim] * num_hidden_layers:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_pdfs))
        self.layers = nn.Sequential(*layers)
        if init == "he":
            for layer in self.layers:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
        elif init != "default":
            raise ValueError(f"model.init must be default or he, got {init!r}")

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feat_inv_std.copy_(1.0 / torch.as_tensor(np.maximum(std, 1e-5), dtype=torch.float32))

    def forward(self, spliced: torch.Tensor) -> torch.Tensor:
        """(B, window, feat_dim) -> (B, num_pdfs) logits."""
        x = (spliced - self.feat_mean) * self.feat_inv_std
        return self.layers(x.flatten(1))

    @classmethod
    def from_config(cls, feat_dim: int, num_pdfs: int, model_cfg) -> "HybridDNN":
        return cls(**model_arguments(feat_dim, num_pdfs, model_cfg))


def model_arguments(feat_dim: int, num_pdfs: int, model_cfg) -> dict:
    """HybridDNN's constructor arguments for ``model_cfg`` (``model.*``): what a variant
    (:func:`model_from_config`) overrides, without building (and drawing the weights of) a model first."""
    return dict(feat_dim=feat_dim, num_pdfs=num_pdfs, left_context=model_cfg.left_context, right_context=model_cfg.right_context,
                num_hidden_layers=model_cfg.num_hidden_layers, hidden_dim=model_cfg.hidden_dim, dropout=model_cfg.dropout,
                init=model_cfg.get("init", "default"))


MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {}  # config["kind"] -> the class: a model kind an experiment brings
MARKERS: dict[str, str] = {}  # a config key -> the kind its presence names (checkpoints whose config has no "kind")


def register_model_kind(kind: str, build: Callable[..., nn.Module], marker: str | None = None) -> None:
    """Make checkpoints whose config says ``kind`` loadable: an experiment's own model (the image
    experiment's convolutional net, self-distillation's network with exits, the specialists'
    combination) registers here, when its module is imported; a ``marker`` key names the kind
    in a config without ``kind`` (``exits``, ``specialists``: their checkpoints always were so)."""
    MODEL_KINDS[kind] = build
    if marker is not None:
        MARKERS[marker] = kind


def model_from_config(config: dict) -> nn.Module:
    """The model a checkpoint's config describes: the registered kind it names (``MODEL_KINDS``,
    by ``kind`` or a marker key), else a HybridDNN."""
    kind = config.get("kind") or next((kind for marker, kind in MARKERS.items() if config.get(marker)), None)
    if kind:
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} is not known here (known: {', '.join(MODEL_KINDS) or 'none'}); "
                             "it is registered by the experiment that trains it: import that experiment first")
        return MODEL_KINDS[kind](**{k: v for k, v in config.items() if k != "kind"})
    unknown = sorted(set(config) - set(inspect.signature(HybridDNN).parameters))
    if unknown:  # a kind whose experiment is not imported here: its marker key is not known yet
        raise ValueError(f"a model config with {', '.join(unknown)} is no HybridDNN's: its model kind is registered by the "
                         f"experiment that trains it (known kinds: {', '.join(MODEL_KINDS) or 'none'}); import that experiment first")
    return HybridDNN(**config)


class StackedDNN(nn.Module):
    """Several HybridDNNs of one shape as stacked weights: each layer is one batched matmul
    (``baddbmm``) for all of them, so an ensemble trains (or a teacher scores) in one step
    instead of one model after another. ``forward`` returns (members, B, num_pdfs) logits;
    every member keeps its own initial weights, normalization and (elementwise) Adam state,
    so a step on the stack is the members' separate steps side by side. ``member(i)`` gives
    member i back as a HybridDNN (for evaluation, checkpoints and decoding).
    """

    def __init__(self, members: list[HybridDNN]):
        super().__init__()
        if not members or any(m.config != members[0].config for m in members):
            raise ValueError("a stack needs at least one member, all of one configuration")
        self.config, self.size = members[0].config, len(members)
        self.register_buffer("feat_mean", torch.stack([m.feat_mean for m in members]))
        self.register_buffer("feat_inv_std", torch.stack([m.feat_inv_std for m in members]))
        linears = [[layer for layer in m.layers if isinstance(layer, nn.Linear)] for m in members]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([ls[i].weight.detach().t() for ls in linears]).contiguous())
                                        for i in range(len(linears[0])))  # (members, in, out)
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([ls[i].bias.detach()[None] for ls in linears]))
                                       for i in range(len(linears[0])))  # (members, 1, out)

    def forward(self, spliced: torch.Tensor) -> torch.Tensor:
        """(B, window, feat_dim) -> (members, B, num_pdfs) logits."""
        x = (spliced[None] - self.feat_mean[:, None, None]) * self.feat_inv_std[:, None, None]
        h = x.flatten(2)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < last:
                h = nn.functional.dropout(torch.relu(h), self.config["dropout"], self.training)
        return h

    def member(self, i: int) -> HybridDNN:
        with torch.random.fork_rng(devices=[]):  # a copy must not move the training's random stream
            model = HybridDNN(**self.config).to(self.feat_mean.device)
        linears = [layer for layer in model.layers if isinstance(layer, nn.Linear)]
        with torch.no_grad():
            model.feat_mean.copy_(self.feat_mean[i])
            model.feat_inv_std.copy_(self.feat_inv_std[i])
            for linear, weight, bias in zip(linears, self.weights, self.biases):
                linear.weight.copy_(weight[i].t())
                linear.bias.copy_(bias[i, 0])
        return model.train(self.training)


class EnsembleDNN(nn.Module):
    """Members that score the same frames; the ensemble's prediction is their average softmax.

    ``forward`` returns log of the averaged probabilities, which are logits of that average
    (softmax of them gives it back), so frame accuracy, cross-entropy and the decoder's
    log-posteriors treat an ensemble exactly as one DNN.
    """

    def __init__(self, members: list[HybridDNN]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def member_logits(self, spliced: torch.Tensor, members: list[int] | None = None) -> torch.Tensor:
        """(members, B, num_pdfs) logits of every member (or of the members listed)."""
        chosen = self.members if members is None else [self.members[i] for i in members]
        return torch.stack([member(spliced).float() for member in chosen])

    def forward(self, spliced: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(self.member_logits(spliced), dim=-1)
        return torch.logsumexp(log_probs, dim=0) - float(np.log(len(self.members)))


def members_average(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(members, B, pdfs) -> (B, pdfs): the plain mean over members, or with ``weights``
    (members, B) each frame's weighted sum (a cross-fitted teacher's members per frame)."""
    return values.mean(0) if weights is None else (values * weights[..., None]).sum(0)


def average_softmax(member_logits: torch.Tensor, temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The members' average softmax(z/T): the ensemble's soft targets at temperature T."""
    return members_average(torch.softmax(member_logits / temperature, dim=-1), weights)


def average_zero_mean_logits(member_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The members' average zero-mean logits: what average_softmax tends to as T grows
    (softmax(z/T) ~ (1 + z/T) / N for zero-mean z), the teacher of logit matching."""
    return members_average(member_logits - member_logits.mean(-1, keepdim=True), weights)
