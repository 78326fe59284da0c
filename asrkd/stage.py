"""What every stage shares: fingerprinted stage records, atomic writes, dropped-utterance accounting.

A stage's output directory holds ``stage.json`` once all its outputs are in place: the
config keys the stage read (flattened, ``train.lr: 0.001``), the fingerprint of every input
it consumed (an upstream stage's output, or a data dir, whose fingerprint is the hash of its
files) and its own fingerprint, the hash of both. A rerun

* with the same fingerprint skips the stage;
* with another refuses, naming the keys and inputs that changed with both values, unless
  ``redo=true`` (recipes: ``--redo``), which remakes it; the remade output has a new
  fingerprint, so whatever was made from the old one no longer matches and is refused (or,
  with ``redo``, remade) in turn;
* after a kill finds ``stage.partial.json`` (the planned record, written before any output)
  and resumes or recomputes; a partial run of another config is refused like a changed one.

Consumers check an input is current before using it (``input_fingerprint``): a model whose
features were remade since is stale, and saying so beats decoding with mismatched parts.

Every file is written under a temporary name and renamed into place (``atomic_write``), so a
kill leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

RECORD = "stage.json"
PARTIAL = "stage.partial.json"
DATA_DIR_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2uniq", "segments")


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says which stage, why, and what to do."""


class StageMismatch(StageError):
    """Outputs exist that were made from another config or other inputs."""


class StaleInput(StageError):
    """An input was made from something that has been remade since."""


class MissingInput(StageError):
    """An input a stage needs has not been made (or did not finish)."""


# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds.

    A kill or an error inside the block leaves ``path`` as it was (the temporary file is
    removed on errors). A full disk or an unwritable directory becomes a StageError that
    names the file and says the previous outputs are intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise StageError(f"no space left on the device writing {path}; free space and rerun (earlier outputs are intact)") from err
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR):
            raise StageError(f"cannot write {path}: {err.strerror}; choose a writable exp_dir/data_dir") from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path | str, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n")


def save_npy(path: Path | str, array) -> None:
    import numpy as np

    with atomic_write(path) as tmp:
        with open(tmp, "wb") as out:
            np.save(out, array)


def copy_file(source: Path | str, dest: Path | str) -> None:
    with atomic_write(dest) as tmp:
        shutil.copyfile(source, tmp)


