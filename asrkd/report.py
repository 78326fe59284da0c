"""What every report writes and how: Markdown tables and intervals as text, PNG figures, and
the one report.json each recipe's reports merge into (committed paths made repository-relative,
rows that mix configs named with the command that remakes them).

Ground layer: reads stage records and decode results from disk, imports nothing that trains or
decodes. The scoring that fills the reports is asrkd.evaluate.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from asrkd.files import atomic_write, copy_file, write_json, write_text
from asrkd.layout import Layout
from asrkd.locks import exclusive
from asrkd.machine import code_commit, cpu_description
from asrkd.parallel import pick_device
from asrkd.stats import format_interval

log = logging.getLogger(__name__)


REPO = Path(__file__).resolve().parent.parent  # reports commit paths relative to it


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def with_ci(entry: dict, metric: str, set_name: str = "test") -> str:
    """'55.97% [55.10, 56.84]': a system's value on ``set_name`` with its 95% interval, or '–'."""
    value = (entry.get(metric) or {}).get(set_name)
    ci = (entry.get(f"{metric}_ci") or {}).get(set_name)
    if value is None:
        return "–"
    return format_interval({"estimate": value, "ci": ci}) if ci else percent(value)


def tuning_description(tuning: str) -> str:
    return "the validation speakers" if tuning == "valid" else f"{tuning}"


def aligned_utterances_line(counts: dict[str, dict]) -> str:
    """Over how many utterances of each set frame accuracy is computed (the GMM may not align all)."""
    return "Frame accuracy is over the utterances the GMM aligned: " + "; ".join(f"{name} {n['aligned']:,} of {n['of']:,}" for name, n in counts.items()) + "."


def lm_used(report: dict) -> str:
    """The LM the report's systems decoded with (evaluate records it); a report older than that
    record decoded with the n-gram trained on the training transcripts, of the config's order."""
    order = ((report.get("config") or {}).get("graph") or {}).get("lm_order")
    return report.get("lm") or f"a {f'{order}-gram' if order else 'n-gram'} LM on the training transcripts"


def out_of_vocabulary_line(by_set: dict[str, dict]) -> str:
    """Each scored set's share of reference words outside the LM's vocabulary: errors no acoustic model can avoid."""
    def described(name: str, oov: dict) -> str:
        words = f": {' '.join(oov['oov_words'])}" if oov["oov_types"] <= 10 else f", most often {' '.join(list(oov['oov_words'])[:10])}"
        causes = oov.get("causes") or {}  # reports made before causes were recorded have none
        why = "".join(f"; {c['types']} {cause}" for cause, c in causes.items())
        return (f"{name} {percent(oov['oov_rate'])} of {oov['tokens']:,} words"
                + (f" ({oov['oov_types']} word type{'s' if oov['oov_types'] > 1 else ''}{words}{why})" if oov["oov_types"] else ""))
    return "Out of the LM's vocabulary (reference words no path of the graph can output): " + "; ".join(
        described(name, oov) for name, oov in by_set.items()) + "."


def comparable(report: dict, system: dict) -> bool:
    """Whether a row was scored against the report's labels: the same alignments (their
    fingerprints, ``labels``) for every set its frame accuracy is on. A row without frame accuracy
    (the GMM: WER against the transcripts) always is; one that records no labels (scored before
    rows kept them) never is."""
    if system.get("frame_accuracy") is None:
        return True
    labels = system.get("labels")
    return labels is not None and report.get("labels") is not None and all(report["labels"].get(k) == v for k, v in labels.items())


