#!/usr/bin/env python3
"""Wheels of asrkd's dependencies for a machine with no package index (a lent GPU box).

    python tools/offline_wheels.py [--dest .whl] [--python-version 3.12] [--present NAME ...]

Walks the dependency closure of asrkd as installed here (the versions CI tests), leaves out
what the other machine already has (``--present``; the default is what the GPU machines'
image holds: torch, numpy, scipy, matplotlib, ...), downloads the rest as binary wheels for
that Python on manylinux x86-64, builds here the ones PyPI has only as source (pure Python,
e.g. antlr4-python3-runtime 4.9.3), and checks that every wheel's requirements are met by
the wheels or the present packages. tools/offline_env.sh installs them there. AN4's set:
~15 MB.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

PRESENT = ("torch", "numpy", "scipy", "matplotlib", "click", "pyyaml", "tqdm", "packaging", "zipp",
           "cloudpickle", "typing-extensions", "setuptools", "pip", "filelock", "jinja2", "sympy", "networkx",
           "fsspec", "pillow", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil",
           "six", "mpmath", "markupsafe", "triton")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, present: set[str], environment: dict[str, str]) -> dict[str, str]:
    """{name: installed version} of ``root``'s requirements, recursively, but for ``present``."""
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        dist = metadata.distribution(todo.pop())
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": ""}):
                continue
            name = canonical(requirement.name)
            if name in present or name in found:
                continue
            found[name] = metadata.version(requirement.name)
            todo.append(requirement.name)
    return found


def wheel_requirements(wheel: Path, environment: dict[str, str]) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
                names.append(canonical(requirement.name))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--present", nargs="*", default=list(PRESENT), help="packages the other machine has")
    args = parser.parse_args()

    major, minor = args.python_version.split(".")[:2]
    environment = {**default_environment(), "python_version": f"{major}.{minor}", "python_full_version": f"{major}.{minor}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    present = {canonical(name) for name in args.present}
    pins = closure("asrkd", present, environment)
    args.dest.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", f"{major}{minor}",
                "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "--platform=any", "-d", str(args.dest)]
    for name, version in sorted(pins.items()):
        if subprocess.run([*download, f"{name}=={version}"], capture_output=True, text=True).returncode != 0:
            # no wheel on PyPI: build one here (fine for pure Python; a compiled one would be for this machine)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(args.dest), f"{name}=={version}"], check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    have = {canonical(w.name.split("-")[0]) for w in wheels} | present
    unmet = {w.name: sorted(set(wheel_requirements(w, environment)) - have) for w in wheels}
    unmet = {name: needs for name, needs in unmet.items() if needs}
    if unmet:
        raise SystemExit(f"{args.dest}: requirements neither carried nor present: {unmet}")
    size = sum(w.stat().st_size for w in wheels)
    print(f"{args.dest}: {len(wheels)} wheels for Python {major}.{minor}, {size / 2**20:.1f} MiB: "
          + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())))


if __name__ == "__main__":
    main()
