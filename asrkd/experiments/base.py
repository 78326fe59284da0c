"""What every experiment is: its systems, its stages, its report through the one publisher.

An experiment module ends with ``EXPERIMENT = Experiment(...)``: the command suffix, the report
section, the function that lists its systems (:class:`asrkd.layout.System` specs, trained or
not), the stage that trains them, and the function that scores them into a :class:`Report`.
Decoding is the same for all (every system the experiment lists, through the decode stage)
unless the experiment decodes only some (``decoded``) or none. ``asrkd train-<command>``,
``decode-<command>`` and ``report-<command>`` are this object's :meth:`Experiment.step`; a new
experiment is one module plus its entry in ``cli.EXPERIMENTS`` and its config section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from asrkd.layout import System, names
from asrkd.nnet.decode import decode_systems
from asrkd.report import aligned_utterances_line, current_report, merge_into_report, publish_experiment

STEPS = ("train", "decode", "report")


@dataclass(frozen=True)
class Report:
    """What a report stage computed: ``result`` (the report.json section), its Markdown, the figures
    drawn from it (file name -> draw(result, path)), the systems' records for report.json's
    ``systems`` and any rows this experiment adds to another experiment's section."""

    result: dict
    markdown: str
    figures: dict[str, Callable[[dict, Path], None]] = field(default_factory=dict)
    systems: dict | None = None
    rows_elsewhere: dict[str, dict] = field(default_factory=dict)  # section -> {key: value} merged into that section
    aligned: dict[str, dict] | None = None  # set -> {"aligned", "of"}: the utterances frame accuracy is over (Evaluation's)


@dataclass(frozen=True)
class Experiment:
    command: str  # train-<command>, decode-<command>, report-<command>
    section: str  # report.json's section, <section>.md
    systems: Callable[..., list[System]]  # (cfg) -> every system it trains or scores
    train: Callable[..., None] | None = None  # (cfg) -> None: trains what is not complete
    report: Callable[..., Report] | None = None  # (cfg) -> the scored result (None: another experiment reports it)
    decoded: Callable[..., list[System]] | None = None  # (cfg) -> the systems it decodes (default: all of systems)
    decodes: bool = True  # False: frame-level only, no decode stage

    def steps(self) -> tuple[str, ...]:
        """The steps this experiment has, in pipeline order."""
        have = {"train": self.train is not None, "decode": self.decodes, "report": self.report is not None}
        return tuple(step for step in STEPS if have[step])

    def step(self, name: str) -> Callable[..., None]:
        """The function of ``asrkd <name>-<command>``."""
        if name not in self.steps():
            raise ValueError(f"experiment {self.command} has no {name} step (it has {', '.join(self.steps())})")
        return {"train": self.train, "decode": self.decode, "report": self.publish}[name]

    def decode(self, cfg) -> None:
        """WER of every system the experiment decodes, each once (the decode stage's, resumable)."""
        decode_systems(cfg, names((self.decoded or self.systems)(cfg)))

    def publish(self, cfg) -> None:
        """The report stage: score, then publish through :func:`asrkd.report.publish_experiment`."""
        report = self.report(cfg)
        markdown = report.markdown
        if report.aligned and any(n["aligned"] < n["of"] for n in report.aligned.values()):  # every cell then says over how many
            markdown += aligned_utterances_line(report.aligned) + "\n"
        publish_experiment(cfg, self.section, report.result, markdown, report.figures, report.systems)
        for section, rows in report.rows_elsewhere.items():
            merge_into_report(cfg, {section: {**current_report(cfg).get(section, {}), **rows}})
