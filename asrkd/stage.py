"""Stage records and fingerprints: what makes a stage resumable, skippable and safe.

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

A mistake never costs a finished output:

* ``redo`` sets the old output aside (``.<dir>.previous`` beside it) and builds the new one in
  its place; the old one is deleted only when the new one's record is written. A redo that
  fails puts the old output back (``abandon_open_stages``, which the CLI calls on any error);
  one that is killed leaves it aside, and the next run restores it when it asks for the old
  settings, or goes on with the redo when it asks for the new ones.
* The record lists every output file with its size and SHA-256 (:mod:`asrkd.files`): a file
  cut short or changed since is found when the output is read as an input, or when its stage is
  planned again, and named with the fix (``redo=true`` remakes it even though its settings did
  not change).
* The record holds the asrkd version and a hash of the source of every asrkd module that was
  loaded when the stage ran: a rerun under other code warns, naming the modules, and
  ``redo=true`` remakes it.
* One run at a time per output directory (:mod:`asrkd.locks`).
* The record says which command made the output and on which CPU and code (:mod:`asrkd.machine`).

Its neighbours, one concern each: :mod:`asrkd.errors`, :mod:`asrkd.files` (atomic writes,
checksums), :mod:`asrkd.locks`, :mod:`asrkd.machine`, :mod:`asrkd.progress`, :mod:`asrkd.drops`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asrkd import __version__
from asrkd.errors import CorruptOutput, MissingInput, StageError, StageLocked, StageMismatch, StaleInput
from asrkd.files import check_writable, compared_by_hash, file_digest, verified_digest, write_json
from asrkd.locks import acquire_lock, release_lock
from asrkd.machine import code_commit, cpu_description, invocation

log = logging.getLogger(__name__)

RECORD = "stage.json"
PARTIAL = "stage.partial.json"
PACKED = "stage.packed.json"  # tools/pack_prepared.py: the output files left behind on purpose
DATA_DIR_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2uniq", "segments")


# ----------------------------------------------------------------------------- fingerprints


def digest(value: Any) -> str:
    """A short stable hash of any JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Settings:
    """What a stage's outputs depend on in the config (:func:`asrkd.sections.settings`): ``values``,
    dotted key -> value of each key the stage reads, and ``redo``: remake outputs whose settings
    or inputs changed (else they are refused)."""

    values: dict[str, Any]
    redo: bool = False


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
    problems = output_problems(path, record)
    if problems:
        raise corrupt_output(path, record, problems)
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


# ----------------------------------------------------------------------------- outputs, code, commands


def output_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256", "mtime_ns"}} of every file a stage wrote in ``directory``:
    not its records, temporary files, or subdirectories that are stage outputs of their own."""
    files: dict[str, dict[str, Any]] = {}

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if not ((entry / RECORD).is_file() or (entry / PARTIAL).is_file()):
                    walk(entry)
            elif entry.is_file() and entry.name not in (RECORD, PARTIAL, PACKED):
                stat = entry.stat()
                files[entry.relative_to(directory).as_posix()] = {"bytes": stat.st_size, "sha256": file_digest(entry), "mtime_ns": stat.st_mtime_ns}

    walk(directory)
    return files


def output_problems(directory: Path, record: dict) -> list[str]:
    """What differs between ``directory``'s files and those its record lists: a file missing, of
    another size, or of another SHA-256, compared when its modification time moved, always for a
    model (``ALWAYS_VERIFIED``) and, with ``verify=true``, for every file. Records from before
    checksums list no files and find nothing; files a packed recipe left behind (``PACKED``)
    may be missing."""
    left_behind = set((read_record(directory, PACKED) or {}).get("left_behind", []))
    problems = []
    for name, entry in record.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            if name not in left_behind:
                problems.append(f"{name} is missing")
            continue
        stat = path.stat()
        if stat.st_size != entry["bytes"]:
            problems.append(f"{name} has {stat.st_size} bytes, its stage wrote {entry['bytes']} (cut short or overwritten)")
        elif compared_by_hash(path, entry["mtime_ns"]) and verified_digest(path) != entry["sha256"]:
            problems.append(f"{name} changed since its stage wrote it (SHA-256 differs)")
    return problems


def corrupt_output(directory: Path, record: dict, problems: list[str]) -> CorruptOutput:
    return CorruptOutput(f"{directory} is corrupt: {'; '.join(problems)}. Remake it: rerun its stage ({record['stage']}) "
                         "with redo=true (recipes: --redo)")


_SOURCE_HASHES: dict[str, str | None] = {}


def module_source_hash(name: str) -> str | None:
    """The hash of module ``name``'s source file as it is on disk now (None: no such module)."""
    if name not in _SOURCE_HASHES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            origin = spec.origin if spec is not None else None
        _SOURCE_HASHES[name] = hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16] if origin and Path(origin).is_file() else None
    return _SOURCE_HASHES[name]


