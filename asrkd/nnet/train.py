"""Stage 4: train a hybrid DNN on the forced alignment (cross-entropy on pdf-ids).

The one training loop of the toolkit: the baseline, ensemble members, students and every
later model kind train through :func:`train_stage` / :func:`train_model`, differing in their
loss, their frames and their seeds only.

Held-out validation speakers (copies of their audio, ``sp0.9-...``, are held out with them),
seeded shuffles (seed + epoch), and two checkpoints: ``last.pt`` (the last complete epoch,
with optimizer and RNG state) and ``best.pt`` (the best validation epoch). A killed run resumes
from ``last.pt`` and ends bit for bit where an uninterrupted one does (on CPU). With
``train.patience``, ``train.epochs`` is a ceiling: training stops once the validation accuracy
has not beaten its best for that many epochs (early stopping; ``best.pt`` is its model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from asrkd import sections
from asrkd.errors import StageError
from asrkd.files import write_json
from asrkd.layout import System, names
from asrkd.nnet.checkpoints import read_checkpoint, save_checkpoint, save_model
from asrkd.nnet.model import HybridDNN, StackedDNN, model_arguments, model_from_config
from asrkd.nnet.training_set import FrameData, TrainingSet, epoch_order, evaluate_frames
from asrkd.nnet.views import View, ViewSpec, draw
from asrkd.parallel import all_reduce_sum, barrier, rank, world_size, wrap
from asrkd.progress import progress, trim_heap
from asrkd.stage import Stage, digest, plan

log = logging.getLogger(__name__)

# the config keys that decide a trained model (train.name says where it goes; threads and device do not change it)
TRAIN_KEYS = ("seed", "model", "train.data", "train.valid_fraction", "train.epochs", "train.batch_size", "train.lr",
              "train.weight_decay", "train.lr_decay", "train.bf16_autocast", "train.max_frames_per_epoch",
              "train.accuracy_sample_frames")
REPLICATE_SEED_STRIDE = 100  # replicate r of a model trains with seed + 100 r (r = 0 is the model itself)


class TrainingDiverged(StageError):
    """The loss became NaN or infinite."""


class LearnedNothing(StageError):
    """Training had no frames, or ended no better than where it started."""


def check_learned(label: str, history: list[dict], initial_accuracy: float) -> None:
    """Refuse a model that learned nothing, so that its stage fails and keeps the old output (a
    redo's old model goes back in place) instead of replacing a trained model with it: its best
    validation accuracy must beat the accuracy of its weights before the first step (a learning
    rate so small the weights do not move, a network too narrow to carry anything)."""
    best = max(h["valid_frame_accuracy"] for h in history)
    if best <= initial_accuracy:
        raise LearnedNothing(
            f"{label}: learned nothing: its best validation frame accuracy {best:.4f} is no better than before training "
            f"({initial_accuracy:.4f}); check train.lr, train.epochs, model.hidden_dim, model.num_hidden_layers and the alignment "
            "(the old output, if any, is kept)")


def replicate_name(name: str, replicate: int) -> str:
    """``baseline`` for replicate 0, ``baseline_seed<r>`` for the others."""
    return name if replicate == 0 else f"{name}_seed{replicate}"


def replicate_systems(tcfg, role: str = "baseline") -> list[System]:
    """The systems train-dnn makes with the ``train`` section: ``train.seeds`` replicates of ``train.name`` on ``train.data``."""
    return [System(replicate_name(tcfg.name, r), role, data=str(tcfg.data), seed=r) for r in range(int(tcfg.seeds))]


def replicates(tcfg) -> list[str]:
    """The names of :func:`replicate_systems` (``tcfg``: the ``train`` section)."""
    return names(replicate_systems(tcfg))


LossFn = Callable[..., torch.Tensor]  # (logits, frame indices) -> loss; trained on views: (logits, frame indices, View) -> loss


def model_seed(seed: int, replicate: int) -> int:
    """Replicate ``replicate``'s seed of its weights, frame order and dropout (``seed``: the config's)."""
    return int(seed) + REPLICATE_SEED_STRIDE * replicate


@dataclass(frozen=True)
class TrainSections:
    """What the training loop reads of the config: the ``train`` and ``model`` sections, ``seed``,
    ``eval.batch_size``, and the epochs (``train.epochs``, or a student's ``distill.epochs``)."""

    train: Any
    model: Any
    seed: int
    eval_batch_size: int
    epochs: int

    @classmethod
    def of(cls, cfg, epochs: int | None = None) -> "TrainSections":
        """``cfg``'s, with ``epochs`` in place of ``train.epochs`` when given."""
        return cls(cfg.train, cfg.model, int(cfg.seed), int(cfg.eval.batch_size), int(cfg.train.epochs if epochs is None else epochs))


def learning_rate(tcfg) -> float:
    """``train.lr`` at ``train.batch_size`` under ``train.lr_scaling``: the rate given is for
    ``train.lr_reference_batch`` frames; ``linear`` scales it with the batch (Goyal et al. 2017,
    for SGD; with warm-up), ``sqrt`` with its square root (the usual rule for Adam), ``none``
    keeps it."""
    ratio = int(tcfg.batch_size) / int(tcfg.lr_reference_batch)
    rule = str(tcfg.lr_scaling)
    if rule not in ("none", "linear", "sqrt"):
        raise ValueError(f"train.lr_scaling must be none, linear or sqrt, got {rule!r}")
    return float(tcfg.lr) * {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[rule]


FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch.optim.Adam(fused=True) runs


def fused_adam(tcfg, device: torch.device) -> bool:
    """Whether the optimizer is PyTorch's fused Adam (one kernel for every parameter): on a GPU, and
    under bf16 autocast on a CPU, where it makes 8x2560 a quarter faster
    (results/bench/train_throughput_cpu_paper_bf16.json). It is the same update in another order,
    so its last bits differ (3e-8 after 50 steps of a small net): fp32 training on a CPU keeps the
    per-tensor loop, and its committed results reproduce bit for bit."""
    return device.type == "cuda" or (bool(tcfg.bf16_autocast) and device.type in FUSED_ADAM_DEVICES)


class TrainStep:
    """One optimizer step on a batch of frame indices, everything on the model's device: the
    windows are gathered there, the loss stays there (no host sync per step), bf16 autocast
    and ``torch.compile`` are options. The trainer's loop and the throughput benchmark run
    this same step. ``net`` is a HybridDNN, or a StackedDNN whose members' losses are summed
    (each member's gradient is then its own loss's). Under torchrun every rank takes its
    slice of the global batch and the loss is scaled so DDP's average of the gradients is the
    gradient of the global batch's mean. With ``views`` (asrkd.nnet.views), each batch is seen
    through a view drawn for its step, and the loss is given it: ``loss_fn(logits, batch, view)``
    (the default loss is then the view's cross-entropy, mixed labels under mixup). The data's
    own ``augment`` (images: jitter) comes first and is such a view too, so a teacher on the
    fly can score what the model saw."""

    def __init__(self, train, net: torch.nn.Module, data: FrameData, loss_fn: LossFn | None, hard: torch.Tensor,
                 views: ViewSpec | None = None):
        """``train``: the ``train`` section (the optimizer, autocast, compile, warm-up, max-norm)."""
        self.data, self.loss_fn, self.hard = data, loss_fn, hard
        self.views = views if views is not None and views.active else None
        self.stacked = isinstance(net, StackedDNN)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate(train), weight_decay=train.weight_decay,
                                          fused=fused_adam(train, hard.device))
        self.forward = wrap(net)
        if train.compile:
            self.forward = torch.compile(self.forward, backend=str(train.compile))
        self.rank, self.world = rank(), world_size()
        self.autocast = dict(device_type=hard.device.type, dtype=torch.bfloat16, enabled=bool(train.bf16_autocast))
        self.warmup = int(train.warmup_steps)
        self.max_norm = train.get("max_norm")
        self.constrained = hidden_weights(net) if self.max_norm else []

    def __call__(self, batch: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Train on ``batch`` (global frame indices); returns each model's loss summed over this
        rank's frames (float64, detached, on the device). ``step`` (counted from the start of
        training) drives the learning-rate warm-up."""
        if self.world > 1:
            local = torch.tensor_split(batch, self.world)[self.rank]
            scale = len(local) * self.world / len(batch)
            batch = local
        with torch.autocast(**self.autocast):
            inputs = self.data.frames.context(batch)
            if self.data.augment:  # the data's own augmentation (images: jitter), seen by the loss as a view
                inputs = self.data.augment(inputs)
            view = draw(self.views, inputs, step) if self.views else (View(inputs) if self.data.augment else None)
            logits = self.forward(view.inputs if view else inputs)
        member_logits = logits if self.stacked else [logits]  # a model with exits (self-distillation's) gives one per exit
        losses = [self.loss(z, batch, view) for z in member_logits]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        if step < self.warmup:
            for group in self.optimizer.param_groups:
                group["lr"] *= (step + 1) / self.warmup
        self.optimizer.zero_grad(set_to_none=True)
        (loss * scale if self.world > 1 else loss).backward()
        self.optimizer.step()
        if self.constrained:
            with torch.no_grad():
                for weight, dim in self.constrained:  # every hidden unit's incoming weights at most max_norm long
                    weight.mul_(torch.clamp(float(self.max_norm) / weight.norm(dim=dim, keepdim=True).clamp_min(1e-12), max=1.0))
        for group, lr in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = lr
        return torch.stack(losses).detach().double() * len(batch)

    def loss(self, logits: torch.Tensor, batch: torch.Tensor, view: View | None) -> torch.Tensor:
        if view is not None:
            return self.loss_fn(logits, batch, view) if self.loss_fn else view.hard_cross_entropy(logits, self.hard[batch])
        return self.loss_fn(logits, batch) if self.loss_fn else F.cross_entropy(logits.float(), self.hard[batch].long())


def hidden_weights(net: torch.nn.Module) -> list[tuple[torch.Tensor, int]]:
    """The weight of every hidden layer with the dimension of a unit's incoming weights: what
    ``train.max_norm`` constrains (Srivastava et al. 2014; the paper's big MNIST net)."""
    if isinstance(net, StackedDNN):
        return [(weight, 1) for weight in list(net.weights)[:-1]]  # (members, in, out)
    linears = [layer for layer in net.layers if isinstance(layer, torch.nn.Linear)]
    return [(layer.weight, 1) for layer in linears[:-1]]  # (out, in)


def new_models(model_options, seed: int, data: FrameData, train_idx: np.ndarray, seeds: list[int],
               network: dict | None = None) -> torch.nn.Module:
    """Freshly initialized models, one per weight seed of ``seeds``, with the input normalization of
    the training frames (a sample drawn with ``seed``): a HybridDNN of ``model_options`` (the ``model`` section) for one seed (``network``: its constructor
    arguments that differ, e.g. exits, which make it self-distillation's model with exits), a StackedDNN of them for several."""
    device = data.pdf_ids.device
    if data.normalize_inputs:
        sample = np.random.default_rng(seed).choice(train_idx, size=min(len(train_idx), 100_000), replace=False)
        sample_frames = data.frames.rows(np.sort(sample))
        trim_heap()  # the draw permuted every training frame's index (8 bytes a frame): handed back, not kept
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = model_from_config(model_arguments(data.frames.store.dim, data.num_pdfs, model_options) | (network or {}))
        model = model.to(device)
        if data.normalize_inputs:
            model.set_normalization(sample_frames.mean(0), sample_frames.std(0))
        models.append(model)
    return models[0] if len(models) == 1 else StackedDNN(models)


def train_model(
    loop: TrainSections, data: FrameData, train_idx: np.ndarray, valid_idx: np.ndarray, out_dirs: list[Path], loss_fn: LossFn | None = None,
    init_seeds: list[int | None] | None = None, replicate: int = 0, fingerprint: str = "", hard: torch.Tensor | None = None,
    network: dict | None = None, initial: HybridDNN | None = None, targets: torch.Tensor | None = None,
    views: ViewSpec | None = None,
) -> list[list[dict]]:
    """Train one model per ``out_dirs`` entry, keeping ``last.pt`` (resume point) and each
    model's ``best.pt``; returns each model's per-epoch history.

    The loss is cross-entropy on ``hard`` (pdf-ids; the alignment unless given) unless
    ``loss_fn`` is given (a student's). ``init_seeds`` seed only the initial weights (ensemble
    members differ in them alone); otherwise replicate r uses seed + 100 r for the weights, the
    frame order and dropout. Several models train fused, as one StackedDNN on the same frame
    order (their ``last.pt`` is the first one's). A ``last.pt`` of the same ``fingerprint`` is
    resumed from. Under torchrun, rank 0 alone evaluates and writes. ``network``: the fresh model's
    constructor arguments that differ from the ``model`` section (:func:`new_models`). ``initial`` is a model to
    start from instead of fresh weights (a specialist starts from the generalist); ``targets``
    are the classes validation accuracy is measured against (default: the pdf-ids). ``views``:
    what each training batch is seen through (TrainStep).
    """
    tcfg = loop.train
    device = data.pdf_ids.device
    hard = data.pdf_ids if hard is None else hard
    if len(train_idx) == 0 or len(valid_idx) == 0:
        which = "training" if len(train_idx) == 0 else "validation"
        raise LearnedNothing(f"{out_dirs[0]}: no {which} frames: train.data={tcfg.data} with train.valid_fraction={tcfg.valid_fraction} "
                             f"leaves {len(train_idx)} training and {len(valid_idx)} validation frames; check both (and the alignment)")
    seed = model_seed(loop.seed, replicate)
    init_seeds = init_seeds or [None] * len(out_dirs)
    if initial is not None:
        torch.manual_seed(seed)  # dropout's stream, as for fresh weights
        net = initial.to(device)
    else:
        net = new_models(loop.model, loop.seed, data, train_idx, [seed if s is None else s for s in init_seeds], network)
    model_of = (lambda i: net.member(i)) if isinstance(net, StackedDNN) else (lambda i: net)  # model i, as a HybridDNN
    step_fn = TrainStep(tcfg, net, data, loss_fn, hard, views)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(step_fn.optimizer, gamma=tcfg.lr_decay)
    histories: list[list[dict]] = [[] for _ in out_dirs]
    writer = rank() == 0
    for out_dir in out_dirs:
        out_dir.mkdir(parents=True, exist_ok=True)
    last_path = out_dirs[0] / "last.pt"
    state = read_checkpoint(last_path, device, fingerprint)
    initial_accuracy = (state or {}).get("initial_accuracy")  # each model's validation accuracy before its first step
    if initial_accuracy is None and writer:
        initial_accuracy = [evaluate_frames(model_of(i), data, valid_idx, loop.eval_batch_size, targets)["frame_accuracy"]
                            for i in range(len(out_dirs))]
    if state is not None:
        net.load_state_dict(state["model"])
        step_fn.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])  # dropout continues as if never interrupted
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        histories = state["history"] if len(out_dirs) > 1 else [state["history"]]
        log.info("resuming %s after epoch %d", out_dirs[0], histories[0][-1]["epoch"])

    # training-set accuracy per epoch (the over-fitting curve) on a fixed sample of the labeled training frames
    labeled = train_idx[hard[torch.from_numpy(train_idx).to(device)].cpu().numpy() >= 0]
    train_sample = np.sort(np.random.default_rng(loop.seed).permutation(labeled)[: int(tcfg.accuracy_sample_frames)])
    label = out_dirs[0].name if len(out_dirs) == 1 else f"{out_dirs[0].parent.name} ({len(out_dirs)} fused)"
    steps_per_epoch = -(-min(len(train_idx), int(tcfg.max_frames_per_epoch or len(train_idx))) // tcfg.batch_size)
    for epoch in range(len(histories[0]), loop.epochs):
        if patient_enough(histories, tcfg.get("patience"), writer, device):  # checked first: a resumed run may have stopped
            log.info("%s: no better validation accuracy for %d epochs, stopped after epoch %d (train.patience)", label,
                     int(tcfg.patience), epoch - 1)
            break
        tic = time.time()
        net.train()
        order = epoch_order(train_idx, np.random.default_rng([seed, epoch]), tcfg.get("shuffle_block_frames"))
        if tcfg.max_frames_per_epoch:
            order = order[: int(tcfg.max_frames_per_epoch)]
        order = torch.from_numpy(order).to(device)  # one copy per epoch; batches are slices of it on the device
        total_loss = torch.zeros(len(out_dirs), dtype=torch.float64, device=device)
        first_bad = torch.tensor(-1, device=device)  # the first batch whose loss was not finite (found without a sync per step)
        batches = range(0, len(order), tcfg.batch_size)
        for step, start in enumerate(progress(batches, f"{label} epoch {epoch}", unit="frames", scale=tcfg.batch_size)):
            loss = step_fn(order[start : start + tcfg.batch_size], epoch * steps_per_epoch + step)
            total_loss += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss).all(), step, first_bad)
        seen = len(order)
        losses = (all_reduce_sum(total_loss) / max(seen, 1)).tolist()  # the one host sync of the epoch
        if int(first_bad) >= 0 or not np.isfinite(losses).all():
            raise TrainingDiverged(f"{out_dirs[0]}: the loss is nan at epoch {epoch}, batch {int(first_bad)}; lower train.lr, "
                                   "or check the features and targets (the last complete epoch is kept in last.pt)")
        scheduler.step()
        seconds = time.time() - tic
        if not writer:
            continue
        for i, (out_dir, history, value) in enumerate(zip(out_dirs, histories, losses)):
            model = model_of(i)
            valid = evaluate_frames(model, data, valid_idx, loop.eval_batch_size, targets)
            train_acc = evaluate_frames(model, data, train_sample, loop.eval_batch_size, targets)["frame_accuracy"] if len(train_sample) else None
            record = {"epoch": epoch, "train_cross_entropy": value, "train_frame_accuracy": train_acc,
                      "valid_frame_accuracy": valid["frame_accuracy"], "valid_cross_entropy": valid["cross_entropy"],
                      "frames_per_second": seen * len(out_dirs) / seconds, "seconds": seconds / len(out_dirs)}
            if not np.isfinite(record["valid_cross_entropy"]):
                raise TrainingDiverged(f"{out_dir}: the validation cross-entropy is {record['valid_cross_entropy']} at epoch {epoch}; "
                                       "lower train.lr, or check the features and targets")
            history.append(record)
            left = loop.epochs - epoch - 1  # the ceiling: early stopping (train.patience) may end sooner
            log.info("%s epoch %d: train loss %.3f, valid acc %.4f CE %.3f, %.0f frames/s; at most %d epochs left, %.1f h at this pace",
                     out_dir.name, epoch, value, valid["frame_accuracy"], valid["cross_entropy"], record["frames_per_second"], left,
                     left * (time.time() - tic) / 3600)
            if record["valid_frame_accuracy"] > max((h["valid_frame_accuracy"] for h in history[:-1]), default=-1.0):
                save_model(out_dir / "best.pt", model, epoch)  # early stopping's model: system "<name>@best"
            if tcfg.keep_epoch_checkpoints:
                save_model(out_dir / f"epoch-{epoch}.pt", model, epoch)
        rng_state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        save_checkpoint(last_path, {"model": net.state_dict(), "optimizer": step_fn.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "history": histories if len(out_dirs) > 1 else histories[0], "rng": rng_state, "fingerprint": fingerprint,
                                    "initial_accuracy": initial_accuracy})
    if writer:
        for out_dir, history, before in zip(out_dirs, histories, initial_accuracy):
            check_learned(str(out_dir), history, before)
        for i, (out_dir, history) in enumerate(zip(out_dirs, histories)):
            save_model(out_dir / "final.pt", model_of(i), len(history) - 1)
            write_json(out_dir / "history.json", history)
        if not tcfg.keep_last_checkpoint:
            last_path.unlink(missing_ok=True)  # optimizer state: 2x the model, needed only to resume
    return histories