def markdown_table(report: dict) -> str:
    sets = report.get("eval_sets", ["test"])
    unseen = report.get("unseen_sentences", ["test"])
    columns = ([f"frame acc. {s} [95% CI]" for s in sets] + [f"WER {s} [95% CI]" for s in sets]
               + [f"WER {s} (unseen sentences)" for s in unseen])
    header = ["| system | model | seeds | frame acc. train | frame acc. valid | " + " | ".join(columns) + " | LMWT |",
              "|---|---|---|---|---|" + "---|" * len(columns) + "---|"]

    def row(name: str, system: dict) -> str:
        acc = system.get("frame_accuracy") or {}
        wer = system.get("wer") or {}
        cells = ([with_ci(system, "frame_accuracy", s) for s in sets] + [with_ci(system, "wer", s) for s in sets]
                 + [percent(wer.get(f"{s}_unseen")) for s in unseen])
        return (f"| {name} | {system['model']} | {system.get('seeds', 1)} | {percent(acc.get('train'))} | {percent(acc.get('valid'))} | "
                + " | ".join(cells) + f" | {system.get('lmwt', '–')} |")

    same = {name: system for name, system in report["systems"].items() if comparable(report, system)}
    apart = {name: system for name, system in report["systems"].items() if name not in same}
    lines = [f"# {report['corpus']}: frame accuracy and WER", "", *header, *(row(n, s) for n, s in same.items())]
    if apart:  # a table compares only rows scored against the same labels
        lines += ["", "Scored against other labels (an earlier alignment, or one not recorded): their frame accuracy is not comparable "
                  "with the rows above, nor their WER (other models, other tuning); each is remade by its recipe on the current alignment.",
                  "", *header, *(row(n, s) for n, s in apart.items())]
    others = {}  # rows added by later reports (distillation), by the command that made them
    for name, system in report["systems"].items():
        if system.get("command", report["command"]) != report["command"]:
            others.setdefault(system["command"], []).append(name)
    lines += ["", f"Command: `{report['command']}`" + "".join(f"; {', '.join(names)}: `{command}`" for command, names in others.items()), ""]
    for name, mixed in (report.get("mixed_configs") or {}).items():
        lines += [f"**This report mixes configs**: {name} was made with {', '.join(mixed['differs'])}, by "
                  f"`{mixed['made_by'] or 'an unrecorded command'}` (which remakes it); `{report['command']} --redo` from its stage remakes it "
                  "under this report's config.", ""]
    lines += [
              "Frame accuracy: argmax pdf-id vs the triphone GMM's forced alignment; valid = speakers held out of training.",
              f"WER: Kaldi WFST decoding (HCLG with {lm_used(report)}), LM weight and insertion penalty",
              f"chosen on {tuning_description(report.get('tuning_set', 'valid'))}; unseen = sentences that never occur in the LM's training text.",
              f"[95% CI]: bootstrap over whole {resampled(report.get('bootstrap_unit'))} of each set (asrkd/stats.py); rows with several seeds",
              "give the mean over seeds, and their interval resamples the seeds too; one seed: test-set variation only.", ""]
    unit = report.get("bootstrap_unit") or "utterance"
    other_units = {}  # rows a later report added (distillation: stats.unit=speaker), whose intervals resample something else
    for name, system in report["systems"].items():
        if system.get("bootstrap_unit", unit) != unit:
            other_units.setdefault(system["bootstrap_unit"], []).append(name)
    for other, names in other_units.items():
        lines += [f"Intervals over {resampled(other)} instead (made by a report with stats.unit={other}): {', '.join(names)}.", ""]
    if choice_line(report):
        lines += [choice_line(report), ""]
    if report.get("frame_accuracy_utterances"):
        lines += [aligned_utterances_line(report["frame_accuracy_utterances"]), ""]
    if report.get("out_of_vocabulary"):
        lines += [out_of_vocabulary_line(report["out_of_vocabulary"]), ""]
    gmm = report["gmm"]
    lines.append(f"GMM: {gmm['mono_pdfs']} monophone pdfs -> {gmm['tri_pdfs']} tied triphone states (pdf-ids), "
                 f"trained and aligned in {gmm['seconds']:.0f} s.")
    for name, system in report["systems"].items():
        if "train_seconds" in system:
            what = f"{system['epochs']} epochs" if "epochs" in system else "trained"
            lines.append(f"{name}: {what} in {system['train_seconds']:.0f} s.")
    lines.append(f"Machine: {report['machine']}.")
    note = machines_note({"systems": report["systems"]})
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n"


