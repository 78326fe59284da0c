"""A GMM-HMM acoustic model as the GMM stages keep it (``model.pkl``: the tree, the transition
model, the GMMs; Kaldi's objects from ``kaldi-hmm-gmm``) and how one is first made: the HMM
topology of the lang, single Gaussians from global moments, the model of a tree and its
Gaussians. Read by alignment, training, graph building and decoding."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import kaldi_hmm_gmm as khg
import numpy as np

from asrkd.files import atomic_write
from asrkd.kaldi.lang import Lang


@dataclass
class GmmModel:
    """A tree, the transition model built from it and one GMM per pdf-id."""

    tree: khg.ContextDependency
    trans_model: khg.TransitionModel
    am: khg.AmDiagGmm

    @property
    def num_pdfs(self) -> int:
        return self.am.num_pdfs

    def tid_to_pdf(self) -> np.ndarray:
        return np.asarray(self.trans_model.transition_id_to_pdf_array(), dtype=np.int64)

    def save(self, directory: Path) -> None:
        with atomic_write(directory / "model.pkl") as tmp, open(tmp, "wb") as out:
            pickle.dump({"tree": self.tree, "trans_model": self.trans_model, "am": self.am}, out)
        with atomic_write(directory / "tree") as tmp:
            self.tree.write(binary=True, filename=str(tmp))

    @classmethod
    def load(cls, directory: Path) -> "GmmModel":
        with open(Path(directory) / "model.pkl", "rb") as f:
            return cls(**pickle.load(f))


def read_topology(lang: Lang) -> khg.HmmTopology:
    topo = khg.HmmTopology()
    topo.read(lang.topology_text())
    return topo


def single_gaussian(count: float, total: np.ndarray, sumsq: np.ndarray, var_floor: float) -> khg.DiagGmm:
    mean = total / count
    var = np.maximum(sumsq / count - mean * mean, var_floor)
    gmm = khg.DiagGmm(nmix=1, dim=len(mean))
    gmm.set_weights(np.ones(1, dtype=np.float32))
    gmm.set_means(mean[None, :].astype(np.float32))
    gmm.set_invvars((1.0 / var)[None, :].astype(np.float32))
    gmm.compute_gconsts()
    return gmm


def global_moments(frames: np.ndarray, spans: list[tuple[int, int]] | None = None,
                   block_rows: int = 1 << 16) -> tuple[int, np.ndarray, np.ndarray]:
    """Frame count, sum and sum of squares (float64) of the rows of ``frames`` in ``spans``
    ((start, end) row ranges, in order; default: every row), a block of rows at a time: a
    memory-mapped store is never read whole. Rows are added in order, each block's first row to the
    running sums, so the sums are bit for bit those of one ``sum(0)`` over the rows (numpy adds an
    axis-0 reduction row by row)."""
    total = sumsq = np.zeros(frames.shape[1])
    count = 0
    for first, last in [(0, len(frames))] if spans is None else spans:
        for start in range(first, last, block_rows):
            block = np.asarray(frames[start:min(start + block_rows, last)], dtype=np.float64)
            if count == 0:
                total, sumsq = block.sum(0), (block**2).sum(0)
            else:
                total, sumsq = np.vstack([total, block]).sum(0), np.vstack([sumsq, block**2]).sum(0)
            count += len(block)
    return count, total, sumsq


def contiguous(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` (sorted row ranges) with adjacent ones joined: fewer, longer reads."""
    joined: list[tuple[int, int]] = []
    for start, end in spans:
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def make_model(tree: khg.ContextDependency, topo: khg.HmmTopology, gaussians: list[khg.DiagGmm]) -> GmmModel:
    am = khg.AmDiagGmm()
    for gmm in gaussians:
        am.add_pdf(gmm)
    return GmmModel(tree, khg.TransitionModel(ctx_dep=tree, hmm_topo=topo), am)
