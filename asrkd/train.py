"""Stage: train a hybrid DNN on the forced alignment (cross-entropy on pdf-ids).

Held-out validation speakers, one checkpoint per epoch, resume from the last checkpoint, and
seeded shuffles (seed + epoch), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from asrkd.data import DataDir, split_by_speaker
from asrkd.features import FeatureStore
from asrkd.nnet import EnsembleDNN, HybridDNN, SplicedFrames, pick_device
from asrkd.stage import is_done, mark_done, skip_if_done

log = logging.getLogger(__name__)


@dataclass
class FrameData:
    """Spliced fbank frames of one data set with the pdf-id of every frame (-1: unaligned)."""

    frames: SplicedFrames
    pdf_ids: torch.Tensor
    num_pdfs: int

    @classmethod
    def load(cls, exp_dir: Path, name: str, model_cfg, device: torch.device) -> "FrameData":
        store = FeatureStore.load(exp_dir / "feats" / "fbank" / name, mmap=False)
        ali_dir = exp_dir / "tri" / f"ali_{name}"
        pdf_ids = np.load(ali_dir / "pdf_ids.npy")
        index = json.loads((ali_dir / "index.json").read_text())
        mfcc_index = json.loads((exp_dir / "feats" / "mfcc" / name / FeatureStore.INDEX).read_text())
        if mfcc_index["utt_ids"] != store.utt_ids or mfcc_index["offsets"] != store.offsets.tolist():
            raise ValueError(
                f"{exp_dir}/feats/fbank/{name} and the alignment's mfcc store hold different utterances or "
                "lengths; recompute the features of both (make-feats) and realign"
            )
        if len(pdf_ids) != store.num_frames:
            raise ValueError(f"{ali_dir}/pdf_ids.npy has {len(pdf_ids)} frames, the features {store.num_frames}")
        frames = SplicedFrames(store, model_cfg.left_context, model_cfg.right_context, device)
        return cls(frames, torch.from_numpy(pdf_ids.astype(np.int64)).to(device), int(index["num_pdfs"]))

    def labeled(self, utt_ids: list[str]) -> np.ndarray:
        """Frame indices of ``utt_ids`` that have an alignment."""
        indices = self.frames.frame_indices([u for u in utt_ids if u in self.frames.store])
        return indices[self.pdf_ids.cpu().numpy()[indices] >= 0]


@torch.no_grad()
def evaluate_frames(model: HybridDNN, data: FrameData, indices: np.ndarray, batch_size: int) -> dict[str, float]:
    """Frame accuracy (argmax vs forced alignment) and cross-entropy over ``indices``."""
    model.eval()
    device = data.pdf_ids.device
    correct, loss, total = 0, 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(indices[start : start + batch_size]).to(device)
        logits = model(data.frames.context(batch)).float()
        target = data.pdf_ids[batch]
        correct += int((logits.argmax(-1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        total += len(batch)
    return {"frame_accuracy": correct / max(total, 1), "cross_entropy": loss / max(total, 1), "frames": total}


def latest_checkpoint(out_dir: Path) -> Path | None:
    checkpoints = sorted(out_dir.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, frame indices) -> loss


def train_model(
    cfg, data: FrameData, train_idx: np.ndarray, valid_idx: np.ndarray, out_dir: Path,
    loss_fn: LossFn | None = None, init_seed: int | None = None,
) -> HybridDNN:
    """Training with per-epoch checkpoints; resumes from the last one in ``out_dir``.

    The loss is cross-entropy on the alignment's pdf-ids unless ``loss_fn`` is given (the
    student's distillation loss). ``init_seed`` seeds only the initial weights (ensemble
    members differ in it alone); the frame order always follows ``cfg.seed``.
    """
    tcfg = cfg.train
    device = data.pdf_ids.device
    torch.manual_seed(cfg.seed if init_seed is None else init_seed)
    model = HybridDNN.from_config(data.frames.store.dim, data.num_pdfs, cfg.model).to(device)
    sample = np.random.default_rng(cfg.seed).choice(train_idx, size=min(len(train_idx), 100_000), replace=False)
    sample_frames = data.frames.frames[torch.from_numpy(np.sort(sample)).to(device)].float().cpu().numpy()
    model.set_normalization(sample_frames.mean(0), sample_frames.std(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=tcfg.lr_decay)
    history: list[dict] = []
    first_epoch = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(out_dir)
    if resume is not None:
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, first_epoch = state["history"], state["epoch"] + 1
        log.info("resuming from %s", resume)

    use_bf16 = bool(tcfg.bf16_autocast)
    # training-set accuracy per epoch (the over-fitting curve) on a fixed sample of the training frames
    train_sample = np.sort(np.random.default_rng(cfg.seed).permutation(train_idx)[: int(tcfg.accuracy_sample_frames)])
    for epoch in range(first_epoch, tcfg.epochs):
        tic = time.time()
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(train_idx)
        if tcfg.max_frames_per_epoch:
            order = order[: int(tcfg.max_frames_per_epoch)]
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), tcfg.batch_size):
            batch = torch.from_numpy(order[start : start + tcfg.batch_size]).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(data.frames.context(batch))
            loss = loss_fn(logits, batch) if loss_fn else F.cross_entropy(logits.float(), data.pdf_ids[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
        scheduler.step()
        seconds = time.time() - tic
        valid = evaluate_frames(model, data, valid_idx, cfg.eval.batch_size)
        train_acc = evaluate_frames(model, data, train_sample, cfg.eval.batch_size)["frame_accuracy"]
        record = {"epoch": epoch, "train_cross_entropy": total_loss / max(seen, 1), "train_frame_accuracy": train_acc,
                  "valid_frame_accuracy": valid["frame_accuracy"],
                  "valid_cross_entropy": valid["cross_entropy"], "frames_per_second": seen / seconds, "seconds": seconds}
        history.append(record)
        log.info("epoch %d: train CE %.3f, valid acc %.4f CE %.3f, %.0f frames/s",
                 epoch, record["train_cross_entropy"], valid["frame_accuracy"], valid["cross_entropy"], record["frames_per_second"])
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": history, "epoch": epoch}, out_dir / f"epoch-{epoch}.pt")
    torch.save({"model": model.state_dict(), "config": model.config, "epoch": len(history) - 1}, out_dir / "final.pt")
    # early stopping, kept beside the last epoch: the epoch that generalized best (system "<name>@best")
    best = max(range(len(history)), key=lambda e: history[e]["valid_frame_accuracy"])
    best_state = torch.load(out_dir / f"epoch-{best}.pt", map_location=device, weights_only=False)["model"]
    torch.save({"model": best_state, "config": model.config, "epoch": best}, out_dir / "best.pt")
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    return model


def read_history(model_dir: Path) -> list[dict]:
    """The per-epoch records train_model wrote (loss, frame accuracies, seconds)."""
    return json.loads((Path(model_dir) / "history.json").read_text())


def model_path(exp_dir: Path, system: str) -> Path:
    """``exp/dnn/<name>/final.pt`` (the last epoch), or ``best.pt`` for ``<name>@best`` (early stopping)."""
    name, _, which = system.partition("@")
    return Path(exp_dir) / "dnn" / name / f"{which or 'final'}.pt"


def load_model(path: Path, device: torch.device) -> HybridDNN:
    state = torch.load(path, map_location=device, weights_only=False)
    model = HybridDNN(**state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model


def load_system(exp_dir: Path, system: str, device: torch.device) -> HybridDNN | EnsembleDNN:
    """The model of a DNN system: ``<name>[@best]`` under exp/dnn, or an ensemble's directory
    (``exp/dnn/<name>/member-<i>``), whose members' average softmax is its prediction."""
    name, at, which = system.partition("@")
    members = sorted((Path(exp_dir) / "dnn" / name).glob("member-*"), key=lambda d: int(d.name.split("-")[1]))
    if not members:
        return load_model(model_path(exp_dir, system), device)
    missing = [d.name for d in members if not is_done(d)]
    if missing:
        raise FileNotFoundError(f"ensemble {name}: members {missing} have not finished training (train-ensemble)")
    return EnsembleDNN([load_model(model_path(exp_dir, f"{name}/{d.name}{at}{which}"), device) for d in members])


