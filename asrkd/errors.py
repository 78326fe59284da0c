"""The errors a stage raises: each says which stage, why, and what to do (the CLI prints the
message alone, one line)."""

from __future__ import annotations


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