def epochs_since_best(history: list[dict]) -> int:
    """Epochs since the best validation accuracy of ``history`` (0: the last epoch is the best)."""
    accuracies = [h["valid_frame_accuracy"] for h in history]
    return len(accuracies) - 1 - int(np.argmax(accuracies)) if accuracies else 0


def patient_enough(histories: list[list[dict]], patience: int | None, writer: bool, device: torch.device) -> bool:
    """Whether early stopping ends training now: every model has gone ``patience`` epochs
    without beating its best validation accuracy (decided where the validation ran, rank 0,
    and shared with every rank)."""
    if not patience:
        return False
    stop = writer and all(epochs_since_best(history) >= int(patience) for history in histories)
    return bool(all_reduce_sum(torch.tensor([float(stop)], dtype=torch.float64, device=device)).item() > 0)


# keys that decide a model only when set away from their default: recorded then, so models
# trained before the keys existed keep their fingerprints
TRAIN_OPTIONAL_KEYS = {"train.lr_scaling": "none", "train.warmup_steps": 0, "train.max_norm": None, "train.patience": None,
                       "train.shuffle_block_frames": None}


@dataclass
class Model:
    """One model a training stage makes: its stage name, directory, seeds and recorded values."""

    stage_name: str
    out_dir: Path
    replicate: int = 0
    init_seed: int | None = None
    values: dict | None = None
    network: dict | None = None  # its constructor arguments that differ from cfg.model (exits: self-distillation's model with exits)
    initial: Callable[[], HybridDNN] | None = None  # the weights it starts from (default: fresh, seeded)
    frames: Callable[[FrameData, np.ndarray, np.ndarray, torch.Tensor], "ModelFrames"] | None = None  # its own frames and classes
    views: ViewSpec | None = None  # what its training batches are seen through (asrkd.nnet.views); recorded when active


