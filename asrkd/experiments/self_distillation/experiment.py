"""Self-distillation with shallow exits ("Be Your Own Teacher", Zhang et al. 2019).

``self_distillation.name`` (``exp/dnn/byot``) is the baseline's network (``model.*``) with a
shallow exit after each hidden layer of ``self_distillation.exits`` (a head and an output
layer), trained jointly by
:func:`asrkd.distill.losses.self_distillation_loss` through the one training loop: every exit
learns the labels, the shallow ones also the deepest exit's softmax at T and its features. Each
exit is then written as a plain model of its own (``exp/dnn/byot_exit<k>``: k hidden layers and
its head's; the deepest, ``byot_exit<L>``, is the network without its heads),
so it decodes, scores and costs as any DNN: the heads are dropped at inference, or an exit is
used as an early exit.

Against: the plain model of the full depth trained alone (the baseline, ``train.name``), and
plain models as deep as each shallow exit, trained alone (``exp/dnn/plain_<k+1>x<width>``, the
exit's exact shape; the baseline when that is its shape); and, with
``self_distillation.deep_supervision_control``, the same network with the same exits, seed and
epochs whose every exit learns the labels alone (KD and hint weights 0:
``exp/dnn/<name>_deep_supervision``): exits beat plain models through deep supervision alone,
so only the difference from this control credits the distillation terms.

``self_distillation.head_width`` chooses the heads: null, full-width (one Linear to the hidden
width, then the output layer; each exit a plain model of uniform width, k + 1 hidden layers),
which the committed table uses; a width b, BYOT's heads: its branches are bottleneck blocks of
convolutions (1x1 reducing to a quarter of the channels, kxk, 1x1 expanding back to the
deepest features' channels), here fully connected, W -> b -> b -> W (k + 3 hidden layers;
the source's b is W / 4). The plain model of a bottleneck exit's shape is
``plain_<k>x<W>_bottleneck<b>``.

Commands: ``train-self-distill``, ``decode-self-distill``, ``report-self-distill``
(``recipes/an4/run_self_distill.sh``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from asrkd import sections
from asrkd.evaluate import experiment_scoring
from asrkd.experiments.base import Experiment, Report
from asrkd.experiments.self_distillation.loss import self_distillation_loss
from asrkd.experiments.self_distillation.model import exit_shape
from asrkd.layout import Layout, System
from asrkd.nnet.checkpoints import load_model, model_path, read_history, save_model
from asrkd.nnet.cost import system_cost
from asrkd.nnet.train import Model, train_stage
from asrkd.nnet.training_set import TrainingSet
from asrkd.parallel import pick_device
from asrkd.report import percent, saved_figure, single_seed_note, with_ci
from asrkd.schema import COUNT, ConfigTypes, Kind, Range
from asrkd.stage import plan
from asrkd.stats import format_interval

log = logging.getLogger(__name__)


def exit_layers(sd, model) -> list[int]:
    """Every exit, shallow to deep: the hidden layers of ``self_distillation.exits``, then the last."""
    depth = int(model.num_hidden_layers)
    exits = sorted({int(k) for k in sd.exits})
    if not exits or exits[0] < 1 or exits[-1] >= depth:
        raise ValueError(f"self_distillation.exits={exits}: each must be a hidden layer in 1..{depth - 1} (model.num_hidden_layers={depth})")
    return [*exits, depth]


def networks(sd) -> dict[str, tuple[float, float]]:
    """Each network with exits, name -> (KD weight, hint weight): BYOT's, then (with
    ``self_distillation.deep_supervision_control``) its control, every exit on the labels alone."""
    out = {str(sd.name): (float(sd.kd_weight), float(sd.hint_weight))}
    if sd.deep_supervision_control:
        out[control_name(sd)] = (0.0, 0.0)
    return out


def control_name(sd) -> str:
    return f"{sd.name}_deep_supervision"


def exit_name(sd, k: int, network: str | None = None) -> str:
    """exp/dnn/<network>_exit<k>: exit k of ``network`` (BYOT's network unless given) as a model of its own."""
    return f"{network or sd.name}_exit{k}"


def head_width(sd) -> int | None:
    """The bottleneck width of the shallow heads (BYOT's), or None: full-width heads."""
    width = sd.get("head_width")
    return None if width is None else int(width)


def head_values(sd) -> dict:
    """``head_width`` as a stage records it and the network takes it: only when set, so full-width
    runs keep their fingerprints."""
    return {} if head_width(sd) is None else {"head_width": head_width(sd)}


def shape(sd, model, k: int) -> dict:
    """Exit k's model shape: HybridDNN arguments (num_hidden_layers; hidden_dims for a bottleneck head)."""
    if k == int(model.num_hidden_layers):
        return {"num_hidden_layers": k}
    return exit_shape(int(model.hidden_dim), k, head_width(sd))


def hidden_layers(sd, model, k: int) -> int:
    """The hidden layers of exit k's model: k and its head's, or all of them for the deepest."""
    return shape(sd, model, k)["num_hidden_layers"]


def plain_name(sd, model, tcfg, k: int) -> str:
    """The plain model of exit k's shape, trained alone (the baseline when it has the baseline's shape)."""
    depth, width = int(model.num_hidden_layers), int(model.hidden_dim)
    if head_width(sd) is not None and k < depth:
        return f"plain_{k}x{width}_bottleneck{head_width(sd)}"
    layers = hidden_layers(sd, model, k)
    return str(tcfg.name) if layers == depth else f"plain_{layers}x{width}"


def train(cfg) -> None:
    """Stage 0: each network with exits (BYOT's, its deep-supervision control), each exit
    written as a model of its own, and the plain models as deep as the exits (the baseline is
    the main recipe's)."""
    exp, scfg = Path(cfg.exp_dir), cfg.self_distillation
    exits = exit_layers(cfg.self_distillation, cfg.model)
    training = TrainingSet(cfg)
    temperature = float(scfg.temperature)
    heads = head_values(cfg.self_distillation)
    for name, (kd_weight, hint_weight) in networks(cfg.self_distillation).items():
        values = {"exits": exits[:-1], "temperature": temperature, "kd_weight": kd_weight, "hint_weight": hint_weight, **heads}

        def loss(data, hard, kd_weight=kd_weight, hint_weight=hint_weight):
            return lambda outputs, batch: self_distillation_loss(outputs.logits, outputs.features, hard[batch], temperature, kd_weight, hint_weight)

        train_stage(cfg, [Model(f"train-self-distill {name}", Layout(exp).model(name), values=values, network={"exits": exits[:-1], **heads})],
                    training, loss=loss)
        write_exits(cfg, name, exits)
    for k in exits:
        plain = plain_name(cfg.self_distillation, cfg.model, cfg.train, k)
        if plain != str(cfg.train.name):
            dims = shape(cfg.self_distillation, cfg.model, k).get("hidden_dims")
            widths = {"hidden_dims": dims} if dims else None  # a bottleneck exit's shape: recorded, and built
            plain_cfg = OmegaConf.merge(cfg, {"model": {"num_hidden_layers": hidden_layers(cfg.self_distillation, cfg.model, k)}})
            train_stage(plain_cfg, [Model(f"train-dnn {plain}", Layout(exp).model(plain), values=widths, network=widths)],
                        training)  # the same frames, loaded once


def write_exits(cfg, name: str, exits: list[int]) -> None:
    """Every exit of network ``name`` as a plain model: exp/dnn/<name>_exit<k>."""
    exp = Path(cfg.exp_dir)
    network = None
    for k in exits:
        layers = hidden_layers(cfg.self_distillation, cfg.model, k)
        stage = plan(f"self-distill exit {k}", Layout(exp).model(exit_name(cfg.self_distillation, k, name)), sections.settings(cfg, ("model.hidden_dim", "model.left_context",
                     "model.right_context")), {"model": Layout(exp).model(name)},
                     {"exit": k, "model.num_hidden_layers": layers, **head_values(cfg.self_distillation)})
        if stage.up_to_date:
            continue
        if network is None:
            network = load_model(model_path(exp, name), pick_device(cfg.train.device))
        save_model(stage.out_dir / "final.pt", network.exit_model(k), epoch=-1)
        stage.commit(hidden_layers=layers)


def systems(cfg) -> list[System]:
    """Every system the report scores (stage 1 decodes): the exits of each network (the deep-supervision
    control's are its "control" role) and the plain models."""
    exits = exit_layers(cfg.self_distillation, cfg.model)
    byot = str(cfg.self_distillation.name)
    out = [System(exit_name(cfg.self_distillation, k, name), "exit" if name == byot else "control", teacher=byot if name == byot else None)
           for name in networks(cfg.self_distillation) for k in exits]
    return out + [System(plain_name(cfg.self_distillation, cfg.model, cfg.train, k), "baseline") for k in exits]


def plot(result: dict, out: Path) -> None:
    """Frame accuracy against size (parameters: the cost that does not move run to run, as the
    scoring times in the table do): the exits and the plain models of the same depths, drawn
    side by side at each size."""
    test = result["eval_set"]
    with saved_figure(out, (7, 4.5), "parameters (millions)", f"{test} frame accuracy (%)",
                      "Self-distillation (BYOT): each exit against a plain model as deep", fontsize=8) as ax:
        for key, label, marker, shift in (("exit", "exit of the self-distilled network", "o", -0.01), ("plain", "plain model trained alone", "s", 0.01)):
            points = [(row[key]["cost"]["parameters"] / 1e6 + shift, 100 * row[key]["frame_accuracy"][test]) for row in result["rows"]]
            errors = [[100 * (row[key]["frame_accuracy"][test] - row[key]["frame_accuracy_ci"][test][0]) for row in result["rows"]],
                      [100 * (row[key]["frame_accuracy_ci"][test][1] - row[key]["frame_accuracy"][test]) for row in result["rows"]]]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, fmt=marker, capsize=3, label=label)


