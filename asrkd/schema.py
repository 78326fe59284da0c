"""The config's types, checked before any stage touches its outputs.

The schema is ``conf/config.yaml`` itself: a key takes values of its default's type (an
integer, a number, a string, a flag, a list of the same kind of items as the default's), and
``DECLARED`` gives the type of the keys whose default does not show it (a null default, an
option that may also be null, a word from a fixed set). A composed config whose value does not
fit is a ConfigError of one line naming the key, the value and the type expected, raised by
``asrkd.cli.load_config``, so ``train.epochs=l2 --redo`` fails before anything is planned,
locked, set aside or written.

Keys added with Hydra's ``+`` that neither the defaults nor ``DECLARED`` know are let through
(that is what ``+`` is for); misspelled keys never get here (Hydra refuses them, and
``asrkd.cli`` names the nearest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An override names a key or option the config does not have, or gives a value of another type."""


@dataclass(frozen=True)
class Kind:
    """What a key takes: ``types`` (of Python values), ``nullable``, ``choices`` for strings,
    ``item`` for the items of a list."""

    types: tuple[type, ...]
    nullable: bool = False
    choices: tuple[str, ...] = ()
    item: "Kind | None" = None

    def describe(self) -> str:
        names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
        text = " or ".join(dict.fromkeys(names[t] for t in self.types if not (t is int and float in self.types)))
        if self.choices:
            text = "one of " + ", ".join(self.choices) + (" or true/false" if bool in self.types else "")
        if self.item is not None:
            item = self.item.describe()
            for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"), ("a list", "lists")):
                item = item.replace(one, many, 1) if item.startswith(one) else item
            text = "a list of " + item
        return text + (" or null" if self.nullable else "")


NUMBER, INTEGER, STRING = Kind((int, float)), Kind((int,)), Kind((str,))

# Keys whose default does not say their type.
DECLARED: dict[str, Kind] = {
    "corpus_dir": Kind((str,), nullable=True),
    "results_dir": Kind((str,), nullable=True),
    "features.sets": Kind((list,), nullable=True, item=STRING),
    "features.channel": Kind((int,), nullable=True),
    "train.max_frames_per_epoch": Kind((int,), nullable=True),
    "train.shuffle_block_frames": Kind((int,), nullable=True),
    "train.compile": Kind((str,), nullable=True),
    "train.max_norm": Kind((int, float), nullable=True),
    "train.patience": Kind((int,), nullable=True),
    "train.device": Kind((str,), choices=("auto", "cpu", "cuda")),
    "train.lr_scaling": Kind((str,), choices=("none", "sqrt", "linear")),
    "ensemble.fused": Kind((str, bool), choices=("auto",)),
    "distill.epochs": Kind((int,), nullable=True),
    "distill.transfer": Kind((list,), item=STRING),
    "distill.methods": Kind((list,), item=STRING),
    "distill.store_dense": Kind((str, bool), choices=("auto",)),
    "decode.unseen_sentences": Kind((list,), item=STRING),
    "graph.lm_arpa": Kind((str,), nullable=True),
    "function_matching.subset.view": Kind((str,), nullable=True),
    "function_matching.plateau": Kind((int, float), nullable=True),
    "function_matching.train_kinds": Kind((list,), item=Kind((str,), choices=("hard", "consistent", "precomputed"))),
    "graph.lm_text": Kind((list,), item=STRING),
    "levers.cross_fitted": Kind((dict,), nullable=True),
    "levers.seeds": Kind((int,), nullable=True),
    "levers.student_epochs": Kind((list,), item=INTEGER),
    "chains.epochs": Kind((int,), nullable=True),
    "self_distillation.head_width": Kind((int,), nullable=True),
    "specialists.group_size": Kind((int,), nullable=True),
    "specialists.epochs": Kind((int,), nullable=True),
    "specialists.random_half": Kind((str,), choices=("remainder", "all")),
    "images.dataset": Kind((str,), choices=("fashion-mnist", "mnist")),
    "images.teacher": Kind((str,), choices=("net", "ensemble")),
    "images.download_url": Kind((str,), nullable=True),
    "images.big_variants": Kind((dict,), nullable=True),
    "images.function_matching": Kind((dict,), nullable=True),
    "stats.unit": Kind((str,), choices=("utterance", "speaker")),
    "jobs.nj": Kind((int,), nullable=True),
    "jobs.backend": Kind((str,), choices=("local", "submitit")),
    "jobs.submitit.cluster": Kind((str,), choices=("slurm", "local", "debug")),
    "log_level": Kind((str,), choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    "model.init": Kind((str,), choices=("default", "he")),
}


def kind_of(value: Any) -> Kind | None:
    """The kind a default value shows (None: a null default, which DECLARED must type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return Kind((bool,))
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return NUMBER
    if isinstance(value, str):
        return STRING
    if isinstance(value, list):
        items = [kind_of(v) for v in value]
        if items and all(k is not None and k.types == items[0].types for k in items):
            return Kind((list,), item=NUMBER if items[0] in (INTEGER, NUMBER) else items[0])
        return Kind((list,), item=NUMBER if items and all(k in (INTEGER, NUMBER) for k in items) else None)
    return Kind((dict,))


def fits(value: Any, kind: Kind) -> bool:
    if value is None:
        return kind.nullable
    if isinstance(value, bool):
        return bool in kind.types
    if isinstance(value, (int, float)) and str in kind.types and int not in kind.types and not kind.choices:
        return True  # a name Hydra parsed as a number (train.name=2024): used as its text
    if not isinstance(value, kind.types) or (isinstance(value, float) and float not in kind.types):
        return False
    if isinstance(value, str) and kind.choices and value not in kind.choices:
        return False
    return kind.item is None or not isinstance(value, list) or all(fits(v, kind.item) for v in value)


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a plain (resolved) config tree; sections recurse,
    values that are mappings of a key typed ``dict`` stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (name in DECLARED and dict in DECLARED[name].types):
            out.update(leaves(value, f"{name}."))
        else:
            out[name] = value
    return out


def validate(cfg: DictConfig, defaults: dict[str, Any]) -> None:
    """Raise a one-line ConfigError for the first key of ``cfg`` whose value does not fit its type;
    ``defaults``: the config without overrides (but the model's), as a plain tree."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {str(err).splitlines()[0]}") from None
    reference = leaves(defaults)
    for key, value in leaves(resolved).items():
        kind = DECLARED.get(key) or (kind_of(reference[key]) if key in reference else None)
        if kind is None or fits(value, kind):
            continue
        shown = "null" if value is None else repr(value)
        default = f" (default: {reference[key]!r})" if reference.get(key) is not None else ""
        raise ConfigError(f"config: {key}={shown} is not {kind.describe()}{default}")