def data_split(cfg) -> tuple[list[str], list[str]]:
    """Training and validation utterances: whole speakers of ``train`` held out for validation.

    The split is made on the full training set, so a run on a subset (``train.data``) is
    validated on the same speakers as the full run; the subset's utterances of those
    speakers are left out of its training.
    """
    full = DataDir.read(Path(cfg.data_dir) / "train")
    train, valid = split_by_speaker(full, cfg.train.valid_fraction, cfg.seed)
    if cfg.train.data != "train":
        subset = set(DataDir.read(Path(cfg.data_dir) / cfg.train.data).utt_ids)
        held_out = len(subset & set(valid))
        train = [u for u in train if u in subset]
        if held_out:
            log.info("%s: %d utterances are of validation speakers and are not trained on", cfg.train.data, held_out)
    return train, valid


def prepare_training(cfg) -> tuple[FrameData, np.ndarray, np.ndarray]:
    """The training set's frames and the labeled frame indices of its training and validation speakers."""
    torch.set_num_threads(int(cfg.train.num_threads))
    device = pick_device(cfg.train.device)
    data = FrameData.load(Path(cfg.exp_dir), "train", cfg.model, device)
    train_utts, valid_utts = data_split(cfg)
    train_idx, valid_idx = data.labeled(train_utts), data.labeled(valid_utts)
    log.info("%d training frames (%d utts), %d validation frames (%d utts), %d pdfs, device %s",
             len(train_idx), len(train_utts), len(valid_idx), len(valid_utts), data.num_pdfs, device)
    return data, train_idx, valid_idx


def run(cfg) -> None:
    out_dir = Path(cfg.exp_dir) / "dnn" / cfg.train.name
    if skip_if_done(out_dir, f"train-dnn {cfg.train.name}"):
        return
    train_model(cfg, *prepare_training(cfg), out_dir)
    mark_done(out_dir)