class ModelFrames(NamedTuple):
    """What a model trains and validates on when not the training set's frames and pdf-ids (a
    specialist: its group's frames and random ones, its group's classes and a dustbin)."""

    train_idx: np.ndarray
    valid_idx: np.ndarray
    hard: torch.Tensor  # the training class of every frame (-1: none)
    targets: torch.Tensor | None  # the class of every frame validation accuracy is measured against (None: the pdf-ids)


def train_stage(
    cfg, models: list[Model], training: TrainingSet, *, loss: Callable[[FrameData, torch.Tensor], LossFn] | None = None,
    keys: tuple[str, ...] = (), inputs: dict[str, Path] | None = None, fused: bool = False, epochs: int | None = None,
) -> None:
    """Plan, train and record ``models``: each fingerprint holds TRAIN_KEYS + ``keys``, the training
    set's inputs + ``inputs``, the seeds and the model's values. ``loss(frames, hard targets)``
    makes the loss function (default: cross-entropy on the hard targets). With ``fused``, the
    models still to train train together as one stack (same replicate: same frame order).
    ``epochs`` (a student's ``distill.epochs``) replaces ``train.epochs``, in the fingerprint too."""
    loop = TrainSections.of(cfg, epochs)
    settings = sections.settings(cfg, TRAIN_KEYS + keys)
    settings = replace(settings, values={**settings.values, "train.epochs": loop.epochs}) if epochs is not None else settings
    optional = sections.optional_values(cfg, TRAIN_OPTIONAL_KEYS)
    if optional.get("train.lr_scaling"):
        optional["train.lr_reference_batch"] = int(cfg.train.lr_reference_batch)

    def plan_models() -> list[Stage]:
        return [plan(m.stage_name, m.out_dir, settings, {**training.inputs, **(inputs or {})},
                     {"replicate": m.replicate, "init_seed": m.init_seed, **optional, **(m.values or {}),
                      **({"views": asdict(m.views)} if m.views is not None and m.views.active else {})}, writer=rank() == 0)
                for m in models]

    # rank 0 decides and writes the plan first; the other ranks decide after it, on a directory no
    # longer being written (before, a rank could see rank 0's record half-written and refuse the directory)
    stages = plan_models() if rank() == 0 else []
    barrier()
    if rank() != 0:
        stages = plan_models()
    todo = [(m, stage) for m, stage in zip(models, stages) if not stage.up_to_date]
    if not todo:
        return
    data, train_idx, valid_idx, hard = training.load()
    groups = [todo] if fused and len(todo) > 1 else [[job] for job in todo]
    for group in groups:
        replicates_ = {m.replicate for m, _ in group}
        if len(replicates_) > 1:
            raise ValueError(f"fused models must share their replicate (frame order), got {sorted(replicates_)}")
        fingerprint = group[0][1].fingerprint if len(group) == 1 else digest([stage.fingerprint for _, stage in group])
        first = group[0][0]
        if len(group) > 1 and any(m.network or m.initial or m.frames or m.views for m, _ in group):
            raise ValueError("models with exits, initial weights, frames or views of their own train one at a time (no fused stack of them)")
        own = first.frames(data, train_idx, valid_idx, hard) if first.frames else ModelFrames(train_idx, valid_idx, hard, None)
        histories = train_model(loop, data, own.train_idx, own.valid_idx, [m.out_dir for m, _ in group],
                                loss(data, own.hard) if loss else None, [m.init_seed for m, _ in group], first.replicate, fingerprint,
                                own.hard, first.network, first.initial() if first.initial else None, own.targets, first.views)
        if rank() == 0:
            for (_, stage), history in zip(group, histories):
                best = max(range(len(history)), key=lambda e: history[e]["valid_frame_accuracy"])
                stage.commit(epochs=len(history), best_epoch=best, seconds=sum(h["seconds"] for h in history),
                             **({"fused": len(group)} if len(group) > 1 else {}))
        barrier()


def run(cfg) -> None:
    """Stage 4: ``train.seeds`` replicates of the DNN ``train.name`` (replicate r > 0: ``<name>_seed<r>``)."""
    training = TrainingSet(cfg)
    for replicate, name in enumerate(replicates(cfg.train)):
        train_stage(cfg, [Model(f"train-dnn {name}", sections.layout(cfg).model(name), replicate)], training)
