"""What every stage shares: completion markers and the accounting of dropped utterances."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

DONE = ".done"


def is_done(directory: Path) -> bool:
    return (Path(directory) / DONE).is_file()


def mark_done(directory: Path) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / DONE).write_text("")


def skip_if_done(directory: Path, what: str) -> bool:
    """True (and a log line) when ``directory`` holds complete outputs of ``what``."""
    if is_done(directory):
        log.info("%s: %s is complete, skipping (delete %s/%s to redo)", what, directory, directory, DONE)
        return True
    return False


class TooManyDropped(RuntimeError):
    """A stage lost more utterances than ``prep.max_drop_fraction`` allows."""


def account_dropped(stage: str, total: int, dropped: dict[str, str], max_fraction: float, report: Path) -> None:
    """Say how many utterances ``stage`` dropped and why; write them out; fail past the limit.

    Nothing is dropped silently: the reasons are logged grouped by kind and every utterance
    with its reason is written to ``report`` (JSON).
    """
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"stage": stage, "total": total, "dropped": dropped}, indent=1, sort_keys=True))
    if not dropped:
        log.info("%s: kept all %d utterances", stage, total)
        return
    kinds = Counter(reason.split(": ", 1)[-1].split(" (")[0] for reason in dropped.values())
    log.warning(
        "%s: dropped %d of %d utterances (%s); list in %s",
        stage, len(dropped), total, "; ".join(f"{n} x {k}" for k, n in kinds.most_common()), report,
    )
    if len(dropped) > max_fraction * total:
        raise TooManyDropped(
            f"{stage}: dropped {len(dropped)} of {total} utterances, more than "
            f"prep.max_drop_fraction={max_fraction}; see {report}"
        )