def code_record() -> dict[str, Any]:
    """The asrkd version and the source hash of every asrkd (and recipe ``local``) module loaded
    now: each command imports the modules of its own step, so these are the modules it ran."""
    names = sorted(n for n in sys.modules if n.split(".")[0] in ("asrkd", "local") and getattr(sys.modules[n], "__file__", None))
    return {"version": __version__, "modules": {n: module_source_hash(n) for n in names}}


def changed_code(record: dict) -> list[str]:
    """The modules whose source differs from what made ``record`` (empty for older records)."""
    modules = (record.get("code") or {}).get("modules", {})
    return [name for name, recorded in modules.items() if module_source_hash(name) != recorded]


def previous_path(out_dir: Path) -> Path:
    """Where a redo keeps the old output until the new one is complete."""
    return out_dir.parent / f".{out_dir.name}.previous"


# ----------------------------------------------------------------------------- planning a stage


@dataclass
class Stage:
    """One planned run of a stage on one output directory.

    ``plan`` decides: ``up_to_date`` (skip), or run (the partial record is then written and the
    directory locked). ``commit`` writes the record after the outputs (a stage is complete only
    then), deletes the old output a redo set aside and releases the lock; ``abandon`` undoes a
    run that failed: the old output of a redo goes back in place.
    """

    name: str
    out_dir: Path
    config: dict[str, Any]
    inputs: dict[str, dict[str, str]]
    fingerprint: str
    up_to_date: bool = False
    resumable: bool = False  # a partial run of this same fingerprint is on disk
    summary: dict[str, Any] = field(default_factory=dict)
    set_aside: bool = False  # a redo moved the old output to previous_path(out_dir)
    code: dict[str, Any] = field(default_factory=code_record)  # the code loaded when it was planned: what runs

    @property
    def record(self) -> dict:
        return {"stage": self.name, "fingerprint": self.fingerprint, "config": self.config, "inputs": self.inputs}

    def commit(self, **summary: Any) -> None:
        record = {**self.record, **({"summary": summary} if summary else {}), "files": output_files(self.out_dir),
                  "made_by": invocation(), "made_on": cpu_description(), "made_with": code_commit(), "code": self.code}
        write_json(self.out_dir / RECORD, record)
        (self.out_dir / PARTIAL).unlink(missing_ok=True)
        shutil.rmtree(previous_path(self.out_dir), ignore_errors=True)
        _OPEN.pop(self.out_dir.resolve(), None)
        release_lock(self.out_dir)

    def abandon(self, failed: bool = False) -> str:
        """A run that raised: a redo's old output (and its record) back in place; the lock released.
        One that ``failed`` (an error, not a kill or Ctrl-C) marks its partial record so: what it
        left is no run to resume, and a run of other settings clears it instead of being refused.
        Returns what was kept, in words."""
        _OPEN.pop(self.out_dir.resolve(), None)
        previous = previous_path(self.out_dir)
        if self.set_aside and previous.is_dir():
            shutil.rmtree(self.out_dir, ignore_errors=True)
            os.replace(previous, self.out_dir)
            log.warning("%s: the redo %s; %s is back as it was", self.name, "failed" if failed else "was stopped", self.out_dir)
            kept = f"{self.out_dir}: the old output is back in place"
        elif failed and (partial := read_record(self.out_dir, PARTIAL)) is not None:
            write_json(self.out_dir / PARTIAL, {**partial, "failed": True})
            kept = f"{self.out_dir}: left unfinished"
        else:
            kept = f"{self.out_dir}: unfinished; the same command resumes it"
        release_lock(self.out_dir)
        return kept


