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
kill leaves the old file or the new one, never half of one; a full disk, an unwritable or a
failing one is one line naming the file (``disk_error``).

A mistake never costs a finished output:

* ``redo`` sets the old output aside (``.<dir>.previous`` beside it) and builds the new one in
  its place; the old one is deleted only when the new one's record is written. A redo that
  fails puts the old output back (``abandon_open_stages``, which the CLI calls on any error);
  one that is killed leaves it aside, and the next run restores it when it asks for the old
  settings, or goes on with the redo when it asks for the new ones.
* The record lists every output file with its size and SHA-256: a file cut short or changed
  since is found when the output is read as an input, or when its stage is planned again, and
  named with the fix (``redo=true`` remakes it even though its settings did not change). A
  file's hash is compared when its modification time moved, a model's always, every file's with
  ``verify=true``.
* The record holds the asrkd version and a hash of the source of every asrkd module that was
  loaded when the stage ran: a rerun under other code warns, naming the modules, and
  ``redo=true`` remakes it.
* One run at a time per output directory: ``.<dir>.lock`` beside it names the holder's pid,
  host and command; a second run is refused naming them, a lock whose process is gone is taken
  over (and said so).
* The record says which command made the output (``made_by``: the recipe line, or the asrkd
  command with its overrides), so a report can name the command that remakes each row, and
  on which CPU (``made_on``: its model and family, which decide the last bits of its numbers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import functools
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from asrkd import __version__

log = logging.getLogger(__name__)

RECORD = "stage.json"
PARTIAL = "stage.partial.json"
PACKED = "stage.packed.json"  # tools/pack_prepared.py: the output files left behind on purpose
DATA_DIR_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2uniq", "segments")


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says which stage, why, and what to do."""


class StageMismatch(StageError):
    """Outputs exist that were made from another config or other inputs."""


class StaleInput(StageError):
    """An input was made from something that has been remade since."""


class MissingInput(StageError):
    """An input a stage needs has not been made (or did not finish)."""


class CorruptOutput(StageError):
    """A stage's output file no longer is what its stage wrote (cut short, changed, missing)."""


class StageLocked(StageError):
    """Another run is writing the same output directory."""


# ----------------------------------------------------------------------------- atomic writes


DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system (or the process's file size limit)",
    errno.EIO: "input/output error (a failing disk or a network file system gone away)",
    errno.EACCES: "permission denied", errno.EROFS: "read-only file system", errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}
UNWRITABLE = (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR)


def disk_error(path: Path | str, err: OSError) -> StageError | None:
    """The one-line StageError for an OSError a full, unwritable or failing disk raises writing
    ``path`` (None for other errors): it names the file and the fix, and says earlier outputs
    are intact (every write goes to a temporary name first)."""
    what = DISK_ERRORS.get(err.errno)
    if what is None:
        return None
    if err.errno in UNWRITABLE:
        return StageError(f"cannot write {path}: {what}; choose a writable exp_dir/data_dir (earlier outputs are intact)")
    return StageError(f"{what} writing {path}; free space or fix the disk and rerun (earlier outputs are intact)")


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds.

    A kill or an error inside the block leaves ``path`` as it was (the temporary file is
    removed on errors). A full disk, an unwritable directory or an I/O error becomes a
    StageError that names the file and says the previous outputs are intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        clear = disk_error(path, err)
        if clear is not None:
            raise clear from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path | str, data: bytes | memoryview) -> None:
    """Write ``data`` atomically. Writers that bury the OS error in their own (torch.save's
    zip writer: "unexpected pos") serialize into memory and write through here."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as out:
            out.write(data)


def new_array(path: Path | str, dtype, shape: tuple[int, ...]):
    """A memory-mapped .npy array of ``shape`` to fill, its blocks allocated now: a full disk is the
    one-line error here, not a SIGBUS when a page of the map is first written."""
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate"):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: nothing reserved
                    raise
            finally:
                os.close(fd)
    except OSError as err:
        clear = disk_error(path, err)
        if clear is not None:
            raise clear from err
        raise
    return array


def write_text(path: Path | str, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n")


def save_npy(path: Path | str, array) -> None:
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
        clear = disk_error(directory, err)
        if clear is not None and err.errno not in UNWRITABLE:
            raise clear from err
        raise StageError(f"cannot write to {directory}: {err.strerror}; choose a writable directory (exp_dir=..., data_dir=...)") from err


# ----------------------------------------------------------------------------- fingerprints


def digest(value: Any) -> str:
    """A short stable hash of any JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


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


