"""Long loops: a one-line progress counter on a terminal (never in logs), and the heap's free
pages handed back to the OS once a second, so a stage holds one batch's memory however many
batches it runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time
from typing import Iterator


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
