"""The statistics behind every interval the reports state: bootstrap over whole test utterances.

Why utterances, not frames: the frames of an utterance share its speaker, its words, its
alignment and (through 26-frame windows) even their inputs, so their errors come in runs; a
frame-level interval would be several times too narrow. Utterances are the unit Bisani & Ney
(2004) resample for WER, and the unit here for frame accuracy too. ``stats.unit=speaker``
resamples whole speakers instead (AN4's test set has only 10, too few for a stable
interval, so it is not the default).

* A rate (frame accuracy, WER) is sum(hits) / sum(totals) over the resampled utterances.
* Systems with several seeds (replicates) have their seeds resampled too (two-level
  bootstrap), so the interval of a mean over seeds holds both the test-set and the seed
  variation; with one seed it is the test-set variation alone, and the reports say so.
* Every system is resampled with the same utterance draws, so a difference (and a ratio such
  as gain kept) is paired, as Bisani & Ney prescribe, and ``p_above_zero`` is the share of
  replicates in which the difference is positive.
* Where the teacher is a draw too (two ensembles of one recipe), a share of its gain draws the
  (student, teacher) pairs with replacement as well (``share_drawn``).

Intervals are percentile intervals of ``stats.replicates`` draws at ``stats.confidence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class UtteranceCounts:
    """Per utterance, per seed: hits (correct frames, or word errors) and totals (frames, words)."""

    utt_ids: list[str]
    hits: np.ndarray  # (seeds, utterances)
    totals: np.ndarray  # (utterances,)

    @classmethod
    def from_tables(cls, tables: list[dict[str, list[int]]]) -> "UtteranceCounts":
        """One {utt: [hits, total]} table per seed; the totals must agree (same test set)."""
        utt_ids = sorted(tables[0])
        totals = np.array([tables[0][u][1] for u in utt_ids], dtype=np.float64)
        for table in tables[1:]:
            if sorted(table) != utt_ids or any(table[u][1] != t for u, t in zip(utt_ids, totals)):
                raise ValueError("replicates were scored on different utterances; rescore them on the same test set")
        return cls(utt_ids, np.array([[t[u][0] for u in utt_ids] for t in tables], dtype=np.float64), totals)

    @property
    def estimate(self) -> float:
        """The mean over seeds of each seed's rate."""
        return float((self.hits.sum(1) / self.totals.sum()).mean())

    def per_seed(self) -> list[float]:
        return (self.hits.sum(1) / self.totals.sum()).tolist()


def frame_table(utt_ids: list[str], offsets: np.ndarray, indices: np.ndarray, hits: np.ndarray) -> dict[str, list[int]]:
    """{utt: [correct frames, frames]} from per-frame hits of the frames ``indices`` of a feature store."""
    owner = np.searchsorted(offsets, indices, side="right") - 1
    correct = np.bincount(owner, weights=hits, minlength=len(utt_ids))
    frames = np.bincount(owner, minlength=len(utt_ids))
    return {utt_ids[i]: [int(correct[i]), int(frames[i])] for i in np.flatnonzero(frames)}