def markdown(result: dict) -> str:
    test = result["eval_set"]
    lines = [f"# {result['corpus']}: self-distillation with shallow exits (BYOT)", "",
             f"| exit | hidden layers | exit frame acc. {test} [95% CI] | exit WER {test} [95% CI] | parameters | scoring ms / 1000 frames "
             f"| plain model as deep | plain frame acc. {test} [95% CI] | plain WER {test} [95% CI] | exit − plain [95% CI] | P(> 0) "
             f"| exit − full-depth plain [95% CI] |", "|---" * 12 + "|"]
    for row in result["rows"]:
        exit_, plain = row["exit"], row["plain"]
        lines.append(f"| {row['exit_layer']} | {row['hidden_layers']} | {with_ci(exit_, 'frame_accuracy', test)} | {with_ci(exit_, 'wer', test)} "
                     f"| {exit_['cost']['parameters']:,} | {exit_['cost']['ms_per_1000_frames']:.1f} | {plain['system']} "
                     f"| {with_ci(plain, 'frame_accuracy', test)} | {with_ci(plain, 'wer', test)} "
                     f"| {format_interval(row['minus_plain'], signed=True)} | {row['minus_plain']['p_above_zero']:.2f} "
                     f"| {format_interval(row['minus_full_plain'], signed=True)} |")
    if result["deep_supervision"]:
        lines += ["", f"The control: {result['deep_supervision']}, the same network, exits, seed and epochs, every exit on the labels alone "
                  "(KD and hint weights 0). What the distillation terms add is the exit's difference from it.", "",
                  f"| exit | deep supervision only: frame acc. {test} [95% CI] | WER {test} [95% CI] | exit − deep supervision [95% CI] "
                  f"| P(> 0) | deep supervision − plain [95% CI] |", "|---" * 6 + "|"]
        for row in result["rows"]:
            control = row["deep_supervision"]
            lines.append(f"| {row['exit_layer']} | {with_ci(control, 'frame_accuracy', test)} | {with_ci(control, 'wer', test)} "
                         f"| {format_interval(row['minus_deep_supervision'], signed=True)} | {row['minus_deep_supervision']['p_above_zero']:.2f} "
                         f"| {format_interval(row['deep_supervision_minus_plain'], signed=True)} |")
    lines += ["", f"Command: `{result['command']}`. Training: {result['train_seconds']:.0f} s for the network with its exits "
              f"(T = {result['temperature']:g}, KD weight {result['kd_weight']:g}, hint weight {result['hint_weight']:g}; the hints' target: the "
              f"deepest hidden layer's features before its dropout; the shallow heads: {heads_sentence(result.get('head_width'))}).",
              f"The full-depth plain model is {result['full_plain']} ({percent(result['full_plain_accuracy'])} {test} frame accuracy).",
              single_seed_note(test, result.get('bootstrap_unit')), ""]
    return "\n".join(lines)


