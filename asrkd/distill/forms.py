"""The target forms a student can learn from, by name: a registry, as torchdistill keeps losses.

A form says where a student's targets lie for each feature store it trains on (the
soft-target stage's stores), how they are read onto the training device, how the teacher gives
them on the fly instead (``distill.on_the_fly``; None: only from a store), whether they are
probabilities or the teacher's logits, and the values its fingerprint records besides: how the
targets are stored, not what the student does with them. The loss is apart
(:mod:`asrkd.distill.losses`, ``distill.loss``): any soft term on any form of probabilities.
Built in: ``dense``, ``topk``, ``compact``, ``compact_prior`` (the stored soft targets at T,
:class:`TargetRows`) and ``logits`` (the teacher's zero-mean logits, §2.1: logit matching). A
new distillation method is one module that calls :func:`register` (or
:func:`asrkd.distill.losses.register_soft_term`) and a config entry: the module in
``distill.methods``, its T's in ``distill.students`` (tests/test_distill.py adds one).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.distill.soft_targets import pdf_priors
from asrkd.distill.target_store import COMPACT_FORMS, SoftTargetStore, TargetRows, TeacherLogits, logits_dir, store_dir

LOGITS = "logits"  # the form name of the logit-matching student


@dataclass(frozen=True)
class TargetForm:
    name: str
    store: Callable[..., Path]  # (cfg, T, feature store name) -> the directory of its targets
    rows: Callable[..., TargetRows]  # (cfg, directory, features checksum, T, num_pdfs, device) -> the targets, resident
    on_the_fly: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None  # (teacher, T) -> batch -> targets
    values: Callable[..., dict] = field(default=lambda cfg: {})  # (cfg) -> what the fingerprint records besides
    logits: bool = False  # the targets are the teacher's logits (logit matching), not probabilities


FORMS: dict[str, TargetForm] = {}


def register(form: TargetForm) -> TargetForm:
    """Make ``form`` known by its name (a later registration of the name replaces it)."""
    FORMS[form.name] = form
    return form


def form_of(dcfg, name: str) -> TargetForm:
    """The registered form ``name``, once the modules of ``distill.methods`` (``dcfg``: the ``distill`` section) have registered theirs."""
    for module in dcfg.get("methods") or []:
        importlib.import_module(str(module))
    if name not in FORMS:
        raise ValueError(f"distill.students names the form {name!r}, which no module registers (known: {', '.join(FORMS)}); "
                         "a new form is a module calling asrkd.distill.forms.register, named in distill.methods")
    return FORMS[name]


def stored_rows(form: str) -> Callable[..., TargetRows]:
    """Reading the soft-target store at T in ``form`` (the compact forms with distill.compact)."""

    def rows(cfg, directory: Path, checksum: str, temperature: float, num_pdfs: int, device: torch.device) -> TargetRows:
        store = SoftTargetStore.load(directory, checksum, temperature, num_pdfs)
        priors = pdf_priors(sections.layout(cfg), float(cfg.decode.prior_floor)) if form == "compact_prior" else None
        return store.rows(form, device, OmegaConf.to_container(cfg.distill.compact), priors)

    return rows


def stored_soft_targets(cfg, temperature: float, store: str) -> Path:
    return store_dir(sections.layout(cfg), cfg.distill.teacher, temperature, store)


register(TargetForm("dense", stored_soft_targets, stored_rows("dense"),
                    on_the_fly=lambda teacher, temperature: lambda batch: teacher.soft_targets(batch, temperature)))
register(TargetForm("topk", stored_soft_targets, stored_rows("topk")))
for _name in COMPACT_FORMS:
    register(TargetForm(_name, stored_soft_targets, stored_rows(_name), values=lambda cfg: {"compact": OmegaConf.to_container(cfg.distill.compact)}))
register(TargetForm(LOGITS, lambda cfg, temperature, store: logits_dir(sections.layout(cfg), cfg.distill.teacher, store),
                    lambda cfg, directory, checksum, temperature, num_pdfs, device: TeacherLogits.load(directory, checksum, num_pdfs).rows(device),
                    on_the_fly=lambda teacher, temperature: teacher.zero_mean_logits, logits=True))