class Bootstrap:
    """Replicates of every statistic on shared utterance draws; see the module docstring.

    ``add(key, counts)`` draws the replicates of a rate once and keeps them, so differences
    and ratios of rates added under different keys are paired.
    """

    def __init__(self, utt_ids: list[str], replicates: int = 10000, confidence: float = 0.95, seed: int = 0,
                 unit_of: dict[str, str] | None = None):
        self.utt_ids, self.replicates, self.confidence = sorted(utt_ids), int(replicates), float(confidence)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        unit_of = unit_of or {u: u for u in self.utt_ids}
        units = sorted(set(unit_of.values()))
        index = {unit: i for i, unit in enumerate(units)}
        draws = self.rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=self.replicates)
        self.weights = draws[:, [index[unit_of[u]] for u in self.utt_ids]].astype(np.float64)  # (B, U)
        self.samples: dict[str, np.ndarray] = {}
        self.estimates: dict[str, float] = {}
        self.counts: dict[str, UtteranceCounts] = {}

    def add(self, key: str, counts: UtteranceCounts) -> dict:
        """Draw (once: a key added again with the same counts keeps its replicates; with other
        counts it is an error, two statistics under one name) and return the interval of a rate."""
        if key in self.samples:
            kept = self.counts[key]
            if kept.utt_ids != counts.utt_ids or not (np.array_equal(kept.hits, counts.hits) and np.array_equal(kept.totals, counts.totals)):
                raise ValueError(f"bootstrap key {key!r} added again with other counts: give each statistic a name of its own")
            return self.interval(key)
        if counts.utt_ids != self.utt_ids:
            missing = sorted(set(self.utt_ids) ^ set(counts.utt_ids))[:3]
            raise ValueError(f"{key}: scored on other utterances than the bootstrap's (e.g. {missing})")
        rates = (counts.hits @ self.weights.T) / (self.weights @ counts.totals)[None, :]  # (seeds, B)
        seeds = len(counts.hits)
        chosen = self.rng.integers(0, seeds, size=(self.replicates, seeds)) if seeds > 1 else np.zeros((self.replicates, 1), int)
        self.samples[key] = rates[chosen, np.arange(self.replicates)[:, None]].mean(1)
        self.estimates[key] = counts.estimate
        self.counts[key] = counts
        return self.interval(key)

    def _summary(self, estimate: float | None, samples: np.ndarray) -> dict:
        alpha = (1 - self.confidence) / 2
        finite = samples[np.isfinite(samples)]
        ci = [float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))] if len(finite) else [None, None]
        return {"estimate": estimate, "ci": ci, "p_above_zero": float((samples > 0).mean())}

    def interval(self, key: str) -> dict:
        """{"estimate", "ci": [lo, hi]} of a rate."""
        summary = self._summary(self.estimates[key], self.samples[key])
        del summary["p_above_zero"]
        return summary

    def difference(self, a: str, b: str) -> dict:
        """a - b, paired: {"estimate", "ci", "p_above_zero"}."""
        return self._summary(self.estimates[a] - self.estimates[b], self.samples[a] - self.samples[b])

    def combine(self, keys: list[str], function: Callable[..., np.ndarray | float]) -> dict:
        """Any function of several rates (gain kept, gap closed), on the same replicates; an estimate
        that is not a number (a share of a gain of exactly 0: every system at 100% WER) is None."""
        with np.errstate(divide="ignore", invalid="ignore"):
            estimate = function(*(np.float64(self.estimates[k]) for k in keys))
            samples = np.asarray(function(*(self.samples[k] for k in keys)), dtype=np.float64)
        estimate = float(estimate) if np.isfinite(estimate) else None
        return self._summary(estimate, samples)

    def share(self, part: str, baseline: str, whole: str) -> dict:
        """(part - baseline) / (whole - baseline): the share of whole's gain over baseline that part keeps.

        A share of a gain that may be zero says nothing (its replicates divide by values on both
        sides of 0): ``whole_gain_ci`` is that gain's interval and ``whole_gain_significant``
        whether it excludes 0; :func:`format_interval` prints such a share as undefined. The one-pair
        case of :meth:`share_drawn` (a single pair drawn every time: the same replicates)."""
        drawn = self.share_drawn([(part, whole)], baseline)
        del drawn["pairs"]
        return drawn

    def share_drawn(self, pairs: list[tuple[str, str]], baseline: str) -> dict:
        """The share of the wholes' mean gain over ``baseline`` that the parts' mean keeps, each
        (part, whole) pair drawn with replacement in every replicate (a student and the teacher
        it learned from; another teacher is another draw of the same recipe): the interval then
        holds which teacher was drawn, as it holds the seeds. Its own generator (seeded from the
        bootstrap's), so the rates' draws, and every other interval, stay as they were."""
        if not pairs:
            raise ValueError("share_drawn: no pairs (part, whole) to draw from")
        parts = np.stack([self.samples[part] for part, _ in pairs])  # (pairs, B)
        wholes = np.stack([self.samples[whole] for _, whole in pairs])
        chosen = np.random.default_rng([self.seed, len(pairs)]).integers(0, len(pairs), size=(self.replicates, len(pairs)))
        columns = np.arange(self.replicates)[:, None]
        part_mean, whole_mean = parts[chosen, columns].mean(1), wholes[chosen, columns].mean(1)
        estimates = {"part": np.mean([self.estimates[part] for part, _ in pairs]), "whole": np.mean([self.estimates[whole] for _, whole in pairs])}
        gain = self._summary(float(estimates["whole"] - self.estimates[baseline]), whole_mean - self.samples[baseline])
        with np.errstate(divide="ignore", invalid="ignore"):
            estimate = (estimates["part"] - self.estimates[baseline]) / (estimates["whole"] - self.estimates[baseline])
            samples = (part_mean - self.samples[baseline]) / (whole_mean - self.samples[baseline])
        lo, hi = gain["ci"]
        return {**self._summary(float(estimate) if np.isfinite(estimate) else None, samples),
                "whole_gain_ci": gain["ci"], "whole_gain_significant": bool(lo > 0 or hi < 0), "pairs": len(pairs)}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation of single-model results (seeds)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else None, "n": len(array),
            "min": float(array.min()), "max": float(array.max())}


def format_interval(summary: dict, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """'55.97% [55.10, 56.84]' (rates) or '+1.96 [+0.81, +3.10]' (differences, in points)."""
    lo, hi = summary["ci"]
    sign = "+" if signed else ""
    if summary["estimate"] is None:
        return "–"
    if summary.get("whole_gain_significant") is False:
        gain_lo, gain_hi = summary["whole_gain_ci"]
        return f"undefined (the gain it is a share of, [{scale * gain_lo:+.{digits}f}, {scale * gain_hi:+.{digits}f}], includes 0)"
    value = f"{scale * summary['estimate']:{sign}.{digits}f}" + ("" if signed else "%")
    bounds = "–" if lo is None else f"{scale * lo:{sign}.{digits}f}, {scale * hi:{sign}.{digits}f}"
    return f"{value} [{bounds}]"
