"""The config's types, checked before any stage touches its outputs.

The schema is the config's defaults themselves (``conf/config.yaml`` and each experiment's
``<section>.yaml``): a key takes values of its default's type (an
integer, a number, a string, a flag, a list of the same kind of items as the default's), and
``DECLARED`` gives the type of the keys whose default does not show it (a null default, an
option that may also be null, a word from a fixed set). A composed config whose value does not
fit is a ConfigError of one line naming the key, the value and the type expected, raised by
``asrkd.cli.load_config``, so ``train.epochs=l2 --redo`` fails before anything is planned,
locked, set aside or written.

A number must also lie in its key's range (``RANGES``: fractions in (0, 1), counts at least 1,
rates above 0, dropout in [0, 1)): ``train.valid_fraction=10`` (a percentage given for a
fraction) would train on no frame at all, and is refused here in one line naming the key, the
value and the range.

A key neither the defaults nor ``DECLARED`` know is refused however it is written, Hydra's
``+key=`` too, with the nearest known key; only the sections that are mappings of names
(``OPEN``: a student form's temperatures, a view, a big-net variant, a scheduler's parameters)
take new entries.

These three are the shared sections' (``SHARED``); an experiment's section (its folder's
``<section>.yaml``) brings its own as a :class:`ConfigTypes` on its ``Experiment``, which
``asrkd.cli`` joins to these: the types of a key live beside its default.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any



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
    "ensemble.first_seed": Kind((int,), nullable=True),
    "gmm.seed": Kind((int,), nullable=True),
    "distill.epochs": Kind((int,), nullable=True),
    "distill.transfer": Kind((list,), item=STRING),
    "distill.methods": Kind((list,), item=STRING),
    "distill.store_dense": Kind((str, bool), choices=("auto",)),
    "decode.unseen_sentences": Kind((list,), item=STRING),
    "graph.lm_arpa": Kind((str,), nullable=True),
    "graph.lm_text": Kind((list,), item=STRING),
    "stats.unit": Kind((str,), choices=("utterance", "speaker")),
    "jobs.nj": Kind((int,), nullable=True),
    "jobs.backend": Kind((str,), choices=("local", "submitit")),
    "jobs.submitit.cluster": Kind((str,), choices=("slurm", "local", "debug")),
    "log_level": Kind((str,), choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    "model.init": Kind((str,), choices=("default", "he")),
}


@dataclass(frozen=True)
class Range:
    """The numbers a key takes, written as an interval: ``(0, 1)``, ``[1, inf)``, ``[0, 1)``."""

    text: str

    def holds(self, value: float) -> bool:
        low_open, low, high, high_open = self.text[0] == "(", *map(float, self.text[1:-1].split(",")), self.text[-1] == ")"
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return math.isfinite(value) and above and below


FRACTION, SHARE, COUNT, SIZE, POSITIVE, NONNEGATIVE, PROBABILITY = (
    Range("(0, 1)"), Range("(0, 1]"), Range("[1, inf)"), Range("[0, inf)"), Range("(0, inf)"), Range("[0, inf)"), Range("[0, 1)"))

# The range of every numeric key (a list's items each): the first pattern that matches a key
# (fnmatch, on the dotted name) gives its range. Keys none matches take any finite number.
RANGES: tuple[tuple[str, Range], ...] = (
    ("train.valid_fraction", FRACTION),
    ("prep.subset_fractions", SHARE),
    ("prep.max_drop_fraction", Range("[0, 1]")), ("decode.oov_warning", Range("[0, 1]")),
    ("decode.prior_floor", FRACTION), ("stats.confidence", FRACTION), ("lang.sil_prob", PROBABILITY),
    ("distill.compact.max_residual", FRACTION),
    ("*dropout", PROBABILITY),
    ("*lr_decay", SHARE),
    ("*.lr", POSITIVE), ("*learning_rates", POSITIVE), ("*temperature*", POSITIVE), ("*beam", POSITIVE), ("*acoustic_scale", POSITIVE),
    ("*_scale", NONNEGATIVE), ("perturb.speeds", POSITIVE),
    ("*max_norm", POSITIVE), ("distill.compact.budget", POSITIVE), ("features.frame_*_ms", POSITIVE),
    ("features.sample_rate", COUNT),
    ("model.left_context", SIZE), ("model.right_context", SIZE), ("ensemble.folds", SIZE), ("*warmup_steps", SIZE),
    ("train.accuracy_sample_frames", SIZE), ("features.dither", NONNEGATIVE), ("*weight_decay", NONNEGATIVE),
    ("*_weight", NONNEGATIVE), ("*noise_std", NONNEGATIVE), ("*mixup_alpha", POSITIVE), ("*_masks", SIZE),
    ("*_width", SIZE), ("distill.dense_limit_gb", NONNEGATIVE), ("*seed", SIZE),
    ("*.jitter", SIZE),
    ("*epochs", COUNT), ("*batch_size", COUNT), ("*seeds", COUNT), ("distill.seeds.*", COUNT), ("*patience", COUNT),
    ("model.num_hidden_layers", COUNT), ("model.hidden_dim", COUNT), ("*.layers", COUNT), ("*widths", COUNT), ("*.width", COUNT),
    ("*num_*", COUNT), ("*total_gauss", COUNT), ("*max_leaves", COUNT), ("*min_count", NONNEGATIVE), ("*min_gain", NONNEGATIVE),
    ("*var_floor", POSITIVE), ("*occupancy", NONNEGATIVE), ("*realign_iters", COUNT), ("gmm.mixup.*", NONNEGATIVE),
    ("graph.lm_order", COUNT), ("decode.lmwt", POSITIVE), ("decode.word_ins_penalty", Range("[-inf, inf]")),
    ("*top_k", COUNT), ("*top_n", COUNT), ("distill.students.*", POSITIVE), ("*replicates", COUNT),
    ("*lr_reference_batch", COUNT), ("*shuffle_block_frames", COUNT),
    ("*max_frames_per_epoch", COUNT), ("*nproc", COUNT), ("jobs.nj", COUNT), ("*timeout_min", POSITIVE),
    ("ensemble.size", COUNT),
)

# Sections that are mappings of names: ``+key=`` may add an entry there (and only there).
OPEN = ("distill.students.", "distill.seeds.", "jobs.submitit.parameters.")


@dataclass(frozen=True)
class ConfigTypes:
    """What the defaults of some sections do not show: ``declared`` (as ``DECLARED``), ``ranges``
    (as ``RANGES``; an experiment's, naming its own keys, are matched before the shared patterns)
    and ``open`` (as ``OPEN``)."""

    declared: dict[str, Kind] = field(default_factory=dict)
    ranges: tuple[tuple[str, Range], ...] = ()
    open: tuple[str, ...] = ()

    def joined(self, other: "ConfigTypes") -> "ConfigTypes":
        """These and ``other``'s; ``other``'s ranges are matched first."""
        return ConfigTypes({**self.declared, **other.declared}, other.ranges + self.ranges, self.open + other.open)

    def range_of(self, key: str) -> Range | None:
        """The range of ``key``'s numbers (None: any finite number)."""
        return next((bounds for pattern, bounds in self.ranges if fnmatch.fnmatchcase(key, pattern)), None)


SHARED = ConfigTypes(DECLARED, RANGES, OPEN)


def numbers(value: Any) -> list[float]:
    """The numbers of a value: itself, or a list's items (nested lists too); flags are no numbers."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return []


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


def leaves(tree: Any, declared: dict[str, Kind], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a plain (resolved) config tree; sections recurse,
    values that are mappings of a key ``declared`` ``dict`` stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (name in declared and dict in declared[name].types):
            out.update(leaves(value, declared, f"{name}."))
        else:
            out[name] = value
    return out


def validate(resolved: dict[str, Any], defaults: dict[str, Any], types: ConfigTypes = SHARED) -> None:
    """Raise a one-line ConfigError for the first key of ``resolved`` (a composed config as a plain
    tree, interpolations resolved) whose value does not fit its type; ``defaults``:
    the config without overrides (but the model's), as a plain tree; ``types``: what its defaults
    do not show (the shared sections' joined to the experiments')."""
    reference = leaves(defaults, types.declared)
    sections = {key.rsplit(".", depth)[0] for key in reference for depth in range(1, key.count(".") + 1)}
    for key, value in leaves(resolved, types.declared).items():
        if key not in reference and key not in types.declared and key not in sections and not key.startswith(types.open):
            near = difflib.get_close_matches(key, list(reference), n=1, cutoff=0.6)
            raise ConfigError(f"config: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "; see conf/config.yaml and asrkd/experiments/*/*.yaml"))
        kind = types.declared.get(key) or (kind_of(reference[key]) if key in reference else None)
        shown = "null" if value is None else repr(value)
        default = f" (default: {reference[key]!r})" if reference.get(key) is not None else ""
        if kind is not None and not fits(value, kind):
            raise ConfigError(f"config: {key}={shown} is not {kind.describe()}{default}")
        bounds = types.range_of(key)
        if bounds is not None and not all(bounds.holds(n) for n in numbers(value)):
            raise ConfigError(f"config: {key}={shown} is outside {bounds.text}{default}")
