"""Stage: a teacher's soft targets, stored once per feature store and temperature
(``exp/soft_targets/<teacher>/<store>/T<T>``).

For every frame of a feature store (``train``, or a transfer set's: ``train_sp``...) and
each T in ``distill.temperatures``, the average over the teacher's models of softmax(z/T):
the ensemble's members, or one DNN (the 3%-data experiment's 100% model). For a cross-fitted
ensemble (``ensemble.folds``), a training utterance's average is over the members that never
saw its speaker; frames of other speakers (validation, unlabeled audio) average all members.
With ``distill.logit_matching``, also the teacher's average zero-mean logits
(``.../logits``), the target of the logit-matching student.

How a store keeps them (dense and top-k arrays, the header that ties them to their features,
the forms students read) is :mod:`asrkd.distill.target_store`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import DataDir
from asrkd.distill.target_store import ArrayWriter, SoftTargetStore, TeacherLogits, logits_dir, source_checksum, store_arrays, store_dir, stores_dense
from asrkd.files import write_json
from asrkd.jobs import map_jobs, split
from asrkd.kaldi.decode import log_priors
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import load_system, system_dirs
from asrkd.nnet.model import EnsembleDNN, SplicedFrames, average_softmax, average_zero_mean_logits
from asrkd.nnet.training_set import TrainingSet
from asrkd.parallel import pick_device
from asrkd.progress import progress
from asrkd.stage import plan, read_record
from asrkd.stores import FeatureStore

log = logging.getLogger(__name__)


FrameGroups = list[tuple[np.ndarray, list[int]]]  # (frame indices, the members that score them)


@torch.no_grad()
def fill_batches(teacher: EnsembleDNN, frames: SplicedFrames, batches: FrameGroups, writers: dict[float, ArrayWriter],
                 logits_writer: ArrayWriter | None, top_k_size: int) -> None:
    """The teacher's outputs for ``batches`` (frame indices, the members that score them), written
    into their rows: the average softmax(z/T) per T, and the average zero-mean logits."""

    teacher.eval()
    device = frames.device
    for indices, members in progress(batches, "soft targets", unit="batches"):
        member_logits = teacher.member_logits(frames.context(torch.from_numpy(indices).to(device)), members)
        for t, writer in writers.items():
            SoftTargetStore.fill(writer, indices, average_softmax(member_logits, t).cpu().numpy(), top_k_size)
        if logits_writer is not None:
            logits_writer.arrays["logits"][indices] = average_zero_mean_logits(member_logits).cpu().numpy()


def load_teacher(exp_dir: Path, name: str, device: torch.device) -> EnsembleDNN:
    """The teacher ``name`` (``distill.teacher``): an ensemble's members, or one DNN as an ensemble of one."""
    teacher = load_system(Path(exp_dir), name, device)
    return teacher if isinstance(teacher, EnsembleDNN) else EnsembleDNN([teacher])


def spliced_store(layout: Layout, teacher: EnsembleDNN, store: str, device: torch.device) -> SplicedFrames:
    """The fbank frames of ``store`` in memory on ``device``, with the teacher's context windows."""
    features = FeatureStore.load(layout.fbank(store))
    return SplicedFrames(features, teacher.config["left_context"], teacher.config["right_context"], device)


def fill_part(job: tuple) -> None:
    """One soft-target job: (config, store, {T: (store dir, its arrays)}, logits dir, its batches) -> their rows
    written into the stage's temporary arrays (the rows of other jobs are not touched)."""
    settings, store, temperatures, logits_dir, batches = job
    cfg = OmegaConf.create(settings)
    device = pick_device(cfg.train.device)
    teacher = load_teacher(Path(cfg.exp_dir), str(cfg.distill.teacher), device)
    frames = spliced_store(sections.layout(cfg), teacher, store, device)
    writers = {t: ArrayWriter.reopen(Path(d), list(names)) for t, (d, names) in temperatures.items()}
    logits_writer = ArrayWriter.reopen(Path(logits_dir), ["logits"]) if logits_dir else None
    fill_batches(teacher, frames, batches, writers, logits_writer, int(cfg.distill.top_k))
    for writer in [*writers.values(), *([logits_writer] if logits_writer else [])]:
        writer.flush()


def write_teacher_outputs(cfg, teacher: EnsembleDNN, device: torch.device, num_frames: int, groups: FrameGroups,
                          temperatures: dict[float, Path], logits_dir: Path | None, store: str, checksum: str, dense: bool) -> None:
    """For every frame of the store: the average softmax(z/T) of its group's members for each T
    (in the dense and top-k forms, or with ``dense`` false the top-k form alone: :func:`stores_dense`),
    and with ``logits_dir`` their average zero-mean logits, batch by batch (``eval.batch_size``
    frames of one group). With ``jobs.nj`` > 1 on CPU the batches are dealt out to jobs whole, so
    each frame is scored in the very batch one job would score it in: the stores are identical.
    The frames are read where they are scored (here, or in each job), not both."""
    num_pdfs, top_k_size = teacher.config["num_pdfs"], int(cfg.distill.top_k)
    batch_size = int(cfg.eval.batch_size)
    headers = {t: SoftTargetStore.make_header(t, top_k_size, num_frames, num_pdfs, checksum, dense) for t in temperatures}
    writers = {t: SoftTargetStore.writer(directory, headers[t]) for t, directory in temperatures.items()}
    logits_header = TeacherLogits.make_header(num_frames, num_pdfs, checksum)
    logits_writer = TeacherLogits.writer(logits_dir, logits_header) if logits_dir else None
    batches = [(indices[s : s + batch_size], members) for indices, members in groups for s in range(0, len(indices), batch_size)]
    jobs_of = sections.jobs(cfg)
    if jobs_of.nj <= 1 or device.type != "cpu":  # one device scores fastest in one process
        fill_batches(teacher, spliced_store(sections.layout(cfg), teacher, store, device), batches, writers, logits_writer, top_k_size)
    else:
        for writer in [*writers.values(), *([logits_writer] if logits_writer else [])]:
            writer.flush()
        settings = OmegaConf.to_container(cfg, resolve=True)
        arrays = {t: (str(d), store_arrays(headers[t])) for t, d in temperatures.items()}
        jobs = [(settings, store, arrays, str(logits_dir) if logits_dir else None, part)
                for part in split(batches, jobs_of.nj)]
        map_jobs(jobs_of, fill_part, jobs, f"soft-targets {store}", threads=int(cfg.train.num_threads))
    for t, writer in writers.items():
        writer.close()
        write_json(temperatures[t] / "header.json", headers[t])
    if logits_writer is not None:
        logits_writer.close()
        write_json(logits_dir / "header.json", logits_header)


