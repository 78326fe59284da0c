"""Atomic files and checksums: every output is written under a temporary name and renamed into
place (``atomic_write``), so a kill leaves the old file or the new one, never half of one; a full
disk, an unwritable or a failing one is one line naming the file (``disk_error``). A file's SHA-256
(``file_digest``) is what a stage record lists of it, and is computed once per process for a file
left as it was (``verified_digest``); a model's is compared at every read, every file's with
``verify=true``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from asrkd.errors import StageError


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


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


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


def compared_by_hash(path: Path, recorded_mtime_ns: int) -> bool:
    """Whether ``path``'s SHA-256 is compared with what its record says: when its modification time
    moved, always for a model (``ALWAYS_VERIFIED``), for every file with ``verify=true``."""
    return _VERIFY_ALL or path.stat().st_mtime_ns != recorded_mtime_ns or any(path.match(p) for p in ALWAYS_VERIFIED)


def verified_digest(path: Path) -> str:
    """``file_digest`` of ``path``, computed once per process for a file left as it was."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]
