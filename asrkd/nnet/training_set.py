"""The frames a model trains and is scored on (stage 4 and every later training): the feature
stores that hold a data dir's utterances, the frames with their pdf-ids and 26-frame windows
(:class:`FrameData`), the training set of a run (``train.data``, a transfer set, the validation
speakers), seeded epoch orders, and predictions and frame accuracy on any frames."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from asrkd import sections
from asrkd.data import DataDir, without_valid
from asrkd.layout import Layout
from asrkd.nnet.model import HybridDNN, SplicedFrames
from asrkd.parallel import pick_device
from asrkd.progress import trim_heap
from asrkd.stage import is_complete
from asrkd.stores import FeatureStore, load_array

log = logging.getLogger(__name__)


@dataclass
class FrameData:
    """Spliced fbank frames of one feature store with the pdf-id of every frame (-1: unaligned).

    ``pdf_ids`` are the alignment's int32 as stored, memory-mapped on the CPU (nothing per frame
    is held in memory; a store and its alignment larger than memory train as well): the losses
    take them as int64 a batch at a time."""

    frames: SplicedFrames
    pdf_ids: torch.Tensor
    num_pdfs: int
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to training batches' inputs (images: jitter)
    normalize_inputs: bool = True  # models learn the training frames' mean and std (False: inputs used as they are)

    @classmethod
    def load(cls, exp_dir: Path, name: str, model_cfg, device: torch.device, require_alignment: bool = True) -> "FrameData":
        """Features of ``exp/feats/fbank/<name>`` and the alignment ``exp/tri/ali_<name>``, checked
        against each other. Without an alignment (unlabeled audio, ``require_alignment=False``)
        every frame is -1: it can carry soft targets only."""
        layout = Layout(Path(exp_dir))
        store_path = layout.fbank(name)
        store = FeatureStore.load(store_path)
        utts = store.nonfinite_utterances()
        if utts:
            raise ValueError(f"{store_path}: NaN/inf features in {len(utts)} utterance(s), e.g. {utts[:3]}; rerun make-feats with redo=true")
        ali_dir = layout.alignment(name)
        if not (ali_dir / "pdf_ids.npy").is_file():
            if require_alignment:
                raise FileNotFoundError(f"{ali_dir}: no alignment of {name}; run `asrkd align features.sets=[{name}]`")
            num_pdfs = json.loads((layout.gmm / "log.json").read_text())["tri"]["num_pdfs"]
            pdf_ids = np.full(store.num_frames, -1, dtype=np.int32)
        else:
            pdf_ids = load_array(ali_dir / "pdf_ids.npy", True, "align", writable=True)  # int32, mapped: no copy in memory
            num_pdfs = int(json.loads((ali_dir / "index.json").read_text())["num_pdfs"])
            mfcc_index = json.loads((layout.mfcc(name) / FeatureStore.INDEX).read_text())
            if mfcc_index["utt_ids"] != store.utt_ids or mfcc_index["offsets"] != store.offsets.tolist():
                raise ValueError(f"{store_path} and the alignment's mfcc store hold different utterances or lengths; "
                                 "recompute the features of both (make-feats) and realign")
            if len(pdf_ids) != store.num_frames:
                raise ValueError(f"{ali_dir}/pdf_ids.npy has {len(pdf_ids)} frames, the features {store.num_frames}; realign")
            if pdf_ids.max(initial=-1) >= num_pdfs or pdf_ids.min(initial=-1) < -1:
                raise ValueError(f"{ali_dir}/pdf_ids.npy holds pdf-ids outside [0, {num_pdfs}) (max {pdf_ids.max()}); "
                                 "it belongs to another model: realign")
        frames = SplicedFrames(store, model_cfg.left_context, model_cfg.right_context, device)
        return cls(frames, torch.from_numpy(pdf_ids).to(device), num_pdfs)

    @classmethod
    def combine(cls, parts: list["FrameData"]) -> "FrameData":
        """The frames of several stores end to end (a transfer set in a store of its own): each
        part's frames start where the previous part's end; windows never cross utterances."""
        if len(parts) == 1:
            return parts[0]
        store = FeatureStore.concat([part.frames.store for part in parts])
        pdfs = {part.num_pdfs for part in parts}
        if len(pdfs) > 1:
            raise ValueError(f"the stores' alignments come from models with different numbers of pdfs {sorted(pdfs)}; realign them")
        first = parts[0].frames
        frames = SplicedFrames(store, first.left, first.right, first.device)
        return cls(frames, torch.cat([part.pdf_ids for part in parts]), pdfs.pop())

    def indices(self, utt_ids: list[str]) -> np.ndarray:
        """Frame indices of ``utt_ids`` (those in the store), aligned or not."""
        return self.frames.frame_indices([u for u in utt_ids if u in self.frames.store])

    def labeled(self, utt_ids: list[str]) -> np.ndarray:
        """Frame indices of ``utt_ids`` that have an alignment."""
        indices = self.indices(utt_ids)
        return indices[self.pdf_ids.cpu().numpy()[indices] >= 0]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: FrameData, indices: np.ndarray, batch_size: int) -> torch.Tensor:
    """(frames, outputs) logits of ``model`` on the frames ``indices``, in batches."""
    model.eval()
    device = data.pdf_ids.device
    return torch.cat([model(data.frames.context(torch.from_numpy(indices[s : s + batch_size]).to(device))).float()
                      for s in range(0, len(indices), batch_size)])


@torch.no_grad()
def evaluate_frames(model: HybridDNN, data: FrameData, indices: np.ndarray, batch_size: int, targets: torch.Tensor | None = None) -> dict:
    """Frame accuracy (argmax vs forced alignment) and cross-entropy over ``indices``; ``hits``
    is 1 for every frame whose argmax is the alignment's (for per-utterance statistics).
    ``targets`` (one class per frame) replaces the alignment for a model over other classes
    (a specialist's group and dustbin)."""
    model.eval()
    device = data.pdf_ids.device
    targets = data.pdf_ids if targets is None else targets
    hits = np.zeros(len(indices), dtype=np.int8)
    loss = 0.0
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(indices[start : start + batch_size]).to(device)
        logits = model(data.frames.context(batch)).float()
        target = targets[batch]
        hits[start : start + len(batch)] = (logits.argmax(-1) == target).cpu().numpy()
        loss += float(F.cross_entropy(logits, target.long(), reduction="sum"))
    total = len(indices)
    return {"frame_accuracy": float(hits.sum()) / max(total, 1), "cross_entropy": loss / max(total, 1), "frames": total, "hits": hits}


def epoch_order(train_idx: np.ndarray, rng: np.random.Generator, block_frames: int | None) -> np.ndarray:
    """The frames of an epoch in the order they are trained: a permutation of ``train_idx``, or
    with ``block_frames`` (train.shuffle_block_frames) its frames in store order cut into blocks
    of that many, the blocks in random order and the frames shuffled within each, as Kaldi's egs
    archives are: a store read through its memory map is then read a block at a time, near
    sequentially, instead of at random over the whole file (what a store larger than the page
    cache needs), at the price of batches drawn from fewer utterances."""
    if not block_frames:
        return rng.permutation(train_idx)
    frames = np.sort(train_idx)
    blocks = [frames[start : start + int(block_frames)] for start in range(0, len(frames), int(block_frames))]
    return np.concatenate([rng.permutation(blocks[b]) for b in rng.permutation(len(blocks))]) if blocks else frames


def store_for(exp_dir: Path, utts: set[str]) -> str | None:
    """The smallest complete fbank store that holds all ``utts`` (a subset of train uses train's), or None."""
    candidates = []
    for directory in Layout(Path(exp_dir)).feature_stores("fbank"):
        if is_complete(directory):
            held = FeatureStore.utterances(directory)
            if utts <= set(held):
                candidates.append((len(held), directory.name))
    return min(candidates)[1] if candidates else None


def stores_for(exp_dir: Path, groups: dict[str, set[str]]) -> list[str]:
    """The feature stores that hold the utterances of ``groups`` (data dir -> utterances): one
    when a store holds them all, else the smallest store of each data dir, in order."""
    single = store_for(exp_dir, set().union(*groups.values()))
    if single is not None:
        return [single]
    stores = []
    for name, utts in groups.items():
        store = store_for(exp_dir, utts)
        if store is None:
            raise FileNotFoundError(f"no feature store in {exp_dir}/feats/fbank holds the {len(utts)} utterances of {name} "
                                    f"(e.g. {sorted(utts)[:2]}); run make-feats features.sets=[{name}]")
        if store not in stores:
            stores.append(store)
    return stores


class TrainingSet:
    """What a model trains on: the labeled utterances of ``train.data``, optionally a transfer set
    (data dirs whose frames carry soft targets only; no alignment or transcript needed), and
    the validation utterances.

    Construction is cheap (utterance lists, the feature stores that hold them, the input paths
    a stage fingerprints); ``load`` reads the frames once, the stores end to end when the
    transfer set has a store of its own (``parts``: store name -> first frame).
    """

    def __init__(self, cfg, transfer: list[str] | tuple[str, ...] = ()):
        self.cfg, self.exp, self.layout = cfg, Path(cfg.exp_dir), sections.layout(cfg)
        self.train_utts, self.valid_utts = sections.split(cfg).utterances()
        valid = set(self.valid_utts)
        data_dir = Path(cfg.data_dir)
        transfer_sets = {name: without_valid(DataDir.read(data_dir / name), valid, name) for name in transfer}
        self.transfer_utts = sorted({u for utts in transfer_sets.values() for u in utts})
        groups = {cfg.train.data: set(self.train_utts), "train": valid} | {name: set(utts) for name, utts in transfer_sets.items()}
        self.stores = stores_for(self.exp, groups)
        self.inputs: dict[str, Path] = {"data": data_dir / cfg.train.data, "split": data_dir / "train"}
        for i, store in enumerate(self.stores):
            suffix = "" if i == 0 else f" {store}"
            self.inputs[f"features{suffix}"] = self.layout.fbank(store)
            if i == 0 or self.layout.alignment(store).is_dir():
                self.inputs[f"alignment{suffix}"] = self.layout.alignment(store)
        self.inputs |= {f"transfer {name}": data_dir / name for name in transfer}
        self.parts: dict[str, int] = {}
        self._loaded: tuple | None = None
        self._parent: TrainingSet | None = None

    def without(self, excluded: Callable[[str], bool]) -> "TrainingSet":
        """The same set without the training utterances ``excluded`` picks (a cross-fitted member's);
        the frames are shared, not loaded again."""
        view = copy.copy(self)
        view.train_utts = [u for u in self.train_utts if not excluded(u)]
        view.transfer_utts = [u for u in self.transfer_utts if not excluded(u)]
        view._parent, view._loaded = self._parent or self, None
        return view

    def load(self) -> tuple[FrameData, np.ndarray, np.ndarray, torch.Tensor]:
        """(frames, training frame indices, validation frame indices, hard targets: pdf-id or -1)."""
        if self._loaded is None:
            if self._parent is not None:
                data, _, valid_idx, _ = self._parent.load()
                self.parts = self._parent.parts
            else:
                torch.set_num_threads(int(self.cfg.train.num_threads))
                device = pick_device(self.cfg.train.device)
                parts = [FrameData.load(self.exp, store, self.cfg.model, device, require_alignment=i == 0) for i, store in enumerate(self.stores)]
                starts = np.cumsum([0] + [part.frames.store.num_frames for part in parts])
                self.parts = {store: int(start) for store, start in zip(self.stores, starts)}
                data = FrameData.combine(parts)
                valid_idx = data.labeled(self.valid_utts)
            labeled = data.labeled(self.train_utts)
            if self.transfer_utts:  # the hard term only where train.data is aligned, none on the transfer set's frames
                hard = torch.full_like(data.pdf_ids, -1)
                index = torch.from_numpy(labeled).to(hard.device)
                hard[index] = data.pdf_ids[index]
            else:  # every training frame is one of train.data's aligned ones: the alignment as it is, not a copy
                hard = data.pdf_ids
            train_idx = np.union1d(labeled, data.indices(self.transfer_utts)) if self.transfer_utts else labeled
            log.info("%d training frames (%d labeled, %d utts + %d transfer utts), %d validation frames (%d utts), %d pdfs, "
                     "stores %s, device %s", len(train_idx), len(labeled), len(self.train_utts), len(self.transfer_utts),
                     len(valid_idx), len(self.valid_utts), data.num_pdfs, "+".join(self.stores), hard.device)
            self._loaded = (data, train_idx, valid_idx, hard)
            trim_heap()  # the index temporaries of the selection above, kept by the heap otherwise (bytes a frame)
        return self._loaded