def pdf_priors(layout: Layout, prior_floor: float) -> np.ndarray:
    """The pdf priors the decoder divides by (the training alignment's pdf frequencies, floored at
    ``decode.prior_floor``): what the compact_prior form spreads its residual by."""
    return np.exp(log_priors(np.load(layout.pdf_counts), prior_floor))


def current_checksum(exp_dir: Path, store: str) -> str:
    """The checksum a store must carry to be used with today's features (and alignment) of ``store``."""
    layout = Layout(Path(exp_dir))
    features = FeatureStore.load(layout.fbank(store))
    ali = layout.alignment(store) / "pdf_ids.npy"
    return source_checksum(features.checksum(), np.load(ali) if ali.is_file() else None)


def teacher_groups(data_dir: Path, store_utts: list[str], offsets: np.ndarray, member_dirs: list[Path]) -> FrameGroups:
    """Which members score which frames: all of them, except for a cross-fitted ensemble, whose
    members recorded the speakers they never saw; an utterance (or a copy of it) of such a
    speaker is scored by exactly those members."""
    everyone = list(range(len(member_dirs)))
    records = [read_record(d) or {"config": {}} for d in member_dirs]
    held_out = [set(record["config"].get("held_out_speakers") or []) for record in records]
    if not any(held_out):
        return [(np.arange(int(offsets[-1])), everyone)]
    full = DataDir.read(Path(data_dir) / "train")
    sources: dict[str, str] = {}
    for directory in Path(data_dir).iterdir():  # copies name their source in utt2uniq
        if (directory / "utt2uniq").is_file():
            sources |= DataDir.read(directory).utt2uniq
    by_members: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i, utt in enumerate(store_utts):
        speaker = full.utt2spk.get(sources.get(utt, utt))
        members = tuple(m for m in everyone if speaker in held_out[m]) or tuple(everyone)
        by_members.setdefault(members, []).append(np.arange(offsets[i], offsets[i + 1]))
    return [(np.concatenate(spans), list(members)) for members, spans in sorted(by_members.items())]


def run(cfg) -> None:
    """Stage: the teacher's average softmax(z/T) per T (and its logits) for every frame of each
    feature store the configured students train on: ``train``'s, a subset's or perturbed copy's
    store (``train.data``), and the stores of ``distill.transfer``'s data dirs."""
    for store in TrainingSet(cfg, list(cfg.distill.transfer)).stores:
        run_store(cfg, store)


def run_store(cfg, store: str) -> None:
    """The soft targets of one feature store (``exp/soft_targets/<teacher>/<store>/...``)."""
    exp, layout = Path(cfg.exp_dir), sections.layout(cfg)
    members = system_dirs(exp, cfg.distill.teacher)
    inputs = {f"teacher {d.name}": d for d in members} | {"features": layout.fbank(store)}
    values = {"teacher": cfg.distill.teacher, "store": store}
    features = FeatureStore.load(layout.fbank(store))  # its index: the frame count and the groups; the frames are read where they are scored
    num_pdfs = int(np.load(layout.pdf_counts, mmap_mode="r").shape[0])  # the tree's pdfs, known before the teacher is loaded
    dense = stores_dense(cfg.distill, features.num_frames, num_pdfs)  # decided once: the fingerprint and the stores agree
    todo = {}
    for t in sorted({float(t) for t in cfg.distill.temperatures}):
        stage = plan(f"soft-targets {cfg.distill.teacher} {store} T={t:g}", store_dir(layout, cfg.distill.teacher, t, store), sections.settings(cfg, ("distill.top_k",)), inputs, {**values, "temperature": t, **({} if dense else {"dense": False})})
        if not stage.up_to_date:
            todo[t] = stage
    logits_stage = None
    if cfg.distill.logit_matching:
        logits_stage = plan(f"soft-targets {cfg.distill.teacher} {store} logits", logits_dir(layout, cfg.distill.teacher, store), sections.settings(cfg, ()), inputs, values)
        logits_stage = None if logits_stage.up_to_date else logits_stage
    if not todo and logits_stage is None:
        return
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    teacher = load_teacher(exp, cfg.distill.teacher, device)
    groups = teacher_groups(layout.data, features.utt_ids, features.offsets, members)
    write_teacher_outputs(cfg, teacher, device, features.num_frames, groups, {t: stage.out_dir for t, stage in todo.items()},
                          logits_stage.out_dir if logits_stage else None, store, current_checksum(exp, store), dense)
    for t, stage in todo.items():
        log.info("soft-targets T=%g: %d frames of %s from %d model(s) in %d group(s)", t, features.num_frames, store,
                 len(teacher.members), len(groups))
        stage.commit(frames=features.num_frames, members=len(teacher.members), groups=len(groups))
    if logits_stage is not None:
        logits_stage.commit(frames=features.num_frames, members=len(teacher.members))
