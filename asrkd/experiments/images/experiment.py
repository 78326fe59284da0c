"""The paper's preliminary image experiment (Hinton, Vinyals & Dean 2015, §3), on MNIST or Fashion-MNIST.

Images go through the speech models' machinery: each image is an "utterance" of one frame of
784 pixels (scaled to [0, 1]) in a FeatureStore, its class the "pdf-id", so the nets are
HybridDNNs without context and train through the one training loop with the students' loss.

Stages (``recipes/mnist/run.sh``):

0. ``prepare-images``: the four IDX files of ``images.dataset`` from ``images.corpus_dir``
   (downloaded there first from ``images.download_url`` or the dataset's canonical source when
   they are missing), checked, into ``exp/images`` (train images then test images, and labels).
   The last ``images.valid_images`` training images are held out: early stopping and every
   bias shift are chosen on them, never on the test set.
1. ``train-image-nets``: ``images.seeds`` small nets trained alone on the labels,
   unregularized; the big-net candidates, one seed each: ``images.big`` (the paper's:
   dropout on the hidden units and the inputs, inputs jittered by up to ``images.big.jitter``
   pixels, every hidden unit's incoming weights max-norm constrained) and each of
   ``images.big_variants`` (some of those settings changed); then the other seeds of the
   candidate with the fewest held-out errors, the teacher. The paper's regularizers were tuned for MNIST's digits; which
   suits another set is chosen on its held-out images, never on the test set.
2. ``train-image-students``: small nets trained on a big net's soft targets at T
   (``T^2 CE(soft) + distill.hard_weight CE(labels)``): the distilled small net's seeds (seed r
   taught by big net r; with ``images.teacher: ensemble`` every student is taught by the big
   seeds' average softmax(z/T), and the report's teacher row is that ensemble), the function-matching row (``images.function_matching``: the big net
   run on the fly on the student's own jittered view, a long schedule) with its control (the
   small net on the labels of the same views), and, taught by big net 0 (or the ensemble), every T of
   ``images.temperatures`` at every width of ``images.widths`` (the paper's T against width),
   the class ``images.left_out_class`` left out of the transfer set, and only the classes of
   ``images.kept_classes`` in it.
3. ``report-images``: errors on the 10,000 test images (counts, with bootstrap intervals over
   test images and seeds), the gap closed, the bias corrections (the left-out class's bias
   raised, the kept classes' lowered, by the shift of ``images.bias_shifts`` that makes the
   fewest held-out errors), the T-against-width table, the big nets compared, every net's
   training curves, and the paper's MNIST numbers beside them: ``results/<dataset>/report.{json,md}``
   and PNGs.

Every net trains until its held-out errors have not improved for ``images.patience`` epochs
(``train.patience``; the configured epochs are a ceiling) and is scored, and teaches, at that
best held-out epoch (its ``best.pt``). The big net's soft targets for the stored-target
students are its logits on every image, computed once per student (70,000 x 10 values) and
turned into softmax(z/T) per batch.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.distill.losses import distillation_loss
from asrkd.distill.student import TeacherOnTheFly
from asrkd.experiments.base import Experiment
from asrkd.files import atomic_write, save_npy
from asrkd.layout import Layout
from asrkd.nnet.model import HybridDNN, SplicedFrames, average_softmax, register_model_kind
from asrkd.nnet.train import (FrameData, Model, ModelFrames, load_model, model_path, predict_logits, read_history,
                              replicate_name, train_stage)
from asrkd.nnet.views import View
from asrkd.parallel import pick_device
from asrkd.report import machine, publish_corpus_report, recipe_command, saved_figure
from asrkd.schema import COUNT, NONNEGATIVE, POSITIVE, ConfigTypes, Kind, Range
from asrkd.stage import plan, read_record
from asrkd.stats import Bootstrap, UtteranceCounts, format_interval
from asrkd.stores import FeatureStore, load_array

log = logging.getLogger(__name__)

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CANONICAL_URLS = {"mnist": "http://yann.lecun.com/exdb/mnist/",
                  "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
SIDE = 28
CLASSES = 10
# The paper's MNIST results (§3), shown beside ours as reference: test errors of 10,000.
PAPER_MNIST = {"big": 67, "small_alone": 146, "small_distilled": 74, "left_out": 206, "left_out_on_class": 133,
               "left_out_corrected": 109, "left_out_corrected_on_class": 14, "kept_only_percent": 47.3, "kept_only_corrected_percent": 13.2}


# ----------------------------------------------------------------------------- stage 0: the images


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (MNIST's format), gzipped or not: magic 0x0000 + type 0x08 (uint8) + dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}); download it again")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes), the file holds {body.size}; it is cut short: download it again")
    return body.reshape(shape)


def idx_path(corpus: Path, key: str) -> Path | None:
    """The IDX file of ``key`` in ``corpus``, gzipped or not (None when absent)."""
    for name in (IDX_FILES[key] + ".gz", IDX_FILES[key]):
        if (corpus / name).is_file():
            return corpus / name
    return None


def download(url: str, corpus: Path) -> None:
    """The four gzipped IDX files from ``url`` into ``corpus`` (each written whole or not at all)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_FILES.items():
        if idx_path(corpus, key) is not None:
            continue
        source = url.rstrip("/") + f"/{name}.gz"
        log.info("downloading %s", source)
        try:
            with urllib.request.urlopen(source, timeout=60) as response, atomic_write(corpus / f"{name}.gz") as tmp:
                tmp.write_bytes(response.read())
        except OSError as err:
            raise FileNotFoundError(f"{source}: download failed ({err}); put the four IDX files ({', '.join(IDX_FILES.values())}, "
                                    f"gzipped or not) in {corpus} yourself, or set images.download_url to a mirror") from None


def corpus_dir(icfg) -> Path:
    """``images.corpus_dir``, with the files downloaded when they are missing."""
    corpus = Path(icfg.corpus_dir)
    if any(idx_path(corpus, key) is None for key in IDX_FILES):
        url = icfg.download_url or CANONICAL_URLS.get(str(icfg.dataset))
        if url is None:
            raise FileNotFoundError(f"{corpus}: missing IDX files of {icfg.dataset} and no images.download_url to fetch them from")
        download(str(url), corpus)
    return corpus


def images_dir(exp_dir) -> Path:
    return Path(exp_dir) / "images"