@contextmanager
def saved_figure(out: Path, size: tuple[float, float], xlabel: str, ylabel: str, title: str, **legend) -> Iterator:
    """Axes to draw on; on exit the labels, grid and legend go on and the PNG is written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(**legend)
        fig.tight_layout()
        with atomic_write(out) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def decoding_result(exp: Path, system: str) -> dict:
    """WER fields of a decoded system (empty when the decode stage has not run for it): every set
    wer.json scores (the eval sets, their unseen sentences, the tuning set), in that order."""
    path = Layout(Path(exp)).decode(system) / "wer.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    scored = {k: v for k, v in result.items() if isinstance(v, dict) and "wer" in v}
    tuning = result.get("tuning_set", "valid")
    order = sorted(scored, key=lambda k: (k == tuning, k.endswith("_unseen")))
    return {"wer": {k: scored[k]["wer"] for k in order}, "wer_details": {k: scored[k] for k in order},
            "lmwt": result["lmwt"], "word_ins_penalty": result["word_ins_penalty"],
            "decode_real_time_factor": result["real_time_factor"], **({"lmwt_choice": result["choice"]} if "choice" in result else {})}


def choice_line(report: dict) -> str | None:
    """How clearly each system's LM weight and penalty were chosen on the tuning set (decode's
    ``choice``): the margin in word errors over the runner-up, a tie said as such."""
    said = []
    for name, system in report["systems"].items():
        choice = system.get("lmwt_choice")
        if not choice or choice.get("margin_errors") is None:
            continue
        runner = choice["runner_up"]
        said.append(f"{name} LMWT {system['lmwt']:g}, penalty {system['word_ins_penalty']:g} ({choice['errors']} errors of {choice['words']:,} words) "
                    f"beats the runner-up (LMWT {runner['lmwt']:g}, penalty {runner['word_ins_penalty']:g}) by {choice['margin_errors']} "
                    + ("word error" if choice["margin_errors"] == 1 else "word errors")
                    + (f": a tie ({len(choice['within_tie'])} points within {choice['tie_errors']} errors), broken by {choice['tie_broken_by']}"
                       if choice["tie"] else ""))
    return ("LM weight chosen on " + tuning_description(report.get("tuning_set", "valid")) + ": " + "; ".join(said) + ".") if said else None


def portable(value):
    """What a report commits, with absolute paths (``/x/y``, and overrides ``key=/x/y``) made
    relative to the repository: the same run in another clone writes the same bytes."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and " " not in value:
        key, equals, path = value.rpartition("=")
        if os.path.isabs(path):
            return f"{key}{equals}{os.path.relpath(path, REPO)}"
    return value


@dataclass(frozen=True)
class Place:
    """Where a run's reports go (:func:`asrkd.sections.report_place`): ``report_dir``, the run's own
    (exp/report), and ``results_dir`` when set, the committed copies they are merged into."""

    report_dir: Path
    results_dir: Path | None = None


def current_report(place: Place) -> dict:
    """The report reports merge into: ``results_dir/report.json`` when there is one, else exp/report's (or nothing)."""
    base = place.results_dir / "report.json" if place.results_dir else None
    if base is None or not base.is_file():
        base = place.report_dir / "report.json"
    return json.loads(base.read_text()) if base.is_file() else {}


