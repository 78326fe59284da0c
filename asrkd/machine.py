"""The machine and the process a stage runs in, as its record names them: the CPU (its model and
instruction-set family decide the last bits of every number), the code's git commit, and the
command that runs (``made_by``: the recipe line, or the asrkd command with its overrides)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