_OPEN: dict[Path, Stage] = {}  # planned in this process, not yet committed


def abandon_open_stages(failed: bool = False) -> list[str]:
    """Undo every stage this process planned and did not commit (the CLI calls it on errors:
    ``failed`` for an error it reports, not for an interruption); what each kept, in words."""
    return [stage.abandon(failed) for stage in list(_OPEN.values())]


def holds_only_its_record(out_dir: Path) -> bool:
    return all(p.name == PARTIAL or p.name.startswith(".") for p in out_dir.iterdir())


def set_aside(out_dir: Path) -> bool:
    """Move a finished (or unrecorded) output out of the way of its redo; True when moved. A
    partial output is junk to a redo and is deleted; so is one beside an older set-aside copy."""
    previous = previous_path(out_dir)
    if not out_dir.is_dir():
        return previous.is_dir()
    if previous.is_dir() or read_record(out_dir) is None and (out_dir / PARTIAL).is_file():
        shutil.rmtree(out_dir)
        return previous.is_dir()
    os.replace(out_dir, previous)
    return True


def recover_interrupted_redo(name: str, out_dir: Path, fingerprint: str) -> None:
    """A redo killed before it finished left the old output aside: put it back when this run asks
    for the old settings (or when the new output is complete after all, drop the old one)."""
    previous = previous_path(out_dir)
    if not previous.is_dir():
        return
    if read_record(out_dir) is not None:  # killed after the commit, before the old copy was deleted
        shutil.rmtree(previous)
        return
    old = read_record(previous)
    if old is not None and old["fingerprint"] == fingerprint:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(previous, out_dir)
        log.warning("%s: an interrupted redo had set %s aside; it is back (its settings are the ones asked for)", name, out_dir)


def plan(
    name: str, out_dir: Path | str, settings: Settings, inputs: dict[str, Path | str] | None = None,
    values: dict[str, Any] | None = None, clear: bool = True, writer: bool = True, extend: bool = False,
) -> Stage:
    """Fingerprint a stage from the config ``settings`` it reads, its ``inputs`` (paths of upstream
    outputs or data dirs) and ``values`` (anything else that decides its outputs), and decide
    whether it must run. ``clear``: on a redo, set the old outputs aside (deleted once the new
    ones are complete; they could otherwise be resumed from); False for directories that hold
    more than this stage's outputs. ``writer``: False on torchrun's ranks other than 0, which
    decide the same but touch nothing. ``extend``: the caller has checked that the outputs are
    current for part of these settings and adds the rest (decoding a new eval set): the old
    outputs stay, and the new record replaces the old once the rest is made.
    """
    out_dir = Path(out_dir)
    config = {**settings.values, **(values or {})}
    recorded = {}
    for input_name, path in (inputs or {}).items():
        recorded[input_name] = {"path": os.path.relpath(path, out_dir), "fingerprint": input_fingerprint(path)}
    stage = Stage(name, out_dir, config, recorded, "")
    stage.fingerprint = digest({"stage": name, "config": config, "inputs": {k: v["fingerprint"] for k, v in recorded.items()}})
    redo = settings.redo or extend
    clear = clear and not extend
    if not writer:
        decide(stage, redo, clear, writer=False)
        return stage
    try:
        acquire_lock(name, out_dir)
    except StageLocked:
        raise
    except StageError:  # an unwritable place: fine for outputs that are complete and current, else the error
        decide(stage, redo, clear, writer=False)
        if stage.up_to_date:
            return stage
        check_writable(out_dir)  # names the directory
        raise
    try:
        decide(stage, redo, clear)
    except BaseException:
        release_lock(out_dir)
        raise
    if stage.up_to_date:
        release_lock(out_dir)
    else:
        _OPEN[out_dir.resolve()] = stage
    return stage