def merge_into_report(place: Place, section: dict, files: tuple[str, ...] = ()) -> dict:
    """Add ``section``'s keys to the report (its "systems" to the systems there), rewrite
    report.md and RESULTS.md, and copy them and ``files`` (from exp/report) to ``results_dir``.

    The report merged into is ``results_dir/report.json`` when there is one (what the other
    recipes committed), else exp/report/report.json: each reporting stage owns its keys, so
    rerunning one recipe, even in a fresh clone, keeps what the others wrote.
    """
    out_dir = place.report_dir
    # two report stages at once (two recipes) would each read the report, add their keys and
    # write it back: one's keys lost. The whole read-merge-write holds the lock of the report merged into.
    with exclusive((place.results_dir or out_dir) / ".report.lock"):
        report = current_report(place)
        systems = {**report.get("systems", {}), **section.get("systems", {})}
        report.update(portable(section))
        report["systems"] = portable(systems)
        write_json(out_dir / "report.json", report)
        if is_corpus_report(report):  # an experiment reported before the main report stage has no table of systems yet
            write_text(out_dir / "report.md", markdown_table(report))
            write_text(out_dir / RESULTS, results_listing(report))
        if place.results_dir:
            results_dir = place.results_dir
            for name in ("report.json", *(("report.md", RESULTS) if is_corpus_report(report) else ()), *files):
                copy_file(out_dir / name, results_dir / name)
            log.info("report merged into %s", results_dir)
    return report


def is_corpus_report(report: dict) -> bool:
    """Whether ``report`` holds the main recipe's report (asrkd evaluate's), which report.md tabulates."""
    return "corpus" in report and "gmm" in report and "systems" in report


def publish(place: Place) -> None:
    """``asrkd publish`` (recipes: ``--publish``): a run's reports (exp/report) merged into
    ``results_dir``, the committed copies README quotes. Recipes write their reports under their
    exp dir only, so running one never modifies a committed file; publishing is this explicit step.

    report.json's sections replace those of the same name there and its systems join the systems
    there, so publishing one recipe's run keeps what the others published; report.md and
    RESULTS.md are made again from the merged report (an image report, which is its corpus's whole
    report, is copied as it is), and every other report file (a section's .md, figures) is copied."""
    if not place.results_dir:
        raise ValueError("publish needs results_dir=DIR: where the reports are merged (recipes: --publish names results/<corpus>)")
    source, results = place.report_dir, place.results_dir
    if not (source / "report.json").is_file():
        raise FileNotFoundError(f"{source}/report.json: nothing to publish; run a recipe's report stage first")
    with exclusive(results / ".report.lock"):
        report = json.loads((source / "report.json").read_text())
        published = json.loads((results / "report.json").read_text()) if (results / "report.json").is_file() else {}
        systems = {**published.get("systems", {}), **report.get("systems", {})}
        published.update(report)
        if systems:
            published["systems"] = systems
        write_json(results / "report.json", published)
        corpus_report = is_corpus_report(published)
        if corpus_report:
            write_text(results / "report.md", markdown_table(published))
            write_text(results / RESULTS, results_listing(published))
        copied = [p for p in sorted(source.iterdir()) if p.is_file() and p.suffix in (".md", ".png")
                  and not (corpus_report and p.name in ("report.md", RESULTS))]
        for path in copied:
            copy_file(path, results / path.name)
    log.info("published %s into %s (%d files)", source, results, len(copied) + 1 + 2 * corpus_report)


