"""One run at a time per output directory: ``.<dir>.lock`` beside it names the holder's pid, host
and command; a second run is refused naming them, and a lock whose process is gone is taken over
(and said so). ``exclusive`` serializes the read-modify-write of a file several commands share."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from asrkd.errors import StageError, StageLocked
from asrkd.files import disk_error
from asrkd.machine import invocation

log = logging.getLogger(__name__)


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


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