def decide(stage: Stage, redo: bool, clear: bool, writer: bool = True) -> None:
    """``plan``'s decision, under the lock: skip, resume, refuse, or clear the way for a run.
    Not a ``writer``: the same decision, touching nothing."""
    name, out_dir = stage.name, stage.out_dir
    if writer:
        recover_interrupted_redo(name, out_dir, stage.fingerprint)
    done, partial = read_record(out_dir), read_record(out_dir, PARTIAL)
    made_nothing = partial is not None and holds_only_its_record(out_dir)
    if done is None and partial is not None and partial["fingerprint"] != stage.fingerprint and writer and (made_nothing or partial.get("failed")):
        log.info("%s: %s holds %s (%s); planning anew", name, out_dir,
                 "only the plan of a run that made nothing" if made_nothing else "what a failed run of other settings left",
                 "; ".join(describe_changes(partial, stage.record)))
        if clear and not made_nothing:
            shutil.rmtree(out_dir)  # a failed run's outputs: junk to any run of other settings
        else:
            (out_dir / PARTIAL).unlink()
        partial = None
    existing = done or partial
    remake = False
    if done is not None and done["fingerprint"] == stage.fingerprint:
        problems, code = output_problems(out_dir, done), changed_code(done)
        if problems and not redo:
            raise corrupt_output(out_dir, done, problems)
        if code and not redo:
            log.warning("%s: %s was made by other code (changed since: %s); kept as it is; redo=true (recipes: --redo) remakes it",
                        name, out_dir, ", ".join(code))
        if not problems and not code:
            log.info("%s: %s is complete and current, skipping", name, out_dir)
            stage.up_to_date = True
            return
        if not redo:
            stage.up_to_date = True
            return
        log.warning("%s: redoing %s (%s)", name, out_dir, "; ".join(problems + [f"code changed: {', '.join(code)}"] * bool(code)))
        remake = True
    elif existing is not None and existing["fingerprint"] != stage.fingerprint:
        changes = describe_changes(existing, stage.record)
        state = "made" if done is not None else "partly made (interrupted)"
        if not redo:
            raise StageMismatch(
                f"{name}: {out_dir} was {state} with other settings: {'; '.join(changes) or 'another stage version'}. "
                "Pass redo=true (recipes: --redo) to remake it and what depends on it, or write elsewhere "
                "(another name or exp_dir)"
            )
        if clear:
            log.warning("%s: redoing %s (%s)", name, out_dir, "; ".join(changes))
        else:
            log.info("%s: adding to %s (%s)", name, out_dir, "; ".join(changes))
        remake = True
    elif existing is None and out_dir.is_dir() and clear and any(p.name != PARTIAL for p in out_dir.iterdir()):
        legacy = [p.name for p in out_dir.iterdir()][:5]
        if not redo:
            raise StageMismatch(
                f"{name}: {out_dir} holds outputs without a stage record ({', '.join(legacy)}; made by an older asrkd or by hand). "
                "Pass redo=true (recipes: --redo) to remake them, or delete the directory"
            )
        remake = True
    if not writer:
        return
    if remake and clear:
        stage.set_aside = set_aside(out_dir)
    elif previous_path(out_dir).is_dir():  # resuming a redo that was killed: its old output stays aside until it completes
        stage.set_aside = True
    partial = read_record(out_dir, PARTIAL)
    stage.resumable = partial is not None and partial["fingerprint"] == stage.fingerprint
    check_writable(out_dir)
    for leftover in out_dir.glob(".*.tmp-*"):  # what a kill during a write leaves: never a complete file
        leftover.unlink()
    write_json(out_dir / PARTIAL, stage.record)


