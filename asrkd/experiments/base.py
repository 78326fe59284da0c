"""What every experiment is: its systems, its stages, its report through the one publisher.

An experiment module ends with ``EXPERIMENT = Experiment(...)``: the command suffix, the report
section, the function that lists its systems (:class:`asrkd.layout.System` specs, trained or
not), the stage that trains them, and the function that scores them into a :class:`Report`.
Decoding is the same for all (every system the experiment lists, through the decode stage)
unless the experiment decodes only some (``decoded``) or none. An experiment whose Markdown is
a function of its report.json section alone (``markdown``) also has ``render``: the section's
.md written again from report.json, so that a report made before a change of wording reads as
the code now writes it, with no model retrained or rescored. ``asrkd train-<command>``,
``decode-<command>``, ``report-<command>`` and ``render-<command>`` are this object's
:meth:`Experiment.step`, as are the commands an experiment adds under names of its own
(``commands``: the image experiment's prepare and train steps).

An experiment is a folder, ``asrkd/experiments/<name>/`` (docs/contributing.md): its modules (one
or more ending with an ``EXPERIMENT``, which ``asrkd.cli`` finds), its config section
(``<section>.yaml``: the config's ``<section>``, whose keys' types that the defaults do not show
are the ``config`` of its Experiment), the model and loss pieces only it uses, its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from asrkd import sections
from asrkd.layout import System, names
from asrkd.nnet import decode as decode_stage
from asrkd.report import aligned_utterances_line, current_report, machine, merge_into_report, publish_experiment, with_machines_note, write_section
from asrkd.schema import ConfigTypes

STEPS = ("train", "decode", "report", "render")


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
    systems: Callable[..., list[System]] | None = None  # (cfg) -> every system it trains or scores (None: no layout.System)
    train: Callable[..., None] | None = None  # (cfg) -> None: trains what is not complete
    report: Callable[..., Report] | None = None  # (cfg) -> the scored result (None: another experiment reports it)
    decoded: Callable[..., list[System]] | None = None  # (cfg) -> the systems it decodes (default: all of systems)
    decodes: bool = True  # False: frame-level only, no decode stage
    markdown: Callable[[dict], str] | None = None  # (report.json's section) -> <section>.md: the report's, and render's
    config: ConfigTypes = ConfigTypes()  # the types of its config section's keys that their defaults do not show
    commands: dict[str, Callable[..., None]] = field(default_factory=dict)  # commands of its own: full name -> (cfg) -> None

    def steps(self) -> tuple[str, ...]:
        """The steps this experiment has, in pipeline order."""
        have = {"train": self.train is not None, "decode": self.decodes and self.systems is not None, "report": self.report is not None,
                "render": self.markdown is not None}
        return tuple(step for step in STEPS if have[step])

    def command_names(self) -> dict[str, str]:
        """Every ``asrkd`` command of this experiment -> its step: ``<step>-<command>`` for the
        pipeline steps, and the commands of its own under their names."""
        return {f"{step}-{self.command}": step for step in self.steps()} | {name: name for name in self.commands}

    def step(self, name: str) -> Callable[..., None]:
        """The function of ``asrkd <name>-<command>``, or of its own command ``name``."""
        if name in self.commands:
            return self.commands[name]
        if name not in self.steps():
            raise ValueError(f"experiment {self.command} has no {name} step (it has {', '.join(self.steps())})")
        return {"train": self.train, "decode": self.decode, "report": self.publish, "render": self.render}[name]

    def decode(self, cfg) -> None:
        """WER of every system the experiment decodes, each once (the decode stage's, resumable)."""
        decode_stage.run(cfg, names((self.decoded or self.systems)(cfg)))

    def publish(self, cfg) -> None:
        """The report stage: score, then publish through :func:`asrkd.report.publish_experiment`. The
        section names the machine and code that made it (RESULTS.md's "Made by"), as the main report does."""
        report = self.report(cfg)
        place = sections.report_place(cfg)
        result = {"machine": machine(cfg.train.device), **report.result}  # an experiment that names its own keeps it
        publish_experiment(place, self.section, result, with_aligned_line(report.markdown, report.aligned), report.figures, report.systems)
        for section, rows in report.rows_elsewhere.items():
            merge_into_report(place, {section: {**current_report(place).get(section, {}), **rows}})

    def render(self, cfg) -> None:
        """``asrkd render-<command>``: <section>.md again from the section of the report (results_dir's
        report.json, else exp/report's), written where the report stage writes it; figures and
        numbers stay as they are."""
        place = sections.report_place(cfg)
        report = current_report(place)
        if self.section not in report:
            raise FileNotFoundError(f"no {self.section!r} section in {cfg.results_dir or 'exp/report'}/report.json: "
                                    f"run asrkd report-{self.command} first")
        result = report[self.section]
        write_section(place, f"{self.section}.md", with_machines_note(with_aligned_line(self.markdown(result), report.get("frame_accuracy_utterances")), result))


def with_aligned_line(markdown: str, aligned: dict[str, dict] | None) -> str:
    """``markdown`` and, when the GMM did not align every utterance of a set, the line saying over how many frame accuracy is."""
    if aligned and any(n["aligned"] < n["of"] for n in aligned.values()):  # every cell then says over how many
        return markdown + aligned_utterances_line(aligned) + "\n"
    return markdown


def dense_only(cfg, temperature: float, seeds: int, **distill):
    """The config of an experiment's students: ``seeds`` dense students at ``temperature`` alone (no
    top-k, no logit matching), with ``distill`` overrides (a lever's students, a subset run's). A new
    config, as a recipe's overrides make one; ``cfg`` is left as it is."""
    merged = OmegaConf.merge(cfg, {"distill": {"temperatures": [temperature], "logit_matching": False, **distill}})
    merged.distill.students = {"dense": [temperature]}  # replaced, not merged: no top-k student
    merged.distill.seeds = {"dense": seeds}
    return merged