# Files whose SHA-256 is compared whenever they are read as an input, not only when their
# modification time moved: a model corrupted in place with its size and time kept (a bad copy, a
# flipped bit) would otherwise score as a model. ``verify=true`` compares every file's.
ALWAYS_VERIFIED = ("*.pt",)
_VERIFY_ALL = False
_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> SHA-256: each file hashed once a process


def verify_every_file(on: bool) -> None:
    """``verify=true`` (recipes: ``--verify``): every output's SHA-256 is compared when it is read
    as an input or planned again, whatever its modification time (the CLI sets it)."""
    global _VERIFY_ALL
    _VERIFY_ALL = bool(on)


def verified_digest(path: Path) -> str:
    """``file_digest`` of ``path``, computed once per process for a file left as it was."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


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
        elif ((_VERIFY_ALL or stat.st_mtime_ns != entry["mtime_ns"] or any(path.match(p) for p in ALWAYS_VERIFIED))
              and verified_digest(path) != entry["sha256"]):
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


_INVOCATION: dict[str, Any] = {}


@contextmanager
def invoked_as(command: str, overrides: list[str]) -> Iterator[None]:
    """Say which command runs inside the block (the CLI does), for the records' ``made_by``: the
    recipe line when a recipe runs it (``ASRKD_RECIPE_COMMAND``), else the asrkd command."""
    shown = [o for o in overrides if not o.startswith(("redo=", "verify="))]
    recipe = os.environ.get("ASRKD_RECIPE_COMMAND")
    _INVOCATION.update({"command": recipe or " ".join(["asrkd", command, *shown]), "overrides": shown})
    try:
        yield
    finally:
        _INVOCATION.clear()


def cpu_family(flags: set[str]) -> str:
    """The instruction set of a CPU, the first thing that decides its floating-point results (an AMX
    Xeon and an AVX2 machine give the same code different last bits); within a family the model
    can differ too (README, 'What reproduces how'), so records name both (cpu_description)."""
    for flag, family in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("neon", "NEON"), ("asimd", "NEON")):
        if flag in flags:
            return family
    return "other"


@functools.lru_cache(maxsize=4)
def cpu_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """/proc/cpuinfo's fields (name -> value; every core lists the same), {} where it cannot be read:
    the one reader of it, for the machine a record names and the bf16 support a cost names."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    fields = cpu_fields(cpuinfo)
    return set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'AMD EPYC (AVX-512, family 26 model 2)': the CPU's name, instruction-set family and, where
    /proc/cpuinfo gives them, its family and model numbers (else the platform). The numbers tell
    generations apart that share a name and an instruction set ("AMD EPYC (AVX-512)" was two
    machines whose trainings of one config differed)."""
    fields = cpu_fields(cpuinfo)
    if not fields:
        return platform.processor() or platform.machine()
    model = fields.get("model name") or fields.get("Hardware") or platform.machine()
    generation = f", family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields and "model" in fields else ""
    return f"{model} ({cpu_family(cpu_flags(cpuinfo))}{generation})"


CODE_PATHS = ("asrkd", "conf", "local", "recipes")  # what decides an output; a change there outside a commit is named


@functools.cache
def code_commit() -> str | None:
    """The git commit of the code that runs ('3f2a9c1d0b7e'), with '+changes' where the files of
    CODE_PATHS differ from it; None outside a git checkout (an installed package). A record names it
    beside its CPU: the two that decide its numbers bit for bit."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                                 capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def invocation() -> dict[str, Any]:
    return dict(_INVOCATION) or {"command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)), "overrides": None}


# ----------------------------------------------------------------------------- one run per directory


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def previous_path(out_dir: Path) -> Path:
    """Where a redo keeps the old output until the new one is complete."""
    return out_dir.parent / f".{out_dir.name}.previous"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def acquire_lock(name: str, out_dir: Path) -> None:
    """Take ``out_dir``'s lock, or refuse naming who holds it. A lock of a process that is gone
    (same host) is taken over, and said so; this process may take its own again."""
    path = lock_path(out_dir)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": invocation()["command"],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:  # being written by its taker this instant, or cut by a kill: look again, then take it
                time.sleep(0.2)
                holder = read_lock(path) or {"pid": -1, "host": mine["host"]}
            same_host = holder.get("host") == mine["host"]
            if same_host and holder.get("pid") == mine["pid"]:
                path.unlink(missing_ok=True)
                continue
            if same_host and not process_alive(int(holder.get("pid", -1))):
                log.warning("%s: taking over the lock %s of pid %s (%s), which is no longer running", name, path, holder.get("pid"),
                            holder.get("command"))
                path.unlink(missing_ok=True)
                continue
            raise StageLocked(f"{name}: {out_dir} is being made by another run: pid {holder.get('pid')} on {holder.get('host')} "
                              f"since {holder.get('since')}, `{holder.get('command')}`. Wait for it to finish"
                              + ("" if same_host else f", or delete {path} if that run is gone"))
        except OSError as err:
            raise (disk_error(path, err) or StageError(f"cannot write {path}: {err.strerror}")) from err
        with os.fdopen(fd, "w") as out:
            json.dump(mine, out)
        return
    raise StageLocked(f"{name}: could not take the lock {path}; delete it if no run is making {out_dir}")


@contextmanager
def exclusive(path: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file, made if missing) for the block: a second
    process waits for the first (``flock``; released by the kernel if its holder dies). For a
    read-modify-write of a file several commands share, the report.json reports merge into."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def release_lock(out_dir: Path) -> None:
    holder = read_lock(lock_path(out_dir))
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock_path(out_dir).unlink(missing_ok=True)


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
    name: str, out_dir: Path | str, cfg, keys: tuple[str, ...] | list[str], inputs: dict[str, Path | str] | None = None,
    values: dict[str, Any] | None = None, clear: bool = True, writer: bool = True, extend: bool = False,
) -> Stage:
    """Fingerprint a stage from the config ``keys`` it reads, its ``inputs`` (paths of upstream
    outputs or data dirs) and ``values`` (anything else that decides its outputs), and decide
    whether it must run. ``clear``: on a redo, set the old outputs aside (deleted once the new
    ones are complete; they could otherwise be resumed from); False for directories that hold
    more than this stage's outputs. ``writer``: False on torchrun's ranks other than 0, which
    decide the same but touch nothing. ``extend``: the caller has checked that the outputs are
    current for part of these settings and adds the rest (decoding a new eval set): the old
    outputs stay, and the new record replaces the old once the rest is made.
    """
    out_dir = Path(out_dir)
    config = {**config_values(cfg, keys), **(values or {})}
    recorded = {}
    for input_name, path in (inputs or {}).items():
        recorded[input_name] = {"path": os.path.relpath(path, out_dir), "fingerprint": input_fingerprint(path)}
    stage = Stage(name, out_dir, config, recorded, "")
    stage.fingerprint = digest({"stage": name, "config": config, "inputs": {k: v["fingerprint"] for k, v in recorded.items()}})
    redo = bool(cfg.get("redo", False)) or extend
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