def run_prepare(cfg) -> None:
    """Stage 0: the IDX files, checked, as one FeatureStore of train then test images and their labels."""
    corpus = corpus_dir(cfg.images)
    paths = {key: idx_path(corpus, key) for key in IDX_FILES}
    arrays = {key: read_idx(path) for key, path in paths.items()}  # checked before the stage may clear a good run's images
    parts = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
            raise ValueError(f"{paths[f'{split}_images']}: images of shape {images.shape[1:]}, expected {SIDE}x{SIDE}")
        if len(images) != len(labels):
            raise ValueError(f"{paths[f'{split}_labels']}: {len(labels)} labels for {len(images)} images; the files belong to different sets")
        if labels.max(initial=0) >= CLASSES:
            raise ValueError(f"{paths[f'{split}_labels']}: labels above {CLASSES - 1} ({int(labels.max())}); not a 10-class set")
        parts.append((split, images, labels))
    checksums = {key: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for key, path in paths.items()}
    stage = plan("prepare-images", images_dir(cfg.exp_dir), sections.settings(cfg, ("images.dataset",)), values={"idx_checksums": checksums})
    if stage.up_to_date:
        return
    utt_ids = [f"{split}-{i:05d}" for split, images, _ in parts for i in range(len(images))]
    frames = np.concatenate([images.reshape(len(images), -1) for _, images, _ in parts]).astype(np.float32) / 255.0
    FeatureStore(utt_ids, np.arange(len(utt_ids) + 1, dtype=np.int64), frames).save(stage.out_dir / "store")
    save_npy(stage.out_dir / "labels.npy", np.concatenate([labels for _, _, labels in parts]).astype(np.int64))
    counts = {split: len(images) for split, images, _ in parts}
    stage.commit(**counts)
    log.info("%s: %d training and %d test images", cfg.images.dataset, counts["train"], counts["test"])


# ----------------------------------------------------------------------------- the training set


