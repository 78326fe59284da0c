"""Multi-step distillation into a much smaller student: TAKD, DGKD, model-ensemble KD, teacher switching.

When the student is far smaller than its teacher, a direct student learns badly; the methods
below put models of middle sizes (``chains.sizes``, down to the student) between them. Model k
of a chain (the teacher, ``chains.teacher``, is model 0; the student the last) learns from:

* ``hard`` (row ``small_hard``): the labels alone (the student's size, no teacher);
* ``direct`` (``small_direct_kd``): the teacher alone;
* ``takd`` (Mirzadeh et al. 2020): model k-1, each assistant distilled from the one above, so
  errors pass down the chain;
* ``dgkd`` (Son et al. 2021): every model above it, each teacher dropped at random per batch
  with probability ``chains.teacher_drop`` (at least one stays), against the mean of the kept
  teachers' distributions: the paper's sum of one loss per kept teacher divided by their number
  (a cross-entropy is linear in its targets), so the soft term keeps one teacher's weight
  against the hard term; a dropped teacher costs no forward pass;
* ``dgkd_summed``: DGKD as its paper writes it, the kept teachers' losses summed, so the soft
  term's weight against the hard term grows with the number of teachers kept;
* ``ensemble_kd`` (model-ensemble KD): the pseudo-teacher averaging the outputs (softmax at T) of
  every model above it, in one loss: DGKD without dropping;
* ``switching``: one model above it per batch, drawn uniformly;
* ``switching_members`` (Fukuda et al., Interspeech 2017, who switch among teachers): the student
  alone, taught per batch by one member of the teacher ensemble, drawn uniformly.

Every method's final student trains ``chains.seeds`` times (seed r: ``<name>_seed<r>``; the
assistants above it are shared), and its row is the mean over them, the seeds resampled too.

Every model trains with the students' loss (T^2 CE(soft) + ``distill.hard_weight`` CE(hard),
:mod:`asrkd.distill.losses`) through the one training loop, at each T of
``chains.temperatures``; a method's T is chosen on the validation frame accuracy of its final
student. The teacher's soft targets are its store (``soft-targets``; an ensemble's members
averaged), the assistants' computed in the step. The first assistant has the teacher alone
above it in every multi-step chain, so it is one model (``chain_T<T>_<size>``), as is the direct
student; the others are ``chain_T<T>_<method>_<size>``, the hard one ``chain_hard_<size>``.

Cost per row: training seconds of every model its chain needed, and teacher forward passes per
frame of the final student's training (the top teacher counted as its members, as computing
it in the step would cost; its store pays that once for all students).

Commands: ``train-chains``, ``decode-chains``, ``report-chains`` (``recipes/an4/run_chains.sh``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from omegaconf import OmegaConf

from asrkd.distill.losses import distillation_loss
from asrkd.distill.student import Student, TeacherOnTheFly, target_source
from asrkd.evaluate import bootstrap_key, experiment_scoring
from asrkd.experiments.base import Experiment, Report
from asrkd.layout import Layout, System
from asrkd.nnet.checkpoints import load_system, read_history, system_dirs
from asrkd.nnet.train import Model, train_stage
from asrkd.nnet.training_set import TrainingSet
from asrkd.report import percent, resampled, saved_figure, single_seed_note, with_ci
from asrkd.schema import COUNT, ConfigTypes, Kind, PROBABILITY
from asrkd.stats import format_interval


log = logging.getLogger(__name__)

METHODS = ("hard", "direct", "takd", "dgkd", "dgkd_summed", "ensemble_kd", "switching", "switching_members")
ROWS = {"hard": "small_hard", "direct": "small_direct_kd", "takd": "takd", "dgkd": "dgkd", "dgkd_summed": "dgkd_summed",
        "ensemble_kd": "ensemble_kd", "switching": "teacher_switching", "switching_members": "teacher_switching_members"}
MULTI_STEP = ("takd", "dgkd", "dgkd_summed", "ensemble_kd", "switching")


class Link(NamedTuple):
    """One model of a chain: its name, size, and the names of the models it learns from (the
    teacher is ``chains.teacher``), with how it mixes them per batch."""

    name: str
    layers: int
    width: int
    teachers: tuple[str, ...]
    rule: str  # none (labels only) | all (their mean) | drop (DGKD: the kept ones' mean) | drop_sum (their sum) | one (switching)
    replicate: int = 0

    def system(self, temperature: float | None, role: str) -> System:
        """Its spec: a student, an assistant (a chain model above the student) or the control (labels alone)."""
        if self.rule == "none":
            return System(self.name, "control", seed=self.replicate)
        return System(self.name, role, teacher="+".join(self.teachers), form="dense", temperature=temperature, seed=self.replicate)


def size_tag(layers: int, width: int) -> str:
    return f"{layers}x{width}"


def chain(ccfg, exp_dir: Path, method: str, temperature: float) -> list[Link]:
    """The models ``method`` trains at ``temperature`` (``ccfg``: the ``chains`` section), top down; the last is its student."""
    if method not in METHODS:
        raise ValueError(f"chains.methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    sizes = [(int(layers), int(width)) for layers, width in ccfg.sizes]
    if len(sizes) < 2 and method in MULTI_STEP:
        raise ValueError(f"chains.sizes={sizes}: {method} needs at least one assistant above the student")
    student = sizes[-1]
    if method == "hard":
        return [Link(f"chain_hard_{size_tag(*student)}", *student, (), "none")]
    top = str(ccfg.teacher)
    if method == "direct":
        return [Link(f"chain_T{temperature:g}_{size_tag(*student)}", *student, (top,), "all")]
    if method == "switching_members":
        return [Link(f"chain_T{temperature:g}_{method}_{size_tag(*student)}", *student, members(ccfg, exp_dir), "one")]
    rule = {"takd": "all", "dgkd": "drop", "dgkd_summed": "drop_sum", "ensemble_kd": "all", "switching": "one"}[method]
    links = [Link(f"chain_T{temperature:g}_{size_tag(*sizes[0])}", *sizes[0], (top,), "all")]
    for size in sizes[1:]:
        above = (links[-1].name,) if method == "takd" else (top, *(link.name for link in links))
        links.append(Link(f"chain_T{temperature:g}_{method}_{size_tag(*size)}", *size, above, rule))
    return links


def members(ccfg, exp_dir: Path) -> tuple[str, ...]:
    """The systems of the teacher ensemble's members (``<teacher>/member-<i>``)."""
    top = str(ccfg.teacher)
    dirs = system_dirs(Path(exp_dir), top)
    if dirs == [Layout(Path(exp_dir)).model(top)]:
        raise ValueError(f"chains.methods: switching_members switches among an ensemble's members, and chains.teacher={top} is one DNN "
                         "(exp/dnn/<teacher>/member-* not found); make the teacher an ensemble or drop the method")
    return tuple(f"{top}/{d.name}" for d in dirs)