def check_writable(directory: Path | str) -> None:
    """Fail early, in one line, when an output directory cannot be created or written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise StageError(f"cannot write to {directory}: {err.strerror}; choose a writable directory (exp_dir=..., data_dir=...)") from err


# ----------------------------------------------------------------------------- fingerprints


def digest(value: Any) -> str:
    """A short stable hash of any JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_values(cfg, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The values of ``keys`` (dotted; a group name stands for all keys under it), flattened."""
    from omegaconf import DictConfig, OmegaConf

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
    from omegaconf import OmegaConf

    out = {}
    for key, default in defaults.items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if value != default:
            out[key] = value
    return out


def is_data_dir(path: Path) -> bool:
    return (path / "utt2spk").is_file() and not (path / RECORD).is_file()


def data_dir_fingerprint(path: Path) -> str:
    """A Kaldi data dir is identified by its content: the hash of its index files."""
    sha = hashlib.sha256()
    for name in DATA_DIR_FILES:
        if (path / name).is_file():
            sha.update(name.encode() + b"\0" + (path / name).read_bytes())
    return sha.hexdigest()[:16]


def read_record(directory: Path, name: str = RECORD) -> dict | None:
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{path} is corrupt ({err}); delete {directory} and rerun its stage") from err


def is_complete(directory: Path | str) -> bool:
    """True when ``directory`` holds the finished outputs of a stage."""
    return (Path(directory) / RECORD).is_file()


def input_fingerprint(path: Path | str, _checked: dict[Path, str] | None = None) -> str:
    """The fingerprint of an input, after checking it is still consistent with its own inputs.

    Data dirs hash their files; stage outputs give their record's fingerprint once every path
    input recorded there still has the fingerprint it had (recursively), so a model whose
    features or lang dir were remade since is refused as stale rather than silently used.
    """
    checked = {} if _checked is None else _checked
    path = Path(path)
    key = path.resolve()
    if key in checked:
        return checked[key]
    if is_data_dir(path):
        checked[key] = data_dir_fingerprint(path)
        return checked[key]
    record = read_record(path)
    if record is None:
        what = "is incomplete (its stage was interrupted)" if (path / PARTIAL).is_file() else "does not exist"
        raise MissingInput(f"{path} {what}: run the stage that makes it first")
    for name, entry in record["inputs"].items():
        if "path" not in entry:
            continue
        source = Path(os.path.normpath(path / entry["path"]))  # recorded relative to the output: exp and data dirs can move together
        now = input_fingerprint(source, checked)
        if now != entry["fingerprint"]:
            raise StaleInput(
                f"{path} is stale: its stage ({record['stage']}) used {name} {source} with fingerprint "
                f"{entry['fingerprint']}, which is now {now} (remade since); rerun {record['stage']} with redo=true (recipes: --redo)"
            )
    checked[key] = record["fingerprint"]
    return checked[key]


def input_record(path: Path | str) -> dict:
    """The stage record of a (current) input: its fingerprint and the config it was made with."""
    input_fingerprint(path)
    return read_record(Path(path))


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two records: config keys and inputs."""
    changes = []
    old_config, new_config = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, "<unset>") != new_config.get(key, "<unset>"):
            changes.append(f"{key}: {old_config.get(key, '<unset>')!r} -> {new_config.get(key, '<unset>')!r}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(old_inputs) | set(new_inputs)):
        a, b = old_inputs.get(name, {}), new_inputs.get(name, {})
        if a.get("fingerprint") != b.get("fingerprint") or a.get("path") != b.get("path"):
            where = b.get("path") or a.get("path") or "value"
            changes.append(f"input {name} ({where}): {a.get('fingerprint', '<none>')} -> {b.get('fingerprint', '<none>')}")
    return changes


@dataclass
class Stage:
    """One planned run of a stage on one output directory.

    ``plan`` decides: ``up_to_date`` (skip), or run (the partial record is then written).
    ``commit`` writes the record after the outputs; a stage is complete only then.
    """

    name: str
    out_dir: Path
    config: dict[str, Any]
    inputs: dict[str, dict[str, str]]
    fingerprint: str
    up_to_date: bool = False
    resumable: bool = False  # a partial run of this same fingerprint is on disk
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> dict:
        return {"stage": self.name, "fingerprint": self.fingerprint, "config": self.config, "inputs": self.inputs}

    def commit(self, **summary: Any) -> None:
        write_json(self.out_dir / RECORD, {**self.record, **({"summary": summary} if summary else {})})
        (self.out_dir / PARTIAL).unlink(missing_ok=True)


def plan(
    name: str, out_dir: Path | str, cfg, keys: tuple[str, ...] | list[str], inputs: dict[str, Path | str] | None = None,
    values: dict[str, Any] | None = None, clear: bool = True, writer: bool = True,
) -> Stage:
    """Fingerprint a stage from the config ``keys`` it reads, its ``inputs`` (paths of upstream
    outputs or data dirs) and ``values`` (anything else that decides its outputs), and decide
    whether it must run. ``clear``: on a redo, delete the old outputs first (they could
    otherwise be resumed from); False for directories that hold more than this stage's outputs.
    ``writer``: False on torchrun's ranks other than 0, which decide the same but touch nothing.
    """
    out_dir = Path(out_dir)
    config = {**config_values(cfg, keys), **(values or {})}
    recorded = {}
    for input_name, path in (inputs or {}).items():
        recorded[input_name] = {"path": os.path.relpath(path, out_dir), "fingerprint": input_fingerprint(path)}
    stage = Stage(name, out_dir, config, recorded, "")
    stage.fingerprint = digest({"stage": name, "config": config, "inputs": {k: v["fingerprint"] for k, v in recorded.items()}})
    redo = bool(cfg.get("redo", False))
    done, partial = read_record(out_dir), read_record(out_dir, PARTIAL)
    existing = done or partial
    if done is not None and done["fingerprint"] == stage.fingerprint:
        log.info("%s: %s is complete and current, skipping", name, out_dir)
        stage.up_to_date = True
        return stage
    if existing is not None and existing["fingerprint"] != stage.fingerprint:
        changes = describe_changes(existing, stage.record)
        state = "made" if done is not None else "partly made (interrupted)"
        if not redo:
            raise StageMismatch(
                f"{name}: {out_dir} was {state} with other settings: {'; '.join(changes) or 'another stage version'}. "
                "Pass redo=true (recipes: --redo) to remake it and what depends on it, or write elsewhere "
                "(another name or exp_dir)"
            )
        log.warning("%s: redoing %s (%s)", name, out_dir, "; ".join(changes))
        if clear and writer:
            shutil.rmtree(out_dir, ignore_errors=True)
    elif existing is None and out_dir.is_dir() and clear and any(out_dir.iterdir()):
        legacy = [p.name for p in out_dir.iterdir()][:5]
        if not redo:
            raise StageMismatch(
                f"{name}: {out_dir} holds outputs without a stage record ({', '.join(legacy)}; made by an older asrkd or by hand). "
                "Pass redo=true (recipes: --redo) to remake them, or delete the directory"
            )
        if writer:
            shutil.rmtree(out_dir, ignore_errors=True)
    stage.resumable = partial is not None and partial["fingerprint"] == stage.fingerprint
    if not writer:
        return stage
    check_writable(out_dir)
    for leftover in out_dir.glob(".*.tmp-*"):  # what a kill during a write leaves: never a complete file
        leftover.unlink()
    write_json(out_dir / PARTIAL, stage.record)
    return stage


# ----------------------------------------------------------------------------- progress


def progress(items, what: str, total: int | None = None, unit: str = "", scale: int = 1) -> Iterator:
    """Yield ``items``, drawing a one-line counter on stderr when it is a terminal (never in logs):
    done/total, the rate and the time left. Each item counts ``scale`` ``unit`` (a batch of
    frames: ``unit="frames", scale=batch_size``), so the rate reads in frames or utterances."""
    import sys
    import time

    if not sys.stderr.isatty():
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = shown = time.monotonic()
    count = 0
    suffix = f" {unit}" if unit else ""

    def line(now: float) -> str:
        rate = count * scale / max(now - start, 1e-9)
        text = f"\r{what}: {count * scale}" + (f"/{total * scale}" if total else "") + f"{suffix}, {rate:,.0f}{suffix}/s"
        if total and rate > 0:
            text += f", {(total - count) * scale / rate:.0f} s left"
        return text + " "

    for count, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - shown > 0.5:
            sys.stderr.write(line(now))
            sys.stderr.flush()
            shown = now
    sys.stderr.write(line(time.monotonic()) + "done\n")


# ----------------------------------------------------------------------------- dropped utterances


class TooManyDropped(StageError):
    """A stage lost more utterances than ``prep.max_drop_fraction`` allows."""


def account_dropped(stage: str, total: int, dropped: dict[str, str], max_fraction: float, report: Path) -> None:
    """Say how many utterances ``stage`` dropped and why; write them out; fail past the limit.

    Nothing is dropped silently: the reasons are logged grouped by kind and every utterance
    with its reason is written to ``report`` (JSON).
    """
    write_json(report, {"stage": stage, "total": total, "dropped": dropped})
    if not dropped:
        log.info("%s: kept all %d utterances", stage, total)
        return
    kinds = Counter(reason_kind(reason) for reason in dropped.values())
    log.warning(
        "%s: dropped %d of %d utterances (%s); list in %s",
        stage, len(dropped), total, "; ".join(f"{n} x {k}" for k, n in kinds.most_common()), report,
    )
    if len(dropped) > max_fraction * total:
        raise TooManyDropped(
            f"{stage}: dropped {len(dropped)} of {total} utterances, more than "
            f"prep.max_drop_fraction={max_fraction}; see {report}"
        )


def reason_kind(reason: str) -> str:
    """'utterance X: missing audio (wav/...); fix' -> 'missing audio': what groups drop reasons."""
    return reason.split(": ", 1)[-1].split(" (")[0].split(";")[0]
