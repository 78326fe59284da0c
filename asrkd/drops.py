"""Dropped utterances: nothing is dropped silently. A stage says how many it dropped and why,
writes every one with its reason, and fails past ``prep.max_drop_fraction``."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from asrkd.errors import StageError
from asrkd.files import write_json

log = logging.getLogger(__name__)


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
