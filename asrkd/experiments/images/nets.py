"""The image experiment's nets (recipes/mnist/run.sh stages 1-2): their configs and names, the big
net chosen on the held-out images, ``train-image-nets`` (the small nets alone, the big-net
candidates, the teacher's seeds) and ``train-image-students`` (distilled at T, the function-matching
row and its control, T against width, a class left out, two classes kept)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd.distill.losses import distillation_loss
from asrkd.distill.student import TeacherOnTheFly
from asrkd.experiments.images.data import ImageSet, jitter
from asrkd.experiments.images.model import CONV_KEYS
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import load_model, model_path, read_history
from asrkd.nnet.model import HybridDNN, average_softmax
from asrkd.nnet.train import Model, ModelFrames, replicate_name, train_stage
from asrkd.nnet.training_set import predict_logits
from asrkd.nnet.views import View

log = logging.getLogger(__name__)


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

def trained(exp: Path, name: str) -> bool:
    return (Layout(exp).model(name) / "stage.json").is_file()