def jitter(max_shift: int, input_dropout: float):
    """Training inputs moved by up to ``max_shift`` pixels each way (the vacated border black),
    then input dropout: the big net's regularization."""

    def augment(inputs: torch.Tensor) -> torch.Tensor:
        count = inputs.shape[0]
        images = torch.nn.functional.pad(inputs.reshape(count, SIDE, SIDE), (max_shift,) * 4)
        shift = torch.randint(0, 2 * max_shift + 1, (2, count), device=inputs.device)
        span = torch.arange(SIDE, device=inputs.device)
        rows, cols = shift[0][:, None] + span, shift[1][:, None] + span
        moved = images[torch.arange(count, device=inputs.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return torch.nn.functional.dropout(moved, input_dropout, training=True).reshape(inputs.shape)

    return augment


class ImageSet:
    """The images as a training set (what :func:`asrkd.nnet.train.train_stage` takes): the
    training images but the held-out ones, those (validation), the test images (never trained
    on), and labels as the frames' classes."""

    def __init__(self, cfg, augment=None):
        self.cfg, self.augment = cfg, augment
        self.inputs = {"images": images_dir(cfg.exp_dir)}
        self._loaded = None

    def with_augment(self, augment) -> "ImageSet":
        """The same images (loaded once) whose training batches pass through ``augment``."""
        view = copy.copy(self)
        view.augment = augment
        return view

    def split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(training, held-out, test) image indices."""
        summary = read_record(images_dir(self.cfg.exp_dir))["summary"]
        train, test = int(summary["train"]), int(summary["test"])
        held_out = int(self.cfg.images.valid_images)
        if not 0 < held_out < train:
            raise ValueError(f"images.valid_images={held_out}: must be between 1 and the {train} training images")
        return np.arange(train - held_out), np.arange(train - held_out, train), np.arange(train, train + test)

    def load(self):
        if self._loaded is None:
            torch.set_num_threads(int(self.cfg.train.num_threads))
            device = pick_device(self.cfg.train.device)
            store = FeatureStore.load(images_dir(self.cfg.exp_dir) / "store", mmap=False)
            labels = torch.from_numpy(load_array(images_dir(self.cfg.exp_dir) / "labels.npy", False, "prepare-images")).to(device)
            data = FrameData(SplicedFrames(store, 0, 0, device), labels, CLASSES, normalize_inputs=False)
            train_idx, valid_idx, _ = self.split()
            hard = torch.full_like(labels, -1)
            hard[torch.from_numpy(train_idx).to(device)] = labels[torch.from_numpy(train_idx).to(device)]
            self._loaded = (data, train_idx, valid_idx, hard)
        data, train_idx, valid_idx, hard = self._loaded
        return (dataclasses.replace(data, augment=self.augment) if self.augment else data), train_idx, valid_idx, hard


# ----------------------------------------------------------------------------- the nets


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


def net_config(cfg, width: int, layers: int, dropout: float, schedule, max_norm: float | None = None):
    """The run config of one net: a context-free HybridDNN of ``layers`` x ``width``, the images'
    optimizer, and ``schedule``'s ceiling of epochs, per-epoch decay and patience (each
    defaulting to ``images.*``): every net stops once its held-out errors stop improving."""
    icfg = cfg.images
    return OmegaConf.merge(cfg, {"model": {"left_context": 0, "right_context": 0, "num_hidden_layers": layers, "hidden_dim": width,
                                           "dropout": dropout},
                                 "train": {"epochs": int(schedule.epochs), "batch_size": icfg.batch_size, "lr": icfg.lr,
                                           "lr_decay": float(schedule.get("lr_decay") or icfg.lr_decay),
                                           "patience": int(schedule.get("patience") or icfg.patience), "max_norm": max_norm,
                                           "accuracy_sample_frames": 5000}})


def big_config(cfg, settings: dict):
    """The run config of a big net of ``settings`` (``images.big`` or one of its variants)."""
    big = OmegaConf.create(settings)
    return net_config(cfg, int(big.width), int(big.layers), float(big.dropout), big, None if big.max_norm is None else float(big.max_norm))


def big_network(settings: dict) -> dict | None:
    """The constructor arguments a big net of ``settings`` adds to its config's model: a conv net's
    (``kind: conv``), None for the paper's MLP."""
    if settings.get("kind", "mlp") == "mlp":
        return None
    return {"kind": settings["kind"], "channels": list(settings["channels"]), "kernel": int(settings["kernel"]),
            "conv_dropout": float(settings["conv_dropout"])}


def describe_net(settings: dict) -> str:
    """'2x1200' for an MLP, 'conv 32-64 (5x5, 2x2 pooling, dropout 0.25) + 1x1024' for a conv net."""
    dense = f"{settings['layers']}x{settings['width']}"
    if settings.get("kind", "mlp") == "mlp":
        return dense
    return (f"conv {'-'.join(str(c) for c in settings['channels'])} ({settings['kernel']}x{settings['kernel']}, 2x2 pooling, "
            f"dropout {settings['conv_dropout']:g}) + {dense}")


def describe_big(settings: dict) -> str:
    """A big net's shape and regularization, as the report's tables give it."""
    max_norm = "" if settings["max_norm"] is None else f", max-norm {settings['max_norm']:g}"
    return (f"{describe_net(settings)}, dropout {settings['dropout']:g} (inputs {settings['input_dropout']:g}), "
            f"jitter ±{settings['jitter']} px{max_norm}")


def small_config(cfg, width: int | None = None, schedule=None):
    small = cfg.images.small
    return net_config(cfg, int(width or small.width), int(small.layers), 0.0, schedule or small)


BIG = "big"
SMALL = "small_alone"


def ensemble_teacher(icfg) -> bool:
    """Whether the big row's seeds teach as one ensemble (``images.teacher: ensemble``) rather than big net r student r."""
    return str(icfg.teacher) == "ensemble"


def teacher_tag(icfg) -> str:
    """'' for students of one big net (the paper's), '_ensemble' for students of the big row's average."""
    return "_ensemble" if ensemble_teacher(icfg) else ""


def student_name(icfg, width: int, temperature: float, transfer: str = "all") -> str:
    """exp/dnn/student_w<width>_T<T> (all training images), _no<c> (class c left out), _only<c+c'>; + _ensemble when the big nets' average teaches."""
    return f"student_w{width}_T{temperature:g}" + ("" if transfer == "all" else f"_{transfer}") + teacher_tag(icfg)


def control_name(shift: int) -> str:
    """exp/dnn/small_jitter<k>: the function-matching row's control, the small net on the labels of jittered views."""
    return f"small_jitter{shift}"


def matching_name(icfg, width: int, temperature: float, shift: int) -> str:
    """exp/dnn/student_w<width>_T<T>_fm_jitter<k>[_ensemble]: the small net taught on the fly on its own jittered views."""
    return f"student_w{width}_T{temperature:g}_fm_jitter{shift}" + teacher_tag(icfg)


def left_out_tag(icfg) -> str:
    return f"no{int(icfg.left_out_class)}"


def kept_tag(icfg) -> str:
    return "only" + "+".join(str(int(c)) for c in icfg.kept_classes)


def big_nets(icfg) -> dict[str, dict]:
    """The big-net candidates, name -> settings: ``images.big`` (exp/dnn/big), and one more per
    entry of ``images.big_variants`` with that entry's keys replacing big's (exp/dnn/big_<variant>)."""
    big = OmegaConf.to_container(icfg.big)
    out = {BIG: big}
    for variant, keys in (OmegaConf.to_container(icfg.big_variants) if icfg.big_variants else {}).items():
        unknown = sorted(set(keys) - set(big) - set(CONV_KEYS))
        if unknown:
            raise ValueError(f"images.big_variants.{variant} sets {', '.join(unknown)}: not keys of images.big ({', '.join(big)}) "
                             f"nor a conv net's ({', '.join(CONV_KEYS)})")
        out[f"{BIG}_{variant}"] = {**big, **keys}
    return out


def held_out_error_count(exp: Path, name: str, held_out: int) -> int:
    """A net's errors on the held-out images at its best epoch (the one its best.pt holds), from its history."""
    return round(held_out * min(1 - h["valid_frame_accuracy"] for h in read_history(Layout(exp).model(name))))


def seeds_average(logits_of: Callable[[str, np.ndarray], torch.Tensor], names: list[str], test_idx: np.ndarray,
                  valid_idx: np.ndarray, valid_labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The nets' average softmax on the test images (as log-probabilities: scored as one system)
    and its errors on the held-out images, the evidence for teaching with it or with one net."""
    held_out = average_softmax(torch.stack([logits_of(name, valid_idx) for name in names]), 1.0)
    average = average_softmax(torch.stack([logits_of(name, test_idx) for name in names]), 1.0).log()
    return average, int((held_out.argmax(-1) != valid_labels).sum())


def chosen_big(exp_dir, icfg) -> str:
    """The teacher's settings: the big-net candidate (seed 0) with the fewest held-out errors,
    the earlier of :func:`big_nets` on ties (``images.big`` first). Never the test set."""
    exp, held_out, candidates = Path(exp_dir), int(icfg.valid_images), big_nets(icfg)
    missing = [name for name in candidates if not trained(exp, name)]
    if missing:
        raise FileNotFoundError(f"images: the teacher is the big net with the fewest held-out errors, and {', '.join(str(Layout(exp).model(n)) for n in missing)} "
                                "not trained yet: run recipes/mnist/run.sh --stage 1")
    held = {name: held_out_error_count(exp, name, held_out) for name in candidates}
    return min(held, key=held.get)


def headline_names(icfg, teacher: str) -> dict[str, list[str]]:
    """The seeds of the three headline rows: big net r (of the ``teacher`` candidate's settings),
    small net alone r, and small net r distilled from big net r."""
    seeds = range(int(icfg.seeds))
    distilled = student_name(icfg, int(icfg.small.width), float(icfg.temperature))
    return {"big": [replicate_name(teacher, r) for r in seeds], "small_alone": [replicate_name(SMALL, r) for r in seeds],
            "small_distilled": [replicate_name(distilled, r) for r in seeds]}


def run_train_nets(cfg) -> None:
    """Stage 1: the small nets alone (``images.seeds``), every big-net candidate (seed 0), then
    the other seeds of the candidate with the fewest held-out errors: the teacher."""
    exp, icfg = Path(cfg.exp_dir), cfg.images
    images = ImageSet(cfg)
    candidates = big_nets(cfg.images)

    def train_big(name: str, replicate: int, settings: dict) -> None:
        shift, input_dropout = int(settings["jitter"]), float(settings["input_dropout"])
        train_stage(big_config(cfg, settings), [Model(f"train-images {name}", Layout(exp).model(name), replicate,
                                                      values={"jitter": shift, "input_dropout": input_dropout}, network=big_network(settings))],
                    images.with_augment(jitter(shift, input_dropout)))

    for replicate in range(int(icfg.seeds)):  # first: cheap, and the row every big net must beat
        name = replicate_name(SMALL, replicate)
        train_stage(small_config(cfg), [Model(f"train-images {name}", Layout(exp).model(name), replicate)], images)
    for name, settings in candidates.items():
        train_big(name, 0, settings)
    teacher = chosen_big(cfg.exp_dir, cfg.images)
    log.info("images: the teacher is %s (held-out errors: %s)", teacher,
             {name: held_out_error_count(exp, name, int(icfg.valid_images)) for name in candidates})
    for replicate, name in enumerate(headline_names(cfg.images, teacher)["big"][1:], start=1):
        train_big(name, replicate, candidates[teacher])


def teacher_model(exp_dir, teacher: str, device: torch.device) -> HybridDNN:
    """The big net ``teacher`` at its best held-out epoch (the checkpoint every image net is scored at)."""
    return load_model(model_path(Path(exp_dir), f"{teacher}@best"), device)


def teachers_of(icfg, names: dict[str, list[str]], replicate: int) -> list[str]:
    """The big nets that teach student seed ``replicate``: big net r (``images.teacher: net``, the
    paper's), or every seed of the big row, their softmax(z/T) averaged (``ensemble``: a teacher
    better than any one of them, as the paper's speech ensemble)."""
    return list(names["big"]) if ensemble_teacher(icfg) else [names["big"][replicate]]


def stored_teacher_loss(dcfg, exp_dir, ecfg, temperature: float, teachers: list[str]):
    """The students' loss against the big nets' average softmax at T on the clean images (their logits computed once)."""

    def make(data, hard):
        logits = torch.stack([predict_logits(teacher_model(exp_dir, teacher, data.pdf_ids.device), data, np.arange(len(data.pdf_ids)),
                                             int(ecfg.batch_size)) for teacher in teachers])  # (teachers, images, classes)
        return lambda z, batch: distillation_loss(z, average_softmax(logits[:, batch], temperature), hard[batch], temperature,
                                                  dcfg.soft_weight, dcfg.hard_weight)

    return make


def consistent_teacher_loss(dcfg, exp_dir, temperature: float, teachers: list[str]):
    """Function matching: the big nets score, on the fly, the very jittered view the student trains on."""

    def make(data, hard):
        on_the_fly = TeacherOnTheFly([teacher_model(exp_dir, teacher, data.pdf_ids.device) for teacher in teachers], data.frames)

        def loss(z: torch.Tensor, batch: torch.Tensor, view: View) -> torch.Tensor:
            return distillation_loss(z, on_the_fly.soft_targets(batch, temperature, view.inputs), hard[batch], temperature,
                                     dcfg.soft_weight, dcfg.hard_weight)

        return loss

    return make


def transfer_frames(classes: list[int] | None, excluded: list[int] | None):
    """A Model's ``frames``: the training images of ``classes`` only, or all but ``excluded``."""

    def frames(data, train_idx: np.ndarray, valid_idx: np.ndarray, hard: torch.Tensor) -> ModelFrames:
        labels = data.pdf_ids.cpu().numpy()[train_idx]
        keep = np.isin(labels, classes) if classes is not None else ~np.isin(labels, excluded)
        return ModelFrames(train_idx[keep], valid_idx, hard, None)

    return frames


def run_train_students(cfg) -> None:
    """Stage 2: the students of the teacher (:func:`chosen_big`). First the distilled small net's
    seeds (seed r taught by big net r), then the function-matching row and its control, then,
    taught by its seed 0 (or the ensemble): T x width, the left-out class, the kept classes only."""
    exp, icfg = Path(cfg.exp_dir), cfg.images
    images = ImageSet(cfg)
    keys = ("distill.soft_weight", "distill.hard_weight")
    width, temperature = int(icfg.small.width), float(icfg.temperature)

    def teacher_inputs(teachers: list[str]) -> dict[str, Path]:
        return {"teacher": Layout(exp).model(teachers[0])} if len(teachers) == 1 else {f"teacher {t}": Layout(exp).model(t) for t in teachers}

    def teacher_value(teachers: list[str]) -> str | list[str]:
        return teachers[0] if len(teachers) == 1 else teachers

    def train_student(name: str, w: int, t: float, teachers: list[str], replicate: int = 0, transfer: str = "all", frames=None) -> None:
        train_stage(small_config(cfg, w), [Model(f"train-images {name}", Layout(exp).model(name), replicate, frames=frames,
                                                 values={"teacher": teacher_value(teachers), "temperature": t, "transfer": transfer})],
                    images, loss=stored_teacher_loss(cfg.distill, cfg.exp_dir, cfg.eval, t, teachers), keys=keys, inputs=teacher_inputs(teachers))

    names = headline_names(cfg.images, chosen_big(cfg.exp_dir, cfg.images))
    for replicate, name in enumerate(names["small_distilled"]):
        train_student(name, width, temperature, teachers_of(cfg.images, names, replicate), replicate)
    teachers = teachers_of(cfg.images, names, 0)
    matching = icfg.function_matching
    if matching:
        shift, schedule = int(matching.jitter), small_config(cfg, width, matching)
        view = images.with_augment(jitter(shift, 0.0))
        train_stage(schedule, [Model(f"train-images {control_name(shift)}", Layout(exp).model(control_name(shift)), values={"jitter": shift})], view)
        name = matching_name(cfg.images, width, temperature, shift)
        train_stage(schedule, [Model(f"train-images {name}", Layout(exp).model(name),
                                     values={"teacher": teacher_value(teachers), "temperature": temperature, "jitter": shift,
                                             "teacher_sees": "the student's view"})],
                    view, loss=consistent_teacher_loss(cfg.distill, cfg.exp_dir, temperature, teachers), keys=keys, inputs=teacher_inputs(teachers))
    for w in icfg.widths:
        for t in icfg.temperatures:
            train_student(student_name(cfg.images, int(w), float(t)), int(w), float(t), teachers)
    train_student(student_name(cfg.images, width, temperature, left_out_tag(cfg.images)), width, temperature, teachers, transfer=left_out_tag(cfg.images),
                  frames=transfer_frames(None, [int(icfg.left_out_class)]))
    train_student(student_name(cfg.images, width, temperature, kept_tag(cfg.images)), width, temperature, teachers, transfer=kept_tag(cfg.images),
                  frames=transfer_frames([int(c) for c in icfg.kept_classes], None))


# ----------------------------------------------------------------------------- the report


def best_shift(logits: torch.Tensor, labels: torch.Tensor, classes: list[int], sign: float, shifts: list[float]) -> float:
    """The shift of ``shifts`` (added to ``classes``' logits times ``sign``) with the fewest errors
    on the held-out images (the smallest of equals)."""
    errors = [int((shifted(logits, classes, sign * s).argmax(-1) != labels).sum()) for s in shifts]
    return float(shifts[int(np.argmin(errors))])


def shifted(logits: torch.Tensor, classes: list[int], shift: float) -> torch.Tensor:
    out = logits.clone()
    out[:, classes] += shift
    return out


class TestErrors:
    """Test errors of systems as counts of the test images, with bootstrap intervals over images
    (paired: every system on the same draws; a row of several seeds has them resampled too:
    :mod:`asrkd.stats`)."""

    def __init__(self, stats, replicates: int, labels: torch.Tensor, test_ids: list[str]):
        """``stats``: the ``stats`` section (confidence, seed); ``replicates``: ``images.replicates``."""
        self.labels, self.ids = labels, test_ids
        self.bootstrap = Bootstrap(test_ids, int(replicates), stats.confidence, stats.seed)

    def add(self, key: str, logits: list[torch.Tensor], of_class: int | None = None) -> dict:
        """{"errors" (the mean over the seeds' logits), "errors_ci", "seeds", and with ``of_class``
        "errors_on_class"} over the test images."""
        hits = [(z.argmax(-1) == self.labels).cpu().numpy().astype(int) for z in logits]
        interval = self.bootstrap.add(key, UtteranceCounts.from_tables([{u: [int(h), 1] for u, h in zip(self.ids, seed)} for seed in hits]))
        count = len(self.ids)
        per_seed = [int(count - seed.sum()) for seed in hits]
        out = {"system": key, "errors": round(float(np.mean(per_seed)), 1), "errors_ci": [round(count * (1 - hi)) for hi in interval["ci"][::-1]],
               "test_images": count, "seeds": len(hits), "errors_per_seed": per_seed}
        if of_class is not None:
            out["errors_on_class"] = round(float(np.mean([((1 - h) * (self.labels == of_class).cpu().numpy()).sum() for h in hits])), 1)
        return out

    def fewer(self, a: str, b: str) -> dict:
        """Errors of b minus errors of a (a's improvement over b) with its interval, as counts."""
        diff = self.bootstrap.difference(a, b)
        count = len(self.ids)
        return {"estimate": round(count * diff["estimate"], 1), "ci": [round(count * x) for x in diff["ci"]], "p_above_zero": diff["p_above_zero"]}

    def gap_closed(self, part: str, small: str, big: str) -> dict:
        """The share of big's fewer errors than small that part has too: (small - part) / (small - big) in errors."""
        return self.bootstrap.share(part, small, big)


def history_of(exp: Path, name: str, held_out: int) -> dict:
    """A net's curves: training-sample and held-out errors (%) per epoch, its best (scored) epoch."""
    history = read_history(Layout(exp).model(name))
    held = [100 * (1 - h["valid_frame_accuracy"]) for h in history]
    return {"epochs": len(history), "best_epoch": int(np.argmin(held)), "held_out_images": held_out,
            "held_out_error_percent": [round(x, 3) for x in held],
            "train_error_percent": [round(100 * (1 - h["train_frame_accuracy"]), 3) for h in history],
            "train_loss": [round(h["train_cross_entropy"], 4) for h in history]}


def trained(exp: Path, name: str) -> bool:
    return (Layout(exp).model(name) / "stage.json").is_file()


def every_net(icfg, teacher: str | None) -> list[str]:
    """Every net stages 1 and 2 train, in their order (the teacher's seeds and the students only once it is chosen)."""
    nets = [replicate_name(SMALL, r) for r in range(int(icfg.seeds))] + list(big_nets(icfg))
    if teacher is None:
        return nets
    names = headline_names(icfg, teacher)
    width, temperature = int(icfg.small.width), float(icfg.temperature)
    nets += names["big"][1:] + names["small_distilled"]
    if icfg.function_matching:
        shift = int(icfg.function_matching.jitter)
        nets += [control_name(shift), matching_name(icfg, width, temperature, shift)]
    nets += [student_name(icfg, int(w), float(t)) for w in icfg.widths for t in icfg.temperatures]
    return nets + [student_name(icfg, width, temperature, left_out_tag(icfg)), student_name(icfg, width, temperature, kept_tag(icfg))]


def run_report(cfg) -> None:
    """Stage 3: ``results/<dataset>/report.{json,md}``, ``errors.png``, ``temperature_width.png``,
    ``curves.png``; while nets are missing (stages 1–2 run for hours and resume), the nets
    trained so far: report.{json,md} and curves.png (:func:`progress_report`)."""
    exp, icfg = Path(cfg.exp_dir), cfg.images
    candidates_done = all(trained(exp, name) for name in big_nets(cfg.images))
    missing = [name for name in every_net(cfg.images, chosen_big(cfg.exp_dir, cfg.images) if candidates_done else None) if not trained(exp, name)]
    if missing or not candidates_done:
        progress_report(cfg, missing)
        return
    images = ImageSet(cfg)
    data, _, valid_idx, _ = images.load()
    _, _, test_idx = images.split()
    store = data.frames.store
    test_labels, valid_labels = data.pdf_ids[torch.from_numpy(test_idx)], data.pdf_ids[torch.from_numpy(valid_idx)]
    errors = TestErrors(cfg.stats, cfg.images.replicates, test_labels, [store.utt_ids[i] for i in test_idx])
    batch = int(cfg.eval.batch_size)

    def logits_of(name: str, indices: np.ndarray) -> torch.Tensor:
        return predict_logits(load_model(model_path(exp, f"{name}@best"), data.pdf_ids.device), data, indices, batch)

    width, temperature = int(icfg.small.width), float(icfg.temperature)
    teacher = chosen_big(cfg.exp_dir, cfg.images)
    seeds = headline_names(cfg.images, teacher)
    rows = {key: errors.add(key, [logits_of(name, test_idx) for name in names]) for key, names in seeds.items()}
    rows["big"]["fewer_than_small_alone"] = errors.fewer("big", "small_alone")
    teacher_row = "big"
    if ensemble_teacher(cfg.images):  # the teacher: the big seeds' average probabilities, scored as one system
        average = average_softmax(torch.stack([logits_of(name, test_idx) for name in seeds["big"]]), 1.0).log()
        rows["big_ensemble"] = errors.add("big_ensemble", [average]) | {"nets": seeds["big"]}
        rows["big_ensemble"]["fewer_than_small_alone"] = errors.fewer("big_ensemble", "small_alone")
        teacher_row = "big_ensemble"
    elif len(seeds["big"]) > 1:  # not the teacher: the held-out evidence that one net teaches as well as their average
        average, held_out_errors = seeds_average(logits_of, seeds["big"], test_idx, valid_idx, valid_labels)
        rows["big_average"] = errors.add("big_average", [average]) | {
            "nets": seeds["big"], "held_out_errors": held_out_errors,
            "seeds_held_out_errors": [held_out_error_count(exp, name, len(valid_idx)) for name in seeds["big"]],
            "fewer_than_small_alone": errors.fewer("big_average", "small_alone")}
    rows["small_distilled"]["fewer_than_small_alone"] = errors.fewer("small_distilled", "small_alone")
    rows["small_distilled"]["gap_closed"] = errors.gap_closed("small_distilled", "small_alone", teacher_row)
    matching = icfg.function_matching
    if matching:
        shift = int(matching.jitter)
        control, student = control_name(shift), matching_name(cfg.images, width, temperature, shift)
        rows["small_jittered"] = errors.add(control, [logits_of(control, test_idx)]) | {"jitter": shift}
        rows["small_jittered"]["fewer_than_small_alone"] = errors.fewer(control, "small_alone")
        rows["function_matching"] = errors.add(student, [logits_of(student, test_idx)]) | {"jitter": shift}
        rows["function_matching"] |= {"fewer_than_control": errors.fewer(student, control), "fewer_than_small_alone": errors.fewer(student, "small_alone"),
                                      "gap_closed": errors.gap_closed(student, "small_alone", teacher_row)}
    shifts = [float(s) for s in np.arange(float(icfg.bias_shifts.start), float(icfg.bias_shifts.stop) + 1e-9, float(icfg.bias_shifts.step))]
    left_out, kept = int(icfg.left_out_class), [int(c) for c in icfg.kept_classes]
    name = student_name(cfg.images, width, temperature, left_out_tag(cfg.images))
    test_logits, held_logits = logits_of(name, test_idx), logits_of(name, valid_idx)
    shift = best_shift(held_logits, valid_labels, [left_out], 1.0, shifts)
    rows["left_out"] = errors.add(name, [test_logits], left_out) | {"class": left_out}
    rows["left_out_corrected"] = errors.add(f"{name} +{shift:g}", [shifted(test_logits, [left_out], shift)], left_out) | {"bias_shift": shift}
    rows["left_out_corrected"]["fewer_than_uncorrected"] = errors.fewer(f"{name} +{shift:g}", name)
    name = student_name(cfg.images, width, temperature, kept_tag(cfg.images))
    test_logits, held_logits = logits_of(name, test_idx), logits_of(name, valid_idx)
    shift = best_shift(held_logits, valid_labels, kept, -1.0, shifts)
    rows["kept_only"] = errors.add(name, [test_logits]) | {"classes": kept}
    rows["kept_only_corrected"] = errors.add(f"{name} -{shift:g}", [shifted(test_logits, kept, -shift)]) | {"bias_shift": -shift}
    rows["kept_only_corrected"]["fewer_than_uncorrected"] = errors.fewer(f"{name} -{shift:g}", name)
    grid = []
    for w in icfg.widths:
        names = [student_name(cfg.images, int(w), float(t)) for t in icfg.temperatures]
        cells = [errors.add(name, [logits_of(name, test_idx)]) | {"temperature": float(t)} for name, t in zip(names, icfg.temperatures)]
        held = [held_out_error_count(exp, name, len(valid_idx)) for name in names]
        grid.append({"width": int(w), "cells": cells, "held_out_errors": held, "best_temperature": float(icfg.temperatures[int(np.argmin(held))])})
    candidates = big_nets(cfg.images)
    errors.add(f"{teacher} alone", [logits_of(teacher, test_idx)])  # seed 0 alone, as each candidate has one seed
    big_nets_compared = [{"name": name, "settings": settings, "held_out_errors": held_out_error_count(exp, name, len(valid_idx)),
                          "test": errors.add(f"{name} alone", [logits_of(name, test_idx)]),  # not "big": the big row's seeds
                          "fewer_than_teacher": None if name == teacher else errors.fewer(f"{name} alone", f"{teacher} alone")}
                         for name, settings in candidates.items()]
    curves = [*(n for names in seeds.values() for n in names), *(n for n in candidates if n != teacher),
               *([control_name(int(matching.jitter)), matching_name(cfg.images, width, temperature, int(matching.jitter))] if matching else [])]
    histories = {name: history_of(exp, name, len(valid_idx)) for name in curves}
    result = {"dataset": str(icfg.dataset), "command": recipe_command("asrkd report-images"), "machine": machine(cfg.train.device),
              "test_images": len(test_idx), "held_out_images": len(valid_idx), "checkpoint": "best.pt: the epoch with the fewest held-out errors",
              "patience": int(icfg.patience), "rows": rows, "seeds": seeds, "temperature_width": grid,
              "teacher": teacher, "teacher_kind": str(icfg.teacher), "teacher_model": candidates[teacher].get("kind", "mlp"),
              "teacher_net": describe_net(candidates[teacher]), "big_nets": big_nets_compared,
              "temperature": temperature, "small_width": width, "big": candidates[teacher],
              "small": OmegaConf.to_container(icfg.small), "function_matching": OmegaConf.to_container(matching) if matching else None,
              "histories": histories,
              "bias_shifts": {"start": shifts[0], "stop": shifts[-1], "step": float(icfg.bias_shifts.step)},
              "paper_mnist": PAPER_MNIST, "bootstrap_replicates": int(icfg.replicates)}
    publish_corpus_report(sections.report_place(cfg), result, markdown(result), {"errors.png": plot_errors, "temperature_width.png": plot_temperature_width,
                                                         "curves.png": plot_curves})
    log.info("images: %s", {key: row["errors"] for key, row in rows.items()})


def progress_report(cfg, missing: list[str]) -> None:
    """The image experiment so far: the small nets alone and every big-net candidate trained,
    each with its held-out errors (where the teacher is chosen) and test errors [95% CI], the
    candidates' difference from the small nets alone, the teacher once every candidate is
    trained, their curves, and the nets still missing. The full report replaces it once stage 2
    is complete; figures of an earlier full report are removed, as they no longer match."""
    exp, icfg = Path(cfg.exp_dir), cfg.images
    images = ImageSet(cfg)
    data, _, valid_idx, _ = images.load()
    _, _, test_idx = images.split()
    store = data.frames.store
    errors = TestErrors(cfg.stats, cfg.images.replicates, data.pdf_ids[torch.from_numpy(test_idx)], [store.utt_ids[i] for i in test_idx])
    batch = int(cfg.eval.batch_size)

    def logits_of(name: str, indices: np.ndarray = test_idx) -> torch.Tensor:
        return predict_logits(load_model(model_path(exp, f"{name}@best"), data.pdf_ids.device), data, indices, batch)

    small = [n for n in (replicate_name(SMALL, r) for r in range(int(icfg.seeds))) if trained(exp, n)]
    rows = {}
    if small:
        rows[SMALL] = errors.add(SMALL, [logits_of(n) for n in small]) | {"nets": small, "settings": OmegaConf.to_container(icfg.small),
                                                                              "held_out_errors": [held_out_error_count(exp, n, len(valid_idx)) for n in small]}
    candidates = big_nets(cfg.images)
    for name, settings in candidates.items():
        if trained(exp, name):
            rows[name] = errors.add(name, [logits_of(name)]) | {"nets": [name], "settings": settings,
                                                                  "held_out_errors": [held_out_error_count(exp, name, len(valid_idx))]}
            if small:
                rows[name]["fewer_than_small_alone"] = errors.fewer(name, SMALL)
    teacher = chosen_big(cfg.exp_dir, cfg.images) if all(trained(exp, n) for n in candidates) else None
    seeds = [n for n in headline_names(cfg.images, teacher)["big"] if trained(exp, n)] if teacher else []
    if len(seeds) > 1:  # the teacher's seeds, and their average (images.teacher=ensemble) with its held-out errors
        settings = candidates[teacher]
        rows["teacher_seeds"] = errors.add("teacher seeds", [logits_of(n) for n in seeds]) | {
            "nets": seeds, "settings": settings, "held_out_errors": [held_out_error_count(exp, n, len(valid_idx)) for n in seeds]}
        average, held_out_errors = seeds_average(logits_of, seeds, test_idx, valid_idx, data.pdf_ids[torch.from_numpy(valid_idx)])
        rows["teacher_ensemble"] = errors.add("teacher ensemble", [average]) | {
            "nets": seeds, "settings": settings, "held_out_errors": [held_out_errors]}
        if small:
            for key in ("teacher_seeds", "teacher_ensemble"):
                rows[key]["fewer_than_small_alone"] = errors.fewer(key.replace("_", " "), SMALL)
    histories = {n: history_of(exp, n, len(valid_idx)) for row in rows.values() for n in row["nets"]}
    result = {"dataset": str(icfg.dataset), "complete": False, "command": recipe_command("asrkd report-images"), "machine": machine(cfg.train.device),
              "test_images": len(test_idx), "held_out_images": len(valid_idx), "checkpoint": "best.pt: the epoch with the fewest held-out errors",
              "rows": rows, "teacher": teacher, "missing": missing, "histories": histories, "bootstrap_replicates": int(icfg.replicates)}
    publish_corpus_report(sections.report_place(cfg), result, progress_markdown(result), {"curves.png": plot_curves}, stale=("errors.png", "temperature_width.png"))
    log.info("images so far: %s; missing %d nets", {key: row["errors"] for key, row in rows.items()}, len(missing))


def progress_markdown(result: dict) -> str:
    rows, held_out = result["rows"], result["held_out_images"]
    lines = [f"# {result['dataset']}: the paper's preliminary experiment (§3), the nets trained so far", "",
             f"Stages 1–2 are under way (they resume where they stopped); this report shows what is trained: test errors of "
             f"{result['test_images']:,} images [95% CI: bootstrap over test images, {result['bootstrap_replicates']:,} replicates; the small "
             f"nets' row: the mean of its seeds, resampled too], errors on the {held_out:,} held-out training images at each net's "
             "best epoch (where it stops, where it is scored, and where the teacher is chosen; never the test set).", "",
             "| net | settings | seeds | held-out errors | best epoch | test errors [95% CI] | fewer test errors than the small nets alone [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        settings = row["settings"]
        described = f"{settings['layers']}x{settings['width']}, no regularization" if name == SMALL else describe_big(settings)
        best = ", ".join(str(result["histories"][n]["best_epoch"] + 1) for n in row["nets"])
        fewer = fewer_cell(row["fewer_than_small_alone"]) if "fewer_than_small_alone" in row else "–"
        teacher = " (the teacher)" if name == result["teacher"] else ""
        name = {"teacher_seeds": f"{result['teacher']}, every seed", "teacher_ensemble": f"{result['teacher']}, the seeds' average"}.get(name, name)
        lines.append(f"| {name}{teacher} | {described} | {row['seeds']} | {', '.join(map(str, row['held_out_errors']))} | {best} "
                     f"| {errors_cell(row)} | {fewer} |")
    ensemble = rows.get("teacher_ensemble")
    lines += ["", (f"The teacher: {result['teacher']}, the big net with the fewest held-out errors." if result["teacher"] else
                   "The teacher is chosen once every big-net candidate is trained."),
              (f"Its {len(ensemble['nets'])} seeds' average softmax (images.teacher=ensemble) makes {ensemble['held_out_errors'][0]} held-out "
               f"errors, its seeds {', '.join(map(str, rows['teacher_seeds']['held_out_errors']))}: the held-out evidence for teaching with "
               "one net or with their average." if ensemble else ""),
              f"Still to train ({len(result['missing'])}): {', '.join(result['missing'])}." if result["missing"] else "",
              f"Training curves: curves.png (report.json \"histories\"). Command: `{result['command']}`. Machine: {result['machine']}.", ""]
    return "\n".join(lines)


def errors_cell(row: dict) -> str:
    lo, hi = row["errors_ci"]
    return f"{row['errors']:g} [{lo}, {hi}]"


def fewer_cell(diff: dict) -> str:
    lo, hi = diff["ci"]
    return f"{diff['estimate']:+g} [{lo:+d}, {hi:+d}]"


def seeds_note(row: dict) -> str:
    return f"{row['seeds']} seeds" if row["seeds"] > 1 else "1 seed"


def markdown(result: dict) -> str:
    rows, paper, test = result["rows"], result["paper_mnist"], result["test_images"]
    w, t = result["small_width"], result["temperature"]
    big, histories = result["big"], result["histories"]
    ensemble = "big_ensemble" in rows
    teacher_label = "the big nets' ensemble" if ensemble else "big"

    def epochs(key: str) -> str:
        stopped = [histories[name]["best_epoch"] + 1 for name in result["seeds"][key]]
        return "best epoch " + ", ".join(map(str, stopped))

    lines = [f"# {result['dataset']}: the paper's preliminary experiment (§3)", "",
             f"Test errors of {test:,} images [95% CI: bootstrap over test images, {result['bootstrap_replicates']:,} replicates; rows of several "
             "seeds: their mean, the seeds resampled too]; the paper's MNIST errors beside them as reference (MNIST is the easier set: "
             "compare the pattern, not the counts). Every net is scored at its best.pt, the epoch with the fewest errors on the "
             f"{result['held_out_images']:,} held-out training images; it trains until those have not improved for "
             f"{result['patience']} epochs (big net: {big.get('patience') or result['patience']}), at most the stated epochs.", "",
             "| row | net | test errors [95% CI] | paper (MNIST) | fewer errors than the row it improves on [95% CI] |",
             "|---|---|---|---|---|",
             f"| big net, regularized ({seeds_note(rows['big'])}; {epochs('big')} of ≤ {big['epochs']}) | {describe_big(big)} "
             f"| {errors_cell(rows['big'])} | {paper['big']} | {fewer_cell(rows['big']['fewer_than_small_alone'])} (vs the small net alone) |",
             f"| small net alone ({seeds_note(rows['small_alone'])}; {epochs('small_alone')}) | 2x{w}, no regularization "
             f"| {errors_cell(rows['small_alone'])} | {paper['small_alone']} | – |",
             *([f"| the big nets' ensemble, the teacher (the {len(rows['big_ensemble']['nets'])} seeds' average probabilities) | "
                f"{len(rows['big_ensemble']['nets'])} x {describe_net(big)} | {errors_cell(rows['big_ensemble'])} | – "
                f"| {fewer_cell(rows['big_ensemble']['fewer_than_small_alone'])} (vs the small net alone) |"] if ensemble else []),
             *([f"| the big nets' average probabilities, not the teacher ({len(average['nets'])} seeds; held-out errors {average['held_out_errors']}, "
                f"the seeds' {', '.join(map(str, average['seeds_held_out_errors']))}) | {len(average['nets'])} x {describe_net(big)} "
                f"| {errors_cell(average)} | – | {fewer_cell(average['fewer_than_small_alone'])} (vs the small net alone) |"]
               if (average := rows.get("big_average")) else []),
             f"| small net distilled, T = {t:g} ({seeds_note(rows['small_distilled'])}, "
             f"{'every seed from the ensemble' if ensemble else 'seed r from big net r'}; {epochs('small_distilled')}) | 2x{w} "
             f"| {errors_cell(rows['small_distilled'])} | {paper['small_distilled']} | {fewer_cell(rows['small_distilled']['fewer_than_small_alone'])} (vs alone) |"]
    if "function_matching" in rows:
        control, matched = rows["small_jittered"], rows["function_matching"]
        lines += [f"| small net alone on jittered views (control; 1 seed) | 2x{w}, jitter ±{control['jitter']} px "
                  f"| {errors_cell(control)} | – | {fewer_cell(control['fewer_than_small_alone'])} (vs alone) |",
                  f"| small net, function matching: big net on the fly on its jittered view, T = {t:g} (1 seed) | 2x{w} "
                  f"| {errors_cell(matched)} | – | {fewer_cell(matched['fewer_than_control'])} (vs its control) |"]
    lo = rows["left_out"]
    c = lo["class"]
    corrected = rows["left_out_corrected"]
    lines += [f"| class {c} left out of the transfer set | 2x{w}, T = {t:g} | {errors_cell(lo)} ({lo['errors_on_class']:g} on class {c}) "
              f"| {paper['left_out']} ({paper['left_out_on_class']} on 3s) | – |",
              f"| the same, bias of class {c} raised by {corrected['bias_shift']:g} | 2x{w} | {errors_cell(corrected)} "
              f"({corrected['errors_on_class']:g} on class {c}) | {paper['left_out_corrected']} ({paper['left_out_corrected_on_class']} on 3s) "
              f"| {fewer_cell(corrected['fewer_than_uncorrected'])} (vs uncorrected) |"]
    kept, kept_corrected = rows["kept_only"], rows["kept_only_corrected"]
    classes = " and ".join(str(k) for k in kept["classes"])
    lines += [f"| classes {classes} only in the transfer set | 2x{w}, T = {t:g} | {errors_cell(kept)} ({100 * kept['errors'] / test:.1f}%) "
              f"| {paper['kept_only_percent']}% | – |",
              f"| the same, biases of {classes} lowered by {-kept_corrected['bias_shift']:g} | 2x{w} | {errors_cell(kept_corrected)} "
              f"({100 * kept_corrected['errors'] / test:.1f}%) | {paper['kept_only_corrected_percent']}% "
              f"| {fewer_cell(kept_corrected['fewer_than_uncorrected'])} (vs uncorrected) |"]
    lines += ["", f"Gap closed, (small alone − distilled) / (small alone − {teacher_label}) in errors: {format_interval(rows['small_distilled']['gap_closed'])} "
              f"(paper, MNIST: {(paper['small_alone'] - paper['small_distilled']) / (paper['small_alone'] - paper['big']):.0%})"
              + (f"; by function matching: {format_interval(rows['function_matching']['gap_closed'])}." if "function_matching" in rows else ".")]
    lines += ["", f"Big nets compared on the {result['held_out_images']:,} held-out images (seed 0 each; images.big and its variants): "
              f"the one with the fewest held-out errors is the teacher of every student and gives the big row's seeds.", "",
              "| big net | dropout (inputs) | jitter | held-out errors | test errors [95% CI] | fewer test errors than the teacher [95% CI] |",
              "|---|---|---|---|---|---|"]
    for net in result["big_nets"]:
        settings, chosen = net["settings"], net["name"] == result["teacher"]
        lines.append(f"| {net['name']}{' (the teacher)' if chosen else ''} | {settings['dropout']:g} ({settings['input_dropout']:g}) "
                     f"| ±{settings['jitter']} px | {net['held_out_errors']} | {errors_cell(net['test'])} "
                     f"| {'–' if chosen else fewer_cell(net['fewer_than_teacher'])} |")
    temperatures = [cell["temperature"] for cell in result["temperature_width"][0]["cells"]]
    lines += ["", f"Test errors of small nets (2 hidden layers of each width) distilled from {'the ensemble' if ensemble else 'big net 0'} at each T; "
              "**bold**: the T with the "
              "fewest held-out errors (the paper: 2.5–4 best for 30 units, anything above 8 for 300 or more).", "",
              "| width | " + " | ".join(f"T = {t:g}" for t in temperatures) + " | held-out errors |", "|---" * (len(temperatures) + 2) + "|"]
    for row in result["temperature_width"]:
        cells = [f"**{errors_cell(cell)}**" if cell["temperature"] == row["best_temperature"] else errors_cell(cell) for cell in row["cells"]]
        lines.append(f"| {row['width']} | " + " | ".join(cells) + " | " + ", ".join(map(str, row["held_out_errors"])) + " |")
    shifts = result["bias_shifts"]
    lines += ["", f"Bias shifts: the value of {shifts['start']:g}–{shifts['stop']:g} (step {shifts['step']:g}) with the fewest errors on "
              f"the {result['held_out_images']:,} held-out training images (never the test set). Training curves: curves.png "
              f"(report.json \"histories\"). Command: `{result['command']}`. Machine: {result['machine']}. Rows of one seed: "
              "single-seed claims, test-set variation only.", ""]
    return "\n".join(lines)


def plot_errors(result: dict, out: Path) -> None:
    keys = ["big", "small_alone", "small_distilled", "left_out", "left_out_corrected", "kept_only_corrected"]
    labels = ["big", "small\nalone", "small\ndistilled", "class\nleft out", "left out,\nbias raised", "two classes,\nbiases lowered"]
    with saved_figure(out, (8, 4.5), "", "test errors (of 10,000)", f"{result['dataset']}: the paper's §3 rows (MNIST: its numbers)",
                      fontsize=8) as ax:
        rows = result["rows"]
        values = [rows[k]["errors"] for k in keys]
        errors = [[rows[k]["errors"] - rows[k]["errors_ci"][0] for k in keys], [rows[k]["errors_ci"][1] - rows[k]["errors"] for k in keys]]
        x = np.arange(len(keys))
        ax.bar(x - 0.2, values, 0.4, yerr=errors, capsize=3, label=result["dataset"])
        paper = result["paper_mnist"]
        reference = [paper["big"], paper["small_alone"], paper["small_distilled"], paper["left_out"], paper["left_out_corrected"],
                     10000 * paper["kept_only_corrected_percent"] / 100]
        ax.bar(x + 0.2, reference, 0.4, label="paper, MNIST")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)


def plot_temperature_width(result: dict, out: Path) -> None:
    with saved_figure(out, (7, 4.5), "T", "test errors (of 10,000)", "Distilled small nets: T against width", fontsize=8) as ax:
        for row in result["temperature_width"]:
            t = [cell["temperature"] for cell in row["cells"]]
            values = [cell["errors"] for cell in row["cells"]]
            errors = [[c["errors"] - c["errors_ci"][0] for c in row["cells"]], [c["errors_ci"][1] - c["errors"] for c in row["cells"]]]
            ax.errorbar(t, values, yerr=errors, marker="o", capsize=3, label=f"2 x {row['width']} units")
        ax.set_xscale("log")


def plot_curves(result: dict, out: Path) -> None:
    """Held-out (solid) and training-sample (dotted) errors per epoch of every headline net; a dot at each scored epoch."""
    with saved_figure(out, (8, 5), "epoch", "errors (%)", f"{result['dataset']}: training curves (scored: best held-out epoch)",
                      fontsize=8) as ax:
        for i, (name, history) in enumerate(result["histories"].items()):
            color = f"C{i % 10}"
            epochs = np.arange(1, history["epochs"] + 1)
            ax.plot(epochs, history["held_out_error_percent"], color=color, label=name)
            ax.plot(epochs, history["train_error_percent"], color=color, linestyle=":")
            best = history["best_epoch"]
            ax.plot([best + 1], [history["held_out_error_percent"][best]], "o", color=color)
        ax.set_yscale("log")


# the types of images.* that its defaults (images.yaml) do not show
CONFIG_TYPES = ConfigTypes(
    {"images.dataset": Kind((str,), choices=("fashion-mnist", "mnist")), "images.teacher": Kind((str,), choices=("net", "ensemble")),
     "images.download_url": Kind((str,), nullable=True), "images.big_variants": Kind((dict,), nullable=True),
     "images.function_matching": Kind((dict,), nullable=True)},
    (("images.left_out_class", Range("[0, 9]")), ("images.kept_classes", Range("[0, 9]")), ("images.bias_shifts.step", POSITIVE),
     ("images.bias_shifts.*", NONNEGATIVE), ("images.valid_images", COUNT)))

# its own commands (recipes/mnist/run.sh): images are no layout.System, so no train/decode/report steps of the base
EXPERIMENT = Experiment("images", "images", decodes=False, config=CONFIG_TYPES,
                        commands={"prepare-images": run_prepare, "train-image-nets": run_train_nets,
                                  "train-image-students": run_train_students, "report-images": run_report})
