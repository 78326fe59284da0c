"""Training on several processes: torchrun + DistributedDataParallel, from the same stage commands.

With ``train.nproc`` = N > 1, a training command (train-dnn, train-ensemble, train-student)
re-launches itself under ``torch.distributed.run`` with N processes on this machine (for
several machines, launch ``torchrun ... -m asrkd.cli <command>`` on each yourself: the
commands read torchrun's RANK / WORLD_SIZE / LOCAL_RANK). Every rank loads the same frames,
walks the same seeded frame order and takes its slice of each global batch; DDP averages the
gradients, and :class:`asrkd.nnet.train.TrainStep` scales each rank's loss so the average is the
gradient of the global batch's mean: N processes train the model one process would at the
same ``train.batch_size`` (up to float summation order). Rank 0 alone evaluates and writes.
Backends: NCCL on GPUs (one per local rank), gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

TRAINING_COMMANDS = ("train-dnn", "train-ensemble", "train-student")


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def local_device(name: str) -> torch.device | None:
    """The GPU of this local rank under torchrun with ``train.device`` auto/cuda (else None: no say)."""
    if "LOCAL_RANK" in os.environ and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return None


def init_from_environment() -> None:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)
        log.info("rank %d of %d (%s)", rank(), world_size(), backend)
        if rank() != 0:
            logging.getLogger().setLevel(logging.WARNING)  # one rank says what happens


def launch_command(command: str, overrides: list[str], nproc: int) -> list[str] | None:
    """The torchrun command line that runs ``asrkd <command>`` on ``nproc`` processes, or None
    when it should run here (one process asked for, not a training command, or already a rank)."""
    if nproc <= 1 or command not in TRAINING_COMMANDS or "LOCAL_RANK" in os.environ:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "asrkd.cli", command, *overrides]


def wrap(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` in DistributedDataParallel when there are several ranks, else itself."""
    if world_size() == 1:
        return net
    device = next(net.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the ranks (itself with one)."""
    if world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def finish() -> None:
    """Leave the process group (a rank exiting with it alive can abort in gloo's threads)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def pick_device(name: str) -> torch.device:
    """``train.device``: auto (a GPU when there is one; under torchrun this rank's), cpu, cuda."""
    local = local_device(name)
    if local is not None:
        return local
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