def seeds_of(ccfg, link: Link) -> list[Link]:
    """A final student's ``chains.seeds`` replicates: ``<name>``, ``<name>_seed1``, ..."""
    return [link._replace(name=link.name if r == 0 else f"{link.name}_seed{r}", replicate=r) for r in range(int(ccfg.seeds))]


def model_cfg(cfg, link: Link):
    """The training config of one chain model: its size, the chains' epochs."""
    merged = OmegaConf.merge(cfg, {"model": {"num_hidden_layers": link.layers, "hidden_dim": link.width}})
    return OmegaConf.merge(merged, {"train": {"epochs": cfg.chains.epochs}}) if cfg.chains.epochs else merged


class TeacherMix:
    """Per batch, the soft targets of some of the teachers, chosen by ``rule``: all of them, each
    dropped with probability ``drop`` (at least one kept), or one drawn uniformly; their mean,
    or (``drop_sum``) their sum, one cross-entropy per teacher. The draw is seeded by ``seed``
    and the batch's first frame, so a resumed run draws the same."""

    def __init__(self, teachers: list[Callable[[torch.Tensor], torch.Tensor]], rule: str, drop: float, seed: int):
        self.teachers, self.rule, self.drop, self.seed = teachers, rule, float(drop), int(seed)

    def chosen(self, batch: torch.Tensor) -> list[int]:
        n = len(self.teachers)
        if self.rule == "all" or n == 1:
            return list(range(n))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(batch[0]))
        if self.rule == "one":
            return [int(torch.randint(n, (1,), generator=generator))]
        kept = [i for i, u in enumerate(torch.rand(n, generator=generator).tolist()) if u >= self.drop]
        return kept or [int(torch.randint(n, (1,), generator=generator))]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        chosen = self.chosen(batch)
        targets = self.teachers[chosen[0]](batch)
        for i in chosen[1:]:
            targets = targets + self.teachers[i](batch)
        return targets if self.rule == "drop_sum" else targets / len(chosen)