# ----------------------------------------------------------------------------- progress


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS: nothing to do)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps the pages of freed blocks below its
    mmap threshold, which it raises to the largest block freed (up to 32 MB: a batch's tensors), so
    a loop over batches held more anonymous memory the more batches it had run (the soft-targets
    stage's growth in results/bench/scaling.md's fit). A trim once a second costs little; a fixed
    threshold instead (MALLOC_MMAP_THRESHOLD_) would make every batch map and unmap its tensors."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def progress(items, what: str, total: int | None = None, unit: str = "", scale: int = 1) -> Iterator:
    """Yield ``items``, drawing a one-line counter on stderr when it is a terminal (never in logs):
    done/total, the rate and the time left. Each item counts ``scale`` ``unit`` (a batch of
    frames: ``unit="frames", scale=batch_size``), so the rate reads in frames or utterances.
    Every long loop of a stage runs through here, so here the heap is trimmed once a second
    (:func:`trim_heap`): a stage's memory stays that of one batch, however many it runs."""
    terminal = sys.stderr.isatty()
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = shown = trimmed = time.monotonic()
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
        if terminal and now - shown > 0.5:
            sys.stderr.write(line(now))
            sys.stderr.flush()
            shown = now
        if now - trimmed > 1.0:
            trim_heap()
            trimmed = now
    if terminal:
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
