"""The hybrid acoustic model: spliced fbank frames -> ReLU MLP -> logits over pdf-ids.

The paper's model sees 26 frames (20 left, the current one, 5 right) of 40 log-mel filterbanks
through 8 hidden layers of 2560 ReLUs; every size here comes from ``conf/model/*.yaml``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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


MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {}  # config["kind"] -> the class: a model kind an experiment brings


def register_model_kind(kind: str, build: Callable[..., nn.Module]) -> None:
    """Make checkpoints whose config says ``kind`` loadable: an experiment's own model (the image
    experiment's convolutional net) registers here, when its module is imported."""
    MODEL_KINDS[kind] = build


def model_from_config(config: dict) -> nn.Module:
    """The model a checkpoint's config describes: the registered kind when it names one
    (``MODEL_KINDS``), a MultiExitDNN when it has exits, a SpecialistCombination when it has
    specialists, else a HybridDNN."""
    if config.get("kind"):
        if config["kind"] not in MODEL_KINDS:
            raise ValueError(f"model kind {config['kind']!r} is not known here (known: {', '.join(MODEL_KINDS) or 'none'}); "
                             "it is registered by the experiment that trains it: import that experiment first")
        return MODEL_KINDS[config["kind"]](**{k: v for k, v in config.items() if k != "kind"})
    if config.get("specialists"):
        return SpecialistCombination(config)
    return MultiExitDNN(**config) if config.get("exits") else HybridDNN(**config)


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