def teacher_passes(link: Link, top: str, top_members: int, drop: float) -> float:
    """Expected teacher forward passes per frame of ``link``'s training (the top teacher: its members)."""
    weights = [top_members if t == top else 1 for t in link.teachers]
    if not weights:
        return 0.0
    if link.rule == "one":
        return sum(weights) / len(weights)
    if link.rule in ("drop", "drop_sum") and len(weights) > 1:
        return (1 - drop) * sum(weights) + drop ** len(weights) * sum(weights) / len(weights)
    return float(sum(weights))


def train_link(cfg, link: Link, temperature: float, training: TrainingSet) -> None:
    """Train one chain model (skipped when complete) on ``training`` (a TrainingSet: every model of
    every chain reads the same frames, loaded once): labels alone, or the students' loss against
    its mixed teachers."""
    exp, dcfg, ccfg = Path(cfg.exp_dir), cfg.distill, cfg.chains
    mcfg = model_cfg(cfg, link)
    values = {"layers": link.layers, "width": link.width, "teachers": list(link.teachers), "rule": link.rule}
    if link.rule == "none":
        train_stage(mcfg, [Model(f"train-chains {link.name}", Layout(exp).model(link.name), link.replicate, values=values)], training)
        return
    top = str(ccfg.teacher)
    make_top, inputs = None, {}
    if top in link.teachers:
        top_cfg = OmegaConf.merge(cfg, {"distill": {"teacher": top, "on_the_fly": False}})
        make_top, inputs = target_source(top_cfg, Student("dense", temperature, 0), training)
    for name in link.teachers:
        if name != top:
            inputs[f"teacher {name}"] = system_dirs(exp, name)[0]
    values |= {"temperature": temperature} | ({"teacher_drop": float(ccfg.teacher_drop)} if link.rule in ("drop", "drop_sum") else {})

    def loss(data, hard):
        def assistant(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
            on_the_fly = TeacherOnTheFly([load_system(exp, name, data.pdf_ids.device)], data.frames)
            return lambda batch: on_the_fly.soft_targets(batch, temperature)

        mix = TeacherMix([make_top(data) if name == top else assistant(name) for name in link.teachers], link.rule,
                         ccfg.teacher_drop, int(cfg.seed) + 100 * link.replicate)
        return lambda logits, batch: distillation_loss(logits, mix(batch), hard[batch], temperature, dcfg.soft_weight, dcfg.hard_weight)

    train_stage(mcfg, [Model(f"train-chains {link.name}", Layout(exp).model(link.name), link.replicate, values=values)], training, loss=loss,
                keys=("distill.soft_weight", "distill.hard_weight"), inputs=inputs)


def runs(ccfg, exp_dir: Path) -> list[tuple[str, float | None, list[Link]]]:
    """(method, T, its chain) of every run the ``chains`` section asks for (hard: once, without T)."""
    out = []
    for method in ccfg.methods:
        temperatures = [None] if method == "hard" else [float(t) for t in ccfg.temperatures]
        out += [(str(method), t, chain(ccfg, exp_dir, str(method), t or 1.0)) for t in temperatures]
    return out


def systems(cfg) -> list[System]:
    """Every model of every chain at every T, top down (a shared model once), each final student's seeds."""
    assistants, students = [], []
    for _, temperature, links in runs(cfg.chains, cfg.exp_dir):
        assistants += [link.system(temperature, "assistant") for link in links[:-1]]
        students += [link.system(temperature, "student") for link in seeds_of(cfg.chains, links[-1])]
    return list(dict.fromkeys(assistants + students))


def train(cfg) -> None:
    """Stage 0: every model of every chain at every T, top down (a shared model trains once),
    each final student ``chains.seeds`` times."""
    training = TrainingSet(cfg)  # the model's size is no part of it: one set serves every chain model
    done: set[str] = set()
    for _, temperature, links in runs(cfg.chains, cfg.exp_dir):
        for link in [*links[:-1], *seeds_of(cfg.chains, links[-1])]:
            if link.name not in done:
                train_link(cfg, link, temperature or 1.0, training)
                done.add(link.name)


def valid_accuracy(ccfg, exp_dir: Path, student: Link) -> float:
    """The final student's validation frame accuracy at its last epoch, the mean over its seeds."""
    scores = [read_history(Layout(Path(exp_dir)).model(link.name))[-1]["valid_frame_accuracy"] for link in seeds_of(ccfg, student)]
    return sum(scores) / len(scores)


def chosen(ccfg, exp_dir: Path) -> dict[str, tuple[float | None, list[Link]]]:
    """Each method's T, chosen on its final student's validation frame accuracy (ties: the lower T)."""
    out: dict[str, tuple[float | None, list[Link]]] = {}
    for method, temperature, links in runs(ccfg, exp_dir):
        if method not in out or valid_accuracy(ccfg, exp_dir, links[-1]) > valid_accuracy(ccfg, exp_dir, out[method][1][-1]):
            out[method] = (temperature, links)
    return out


def decoded(cfg) -> list[System]:
    """Stage 1 decodes each method's student (every seed) at its chosen T."""
    return [link.system(temperature, "student") for temperature, links in chosen(cfg.chains, cfg.exp_dir).values() for link in seeds_of(cfg.chains, links[-1])]


def temperature_label(temperature: float | None) -> str:
    return "–" if temperature is None else f"{temperature:g}"


def plot(result: dict, out: Path) -> None:
    """Student test frame accuracy per method with its interval, and every model of each chain."""
    test = result["eval_set"]
    with saved_figure(out, (8, 4.8), "chain model (teacher → student)", f"{test} frame accuracy (%)",
                      "Distilling into a small student: each method's chain (95% CI on the student)", fontsize=7) as ax:
        for row, entry in result["rows"].items():
            models = entry["chain"]
            xs = list(range(len(result["sizes"]) - len(models) + 1, len(result["sizes"]) + 1))
            ys = [100 * m["frame_accuracy"][test] for m in models]
            lo, hi = entry["frame_accuracy_ci"][test]
            line = ax.plot(xs, ys, marker="o", label=f"{row} (T = {temperature_label(entry['temperature'])})")[0]
            ax.errorbar([xs[-1]], [ys[-1]], yerr=[[ys[-1] - 100 * lo], [100 * hi - ys[-1]]], color=line.get_color(), capsize=3)
        ax.axhline(100 * result["teacher"]["frame_accuracy"][test], color="black", linestyle="--", label=f"teacher {result['teacher']['system']}")
        ax.set_xticks(range(len(result["sizes"]) + 1), ["teacher"] + result["sizes"])


def markdown(result: dict) -> str:
    test = result["eval_set"]
    lines = [f"# {result['corpus']}: distilling into a {result['sizes'][-1]} student ({' → '.join(['teacher', *result['sizes']])})", "",
             f"Teacher: {result['teacher']['system']} ({result['teacher']['model']}), {test} frame accuracy "
             f"{with_ci(result['teacher'], 'frame_accuracy', test)}.", "",
             f"| row | T | student | frame acc. train | frame acc. valid | frame acc. {test} [95% CI] | WER {test} [95% CI] "
             "| − small_direct_kd [95% CI] | P(> 0) | − small_hard [95% CI] | P(> 0) | chain seconds | teacher passes / frame |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, entry in result["rows"].items():
        acc = entry["frame_accuracy"]
        cells = []
        for other in ("vs_direct", "vs_hard"):
            diff = entry.get(other)
            cells += [format_interval(diff, signed=True), f"{diff['p_above_zero']:.2f}"] if diff else ["–", "–"]
        student = entry["system"] if isinstance(entry["system"], str) else f"{entry['system'][0]} (+{len(entry['system']) - 1} seeds)"
        lines.append(f"| {row} | {temperature_label(entry['temperature'])} | {student} | {percent(acc['train'])} "
                     f"| {percent(acc['valid'])} | {with_ci(entry, 'frame_accuracy', test)} | {with_ci(entry, 'wer', test)} | "
                     + " | ".join(cells) + f" | {entry['train_seconds']:.0f} | {entry['teacher_passes']:g} |")
    lines += ["", "Every model of each chain (the avalanche: how accuracy falls model by model):", "",
              "| row | " + " | ".join(result["sizes"]) + " |", "|---" * (len(result["sizes"]) + 1) + "|"]
    for row, entry in result["rows"].items():
        cells = ["–"] * (len(result["sizes"]) - len(entry["chain"])) + [
            f"{percent(m['frame_accuracy']['valid'])} / {percent(m['frame_accuracy'][test])}" for m in entry["chain"]]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"Cells: valid / {test} frame accuracy. Command: `{result['command']}`.",
              (f"T chosen per method on the final student's validation frame accuracy among {result['temperatures']}; "
               if len(result["temperatures"]) > 1 else f"T = {result['temperatures'][0]:g} for every method (the only one in chains.temperatures: no choice made); ")
              + f"DGKD drops each teacher with probability {result['teacher_drop']:g} per batch (dgkd: the kept teachers' mean; dgkd_summed: "
              "one loss per kept teacher, summed, as DGKD's paper writes it). Chain seconds: training time of every model "
              "the row's chain needed (shared ones counted in each row; every seed of the student); teacher passes: expected teacher "
              "forward passes per frame of the student's training, the top teacher counted as its members.",
              *([f"Each row's student: {result['seeds']} seeds (their mean; the bootstrap resamples seeds and test "
                 f"{resampled(result.get('bootstrap_unit'))}; the "
                 "assistants above it are one model each). The chain table shows the students' mean."] if result["seeds"] > 1
                else [single_seed_note(test, result.get('bootstrap_unit'))]), ""]
    return "\n".join(lines)


def systems_of(entry: dict) -> list[str]:
    """The systems of a report entry: its one model, or its seeds."""
    return entry["system"] if isinstance(entry["system"], list) else [entry["system"]]


def report(cfg) -> Report:
    """Stage 2: ``chains.md``, ``chains.png`` and the "chains" section of report.json."""
    exp = Path(cfg.exp_dir)
    evaluation, sets, command = experiment_scoring(cfg, "asrkd report-chains")
    test = evaluation.primary
    top = str(cfg.chains.teacher)
    top_members = len(system_dirs(exp, top))
    rows = {}
    for method, (temperature, links) in chosen(cfg.chains, cfg.exp_dir).items():
        models = [evaluation.entry([link.name], sets) for link in links[:-1]]
        students = [link.name for link in seeds_of(cfg.chains, links[-1])]
        student = evaluation.entry(students, sets, command=command, temperature=temperature)
        seconds = sum(h["seconds"] for link in [*links[:-1], *seeds_of(cfg.chains, links[-1])] for h in read_history(Layout(exp).model(link.name)))
        slim = [{"system": link.name, "frame_accuracy": m["frame_accuracy"]} for link, m in zip(links, [*models, student])]
        rows[ROWS[method]] = student | {"chain": slim, "train_seconds": seconds,
                                        "teacher_passes": teacher_passes(links[-1], top, top_members, float(cfg.chains.teacher_drop))}
    for other, method in (("vs_direct", "direct"), ("vs_hard", "hard")):
        if ROWS[method] in rows:
            reference = bootstrap_key(systems_of(rows[ROWS[method]]))
            for row, entry in rows.items():
                if row != ROWS[method]:
                    entry[other] = evaluation.frames.difference(bootstrap_key(systems_of(entry)), reference)
    teacher = evaluation.entry([top], sets)
    result = {"corpus": cfg.corpus, "command": command, "eval_set": test, "teacher": {**teacher, "system": top},
              "sizes": [size_tag(int(a), int(b)) for a, b in cfg.chains.sizes], "temperatures": [float(t) for t in cfg.chains.temperatures],
              "teacher_drop": float(cfg.chains.teacher_drop), "seeds": int(cfg.chains.seeds), "rows": rows, "bootstrap_unit": cfg.stats.unit}
    log.info("chains: %s", {row: round(entry["frame_accuracy"][test], 4) for row, entry in rows.items()})
    return Report(result, markdown(result), {"chains.png": plot}, aligned=evaluation.frame_accuracy_utterances)


# the types of chains.* that its defaults (chains.yaml) do not show
CONFIG_TYPES = ConfigTypes({"chains.epochs": Kind((int,), nullable=True)}, (("chains.teacher_drop", PROBABILITY), ("chains.sizes", COUNT)))

EXPERIMENT = Experiment("chains", "chains", systems, train=train, report=report, decoded=decoded, markdown=markdown, config=CONFIG_TYPES)