def heads_sentence(width: int | None) -> str:
    if width is None:
        return "full-width, a Linear to the hidden width and the output layer, not BYOT's bottlenecks (self_distillation.head_width=null)"
    return f"BYOT's bottleneck, reduced to {width} and expanded back to the hidden width (self_distillation.head_width={width})"


def report(cfg) -> Report:
    """Stage 2: ``self_distillation.md``, ``self_distillation.png``, "self_distillation" in report.json."""
    exp = Path(cfg.exp_dir)
    evaluation, sets, command = experiment_scoring(cfg, "asrkd report-self-distill")
    full_plain = str(cfg.train.name)
    full_plain_entry = evaluation.entry([full_plain], sets)  # before the rows: their differences to it are paired draws
    rows = []
    for k in exit_layers(cfg.self_distillation, cfg.model):
        exit_system, plain_system = exit_name(cfg.self_distillation, k), plain_name(cfg.self_distillation, cfg.model, cfg.train, k)
        exit_entry = evaluation.entry([exit_system], sets, command=command) | {"cost": system_cost(cfg, exit_system)}
        plain_entry = evaluation.entry([plain_system], sets) | {"cost": system_cost(cfg, plain_system)}
        row = {"exit_layer": k, "hidden_layers": hidden_layers(cfg.self_distillation, cfg.model, k), "exit": exit_entry, "plain": plain_entry,
               "minus_plain": evaluation.frames.difference(exit_system, plain_system),
               "minus_full_plain": evaluation.frames.difference(exit_system, full_plain)}
        if cfg.self_distillation.deep_supervision_control:
            control = exit_name(cfg.self_distillation, k, control_name(cfg.self_distillation))
            row |= {"deep_supervision": evaluation.entry([control], sets),
                    "minus_deep_supervision": evaluation.frames.difference(exit_system, control),
                    "deep_supervision_minus_plain": evaluation.frames.difference(control, plain_system)}
        rows.append(row)
    test = evaluation.primary
    scfg = cfg.self_distillation
    result = {"corpus": cfg.corpus, "command": command, "eval_set": test, "rows": rows, "full_plain": full_plain,
              "full_plain_accuracy": full_plain_entry["frame_accuracy"][test],
              "temperature": float(scfg.temperature), "kd_weight": float(scfg.kd_weight), "hint_weight": float(scfg.hint_weight),
              "train_seconds": sum(h["seconds"] for h in read_history(Layout(exp).model(str(scfg.name)))), "bootstrap_unit": cfg.stats.unit,
              "deep_supervision": control_name(cfg.self_distillation) if scfg.deep_supervision_control else None, "head_width": head_width(cfg.self_distillation)}
    log.info("self-distillation: %s", {row["exit_layer"]: round(row["exit"]["frame_accuracy"][test], 4) for row in rows})
    return Report(result, markdown(result), {"self_distillation.png": plot}, aligned=evaluation.frame_accuracy_utterances)


# the types of self_distillation.* that its defaults (self_distillation.yaml) do not show
CONFIG_TYPES = ConfigTypes({"self_distillation.head_width": Kind((int,), nullable=True)},
                           (("self_distillation.kd_weight", Range("[0, 1]")), ("self_distillation.head_width", COUNT), ("self_distillation.exits", COUNT)))

EXPERIMENT = Experiment("self-distill", "self_distillation", systems, train=train, report=report, markdown=markdown, config=CONFIG_TYPES)
