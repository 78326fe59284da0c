"""The config handed down in sections: what the ground layer's steps need of the composed config,
read here, once per use, into typed values (:class:`asrkd.data.DataSets`, :class:`asrkd.data.Split`,
:class:`asrkd.layout.Layout`, :class:`asrkd.report.Place`, :class:`asrkd.jobs.Jobs`,
:class:`asrkd.stage.Settings`), so that the modules below this one take those values and never the
whole config. Each function is a view of ``cfg``; none changes it. The layer above (kaldi, nnet,
distill, experiments) calls these, where a stage's ``run(cfg)`` starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from asrkd.data import DataSets, Split
from asrkd.jobs import Jobs, cores
from asrkd.layout import Layout
from asrkd.report import Place
from asrkd.stage import Settings


def data_sets(cfg) -> DataSets:
    """``eval_sets``, ``decode.tuning_set`` and ``features.sets``: the data dirs a run builds and scores."""
    features = cfg.features.sets
    return DataSets(tuple(str(s) for s in cfg.eval_sets), str(cfg.decode.tuning_set),
                    None if features is None else tuple(str(s) for s in features))


def split(cfg) -> Split:
    """``data_dir``, ``train.valid_fraction``, ``seed``, ``train.data``: which utterances train and which validate."""
    return Split(Path(cfg.data_dir), float(cfg.train.valid_fraction), int(cfg.seed), str(cfg.train.data))


def layout(cfg) -> Layout:
    """``exp_dir`` and ``data_dir``: where every stage's outputs live."""
    return Layout(Path(cfg.exp_dir), Path(cfg.get("data_dir") or "data"))


def report_place(cfg) -> Place:
    """``exp_dir``'s report dir and ``results_dir``: where a run's reports go."""
    return Place(layout(cfg).report, Path(cfg.results_dir) if cfg.results_dir else None)


def jobs(cfg) -> Jobs:
    """``jobs.*`` and ``exp_dir``: how a stage's jobs run (Kaldi's nj, on this machine or a cluster)."""
    return Jobs(int(cfg.jobs.nj) if cfg.jobs.nj else cores(), str(cfg.jobs.backend), layout(cfg).jobs,
                str(cfg.jobs.submitit.cluster), OmegaConf.to_container(cfg.jobs.submitit.parameters, resolve=True))


def settings(cfg, keys: tuple[str, ...] | list[str]) -> Settings:
    """What a stage reads of the config: the values of ``keys`` (a stage's fingerprint) and ``redo``."""
    return Settings(config_values(cfg, keys), bool(cfg.get("redo", False)))


def config_values(cfg, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The values of ``keys`` (dotted; a group name stands for all keys under it), flattened."""
    out: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, DictConfig):
            for key in value:
                flatten(f"{prefix}.{key}", value[key])
        else:
            out[prefix] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    for key in keys:
        flatten(key, OmegaConf.select(cfg, key, throw_on_missing=True))
    return out


def optional_values(cfg, defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``defaults`` whose config value differs from the default given there: a stage
    records them only then, so outputs made before the keys existed keep their fingerprints."""
    out = {}
    for key, default in defaults.items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if value != default:
            out[key] = value
    return out
