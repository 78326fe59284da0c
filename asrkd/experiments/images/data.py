"""The image experiment's data (recipes/mnist/run.sh stage 0, ``prepare-images``): the IDX files
read (downloaded when missing), checked and stored as one-frame "utterances" of 784 pixels, and
the training set the nets see, jittered as each net's settings say."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import logging
import urllib.request
from pathlib import Path

import numpy as np
import torch

from asrkd import sections
from asrkd.files import atomic_write, save_npy
from asrkd.nnet.model import SplicedFrames
from asrkd.nnet.training_set import FrameData
from asrkd.parallel import pick_device
from asrkd.stage import plan, read_record
from asrkd.stores import FeatureStore, load_array

log = logging.getLogger(__name__)

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CANONICAL_URLS = {"mnist": "http://yann.lecun.com/exdb/mnist/",
                  "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
SIDE = 28
CLASSES = 10
# The paper's MNIST results (§3), shown beside ours as reference: test errors of 10,000.


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