def dicts_in(value) -> Iterator[dict]:
    """Every dict inside ``value`` (a report or any part of it), depth first, in order."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from dicts_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from dicts_in(item)


def made_on(section) -> dict[str, list[str]]:
    """CPU -> the systems of ``section`` (any part of a report) whose models were made there, from
    the models' records (``made_on``). "not recorded" holds the systems none of whose records
    names a CPU (models older than that field); a system recorded anywhere is never there too."""
    out: dict[str, set[str]] = {}
    for node in dicts_in(section):
        records = node.get("stage")
        if isinstance(records, dict):
            for system, record in records.items():
                if isinstance(record, dict) and "fingerprint" in record:
                    for cpu in record.get("made_on") or [NOT_RECORDED]:
                        out.setdefault(cpu, set()).add(system)
    recorded = {system for cpu, systems in out.items() if cpu != NOT_RECORDED for system in systems}
    if NOT_RECORDED in out:
        out[NOT_RECORDED] -= recorded
        if not out[NOT_RECORDED]:
            del out[NOT_RECORDED]
    return {cpu: sorted(systems) for cpu, systems in sorted(out.items())}


NOT_RECORDED = "not recorded"


def machines_note(section) -> str | None:
    """A line saying that ``section``'s rows come from models made on more than one machine,
    naming them, or that some rows' machine is not recorded; None when every row names one.
    Numbers are bit for bit only on one CPU model with one code, so such rows differ by more than their configs."""
    cpus = made_on(section)
    unknown = cpus.pop(NOT_RECORDED, [])

    def listed(systems: list[str]) -> str:
        return f"{', '.join(systems[:4])}{f' and {len(systems) - 4} more' if len(systems) > 4 else ''}"

    unknown_part = f"not recorded (models made before their records named the CPU): {listed(unknown)}" if unknown else ""
    if len(cpus) < 2:
        return f"Machine {unknown_part}." if unknown and cpus else None
    parts = [f"{cpu}: {listed(systems)}" for cpu, systems in cpus.items()] + ([unknown_part] if unknown else [])
    return ("**Rows made on different machines** (numbers are bit for bit only on one CPU model with one code; elsewhere, within "
            f"seed spread: README, 'What reproduces how'): {'; '.join(parts)}.")


RESULTS = "RESULTS.md"


def scored_systems(report: dict) -> dict[str, list[dict]]:
    """Section of report.json -> every scored system in it (an entry with a system and frame
    accuracies: one model, or seeds), each system listed once, where it first appears."""
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for section in ("systems", *sorted(k for k in report if k != "systems")):
        for node in dicts_in(report.get(section)):
            if "system" in node and isinstance(node.get("frame_accuracy"), dict):
                name = node["system"] if isinstance(node["system"], str) else f"{node['system'][0]} (+{len(node['system']) - 1} seeds)"
                if name not in seen:
                    seen.add(name)
                    out.setdefault(section, []).append(node | {"listed_as": name})
    return out


def results_listing(report: dict) -> str:
    """RESULTS.md, as Kaldi and icefall recipes keep one: every scored system of the corpus with
    its test WER and frame accuracy [95% CI], by the report section (and its markdown) it comes
    from, generated from report.json at every report stage (``asrkd results`` regenerates it)."""
    test = (report.get("eval_sets") or ["test"])[0]
    lines = [f"# {report.get('corpus', '')}: results", "",
             f"Every scored system under this corpus, from report.json (generated: `asrkd results`, and by every report stage); "
             f"{test} set; the tables with their controls and differences: each section's .md beside this file "
             "(report.md for \"systems\"). Labels: `current` for a row scored against the alignment of the main report, "
             "`earlier` for one scored against another (or not recorded): compare only rows of the same labels.", ""]
    for section, entries in scored_systems(report).items():
        lines += [f"## {section}", "", f"| system | model | seeds | WER {test} [95% CI] | frame acc. {test} [95% CI] | labels |",
                  "|---|---|---|---|---|---|"]
        for entry in entries:
            lines.append(f"| {entry['listed_as']} | {entry.get('model', '–')} | {entry.get('seeds', 1)} | {with_ci(entry, 'wer', test)} "
                         f"| {with_ci(entry, 'frame_accuracy', test)} | {'current' if comparable(report, entry) else 'earlier'} |")
        lines.append("")
    lines += ["## Made by", "", "Each section's machine and code, from its report (CPU, threads, torch, device, code commit; "
              "'+changes': files differed from that commit; no code named: made before reports named it):", ""]
    lines += [f"- {section}: {made_by(report, section)}" for section in scored_systems(report)]
    return "\n".join(lines) + "\n"


def made_by(report: dict, section: str) -> str:
    """Where and with what code a section of report.json was made (the main report's for "systems")."""
    part = report if section == "systems" else report.get(section)
    return (part.get("machine") if isinstance(part, dict) else None) or "not recorded"


def write_results(place: Place) -> None:
    """``asrkd results``: RESULTS.md beside the report (results_dir, else exp/report) from its report.json."""
    report = current_report(place)
    out_dir = place.results_dir or place.report_dir
    if not report:
        raise FileNotFoundError(f"no report.json in {out_dir}: run a recipe's report stage first")
    write_text(out_dir / RESULTS, results_listing(report))


def with_machines_note(markdown: str, result: dict) -> str:
    """``markdown`` and, when ``result``'s models were made on more than one machine, the line that says so."""
    note = machines_note(result)
    return markdown + (f"{note}\n" if note else "")


def write_section(place: Place, file: str, markdown: str) -> None:
    """A section's Markdown (``file``) under exp/report and, when set, in ``results_dir``: what
    :func:`publish_experiment` writes of it, alone (``asrkd render-<experiment>``)."""
    write_text(place.report_dir / file, markdown)
    if place.results_dir:
        copy_file(place.report_dir / file, place.results_dir / file)


def publish_experiment(place: Place, name: str, result: dict, markdown: str, figures: dict[str, Callable[[dict, Path], None]],
                       systems: dict | None = None) -> None:
    """An experiment's report, the one way every experiment publishes: ``<name>.md`` (ending with
    a line naming the machines when its rows' models were made on more than one) and each of
    ``figures`` (file name -> what draws it from ``result``) under exp/report, ``result`` as the
    ``name`` section of report.json and ``systems`` among its systems, all merged into ``results_dir``."""
    out_dir = place.report_dir
    write_text(out_dir / f"{name}.md", with_machines_note(markdown, result))
    for file, draw in figures.items():
        draw(result, out_dir / file)
    merge_into_report(place, {**({"systems": systems} if systems else {}), name: result}, (f"{name}.md", *figures))


def publish_corpus_report(place: Place, result: dict, markdown: str, figures: dict[str, Callable[[dict, Path], None]], stale: tuple[str, ...] = ()) -> None:
    """The report of an experiment that is its corpus's whole report (the image experiment's
    results/<dataset>): ``result`` is report.json, ``markdown`` report.md, each of ``figures`` drawn
    under exp/report and all copied to ``results_dir``, where ``stale`` figures (of an earlier,
    fuller report) are removed, as they no longer match."""
    out_dir = place.report_dir
    write_json(out_dir / "report.json", result)
    write_text(out_dir / "report.md", markdown)
    for file, draw in figures.items():
        draw(result, out_dir / file)
    if place.results_dir:
        results = place.results_dir
        for file in ("report.json", "report.md", *figures):
            copy_file(out_dir / file, results / file)
        for file in stale:
            (results / file).unlink(missing_ok=True)


def resampled(unit: str | None) -> str:
    """What an interval resamples, by ``stats.unit`` as a result records it (bootstrap_unit): "utterances" or "speakers"."""
    return f"{unit or 'utterance'}s"


def single_seed_note(test: str, unit: str | None) -> str:
    return (f"[95% CI]: bootstrap over whole {test} {resampled(unit)} (asrkd/stats.py), differences paired; one seed per model: "
            "single-seed claims, test-set variation only.")


def recipe_command(default: str) -> str:
    """The recipe line that produced the run (recipes export it), else ``default``."""
    return os.environ.get("ASRKD_RECIPE_COMMAND") or default


def machine(device: str) -> str:
    """Where and by what a report was made: CPU model and family, cores, torch threads, torch
    version, the device (``train.device``) and the code's commit (asrkd.machine.code_commit)."""
    return (f"{cpu_description()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"device {pick_device(device)}, code {code_commit() or 'not from a git checkout'}")
