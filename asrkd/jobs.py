"""Parallel jobs, Kaldi's ``nj``: a stage splits its utterances (the soft-target stage: its
batches) into ``jobs.nj`` parts (as ``split_data.sh`` does: contiguous, near-equal) and runs one
job per part: features, GMM training's realignments, the align stage, soft targets, decoding.

The job runner is pluggable, as Kaldi's run.pl / queue.pl / slurm.pl are (``jobs.backend``):

* ``local``: worker processes on this machine (``concurrent.futures``, started by ``spawn``,
  so no thread state of the parent leaks into them, once per process and number of jobs: a
  GMM's twenty realignments reuse them);
* ``submitit``: jobs submitted through the submitit library: Slurm with
  ``jobs.submitit.cluster=slurm`` (its parameters in ``jobs.submitit.parameters``, e.g.
  ``{slurm_partition: cpu, timeout_min: 60}``), or its own local mode (``cluster: local``),
  which the tests use. Logs go to ``<exp>/jobs/<stage>/``.

Results come back in the order of the parts and the stage merges them as one job's would be:
``nj=1`` and ``nj=N`` give identical outputs (tested), so ``jobs.*`` is in no fingerprint.
Jobs run with one torch thread, as Kaldi's do, unless the stage says otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Jobs:
    """How a stage's jobs run (the config's ``jobs.*``: :func:`asrkd.sections.jobs`): ``nj`` jobs
    (``jobs.nj``, else the number of cores) on ``backend``; submitit's ``cluster`` and
    ``parameters``, and ``logs``, where its per-job logs go (``<exp>/jobs``)."""

    nj: int
    backend: str = "local"
    logs: Path = Path("jobs")
    cluster: str = "slurm"
    parameters: dict[str, Any] = field(default_factory=dict)


def cores() -> int:
    """The number of cores: ``jobs.nj`` when it is null."""
    return max(1, os.cpu_count() or 1)


def split(items: Sequence, nj: int) -> list[list]:
    """``items`` in at most ``nj`` contiguous parts whose sizes differ by at most one (none empty)."""
    nj = max(1, min(nj, len(items)))
    size, extra = divmod(len(items), nj)
    parts, start = [], 0
    for i in range(nj):
        end = start + size + (i < extra)
        parts.append(list(items[start:end]))
        start = end
    return parts


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _leave_interrupts_to_the_parent() -> None:
    """A worker ignores Ctrl-C (the terminal sends it to the whole process group): the command
    that started it says what was kept and stops it (:func:`stop_workers`), in one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def local_pool(workers: int) -> ProcessPoolExecutor:
    """The worker processes of this process for ``workers`` jobs, started on first use."""
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                              initializer=_leave_interrupts_to_the_parent)
    return _POOLS[workers]


def stop_workers() -> None:
    """End this process's worker processes now, their jobs unfinished (an interrupted command:
    waiting for them would keep the user waiting on work that is thrown away)."""
    for pool in _POOLS.values():
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


def _in_job(threads: int, modules: list[str], function: Callable, part: Any) -> Any:
    """``function(part)`` with ``threads`` torch threads, after importing ``modules``: the
    package's modules the command had imported, so that a job (a fresh process, here or on a
    cluster) has the command's registries, e.g. the model kinds experiments register."""
    for module in modules:
        importlib.import_module(module)
    torch.set_num_threads(threads)
    return function(part)


def imported_modules() -> list[str]:
    """This package's modules imported in this process (the one run as ``__main__`` aside), but an
    experiment's tests (pytest imports them; they need its fixtures, which a job has not)."""
    return sorted(name for name in sys.modules if name.split(".")[0] == "asrkd" and not name.rpartition(".")[2].startswith("test_"))


def map_jobs(jobs: Jobs, function: Callable[[Any], Any], parts: list, stage: str, threads: int = 1) -> list:
    """``[function(part) for part in parts]``, one job per part on ``jobs.backend``, each with
    ``threads`` torch threads (a stage that scores with a network passes its own count, so its
    jobs compute bit for bit what it would); ``function`` must be a module-level function."""
    if len(parts) <= 1:
        return [function(part) for part in parts]
    backend, modules = jobs.backend, imported_modules()
    log.info("%s: %d jobs on %s", stage, len(parts), backend)
    if backend == "local":
        return list(local_pool(len(parts)).map(_in_job, [threads] * len(parts), [modules] * len(parts), [function] * len(parts), parts))
    if backend == "submitit":
        import submitit

        executor = submitit.AutoExecutor(folder=jobs.logs / stage.replace(" ", "_"), cluster=jobs.cluster)
        executor.update_parameters(**jobs.parameters)
        submitted = executor.map_array(_in_job, [threads] * len(parts), [modules] * len(parts), [function] * len(parts), parts)
        return [job.result() for job in submitted]
    raise ValueError(f"jobs.backend must be local or submitit, got {backend!r}")
