"""Specialists with a generalist (Hinton, Vinyals & Dean 2015, §5), and their distillation back into one network.

1. Groups (``exp/specialists/<name>/groups.json``): the generalist (``specialists.generalist``,
   the baseline) scores the held-out validation frames; the columns of the covariance matrix of
   its predicted distributions (pdf-ids predicted together co-vary), scaled to unit length, are
   clustered by k-means into ``specialists.count`` clusters of confusable pdf-ids. With ``specialists.group_size``, a
   cluster smaller than that takes the pdf-ids nearest its centre until it has that many, so the
   groups overlap (a pdf-id may be covered by several specialists, as in the paper's Table 4).
2. Specialist m (``exp/dnn/<name>_<m>``) starts from the generalist's weights, with an output
   layer over its group plus one dustbin class (the group's rows copied from the generalist's, the
   dustbin's their complement's mean weight and log-sum-exp bias), and trains through the one
   loop on frames half from its group and half drawn at random from the rest (the paper's
   remainder; ``specialists.random_half: all`` draws them from all training frames), on the
   students' loss: T^2 CE(the generalist's soft targets over the group and dustbin) +
   ``distill.hard_weight`` CE(the group's class or the dustbin): the generalist's soft targets
   limit over-fitting. The dustbin's logit in those targets is the log-sum-exp of the
   generalist's logits outside the group, so they are softmax(z/T) of one set of logits (the
   probabilities summed at T = 1, then tempered; summed after tempering, the many small
   probabilities outside the group swell the dustbin, at T = 2 on AN4 to most of the mass).
   Its validation frames are mixed the same way; its best epoch is kept.
   Over-sampling its group biases it towards the group; the paper adds to the dustbin logit the
   log of the over-sampling ratio, right for labels alone. With the generalist's (unbiased)
   soft targets in the loss, the bias is smaller and not known in closed form, so it is
   measured: the shift added to the dustbin logit is the one whose mean dustbin probability on
   the validation frames (drawn as they come, not mixed) equals the share of them outside the
   group (a prior correction fitted on held-out data). The report gives each shift beside the
   labels-alone correction: the log of the odds by which the group was over-sampled.
3. The combination (``exp/dnn/<name>``, :class:`asrkd.nnet.model.SpecialistCombination`): per
   frame, the specialists whose group holds one of the generalist's ``specialists.top_n`` most
   probable pdf-ids, and the full distribution minimizing the KL divergences to the generalist and
   to them, solved by EM. It is a model like any other: it scores, decodes and teaches.
4. The combination distilled back into one network of the generalist's shape (left open by the
   paper): its soft targets at ``specialists.student_temperature`` (``exp/soft_targets/<name>``)
   and a dense student (``exp/dnn/student_<name>_T<T>_dense``) through the students' stage; its
   control, a student of the generalist alone at the same T, epochs and seed
   (``exp/dnn/student_<generalist>_T<T>_dense``): what the specialists add is the difference.

The report compares them on frame accuracy and WER, and breaks the combination's gain down by
how many specialists cover the frame's true pdf-id: as the paper counts (every specialist whose
group holds it, its Table 4), and counting only the active ones.

Commands: ``train-specialists``, ``decode-specialists``, ``report-specialists``
(``recipes/an4/run_specialists.sh``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.distill import soft_targets, student
from asrkd.distill.losses import distillation_loss
from asrkd.distill.student import Student, TeacherOnTheFly, student_system
from asrkd.evaluate import experiment_scoring
from asrkd.experiments.base import Experiment, Report, dense_only
from asrkd.experiments.specialists.model import SpecialistCombination
from asrkd.files import write_json
from asrkd.layout import Layout, System, names
from asrkd.nnet.checkpoints import load_model, load_system, model_path, read_history, save_model
from asrkd.nnet.cost import system_cost
from asrkd.nnet.model import HybridDNN
from asrkd.nnet.train import Model, ModelFrames, train_stage
from asrkd.nnet.training_set import TrainingSet, evaluate_frames, predict_logits
from asrkd.parallel import pick_device
from asrkd.report import saved_figure, single_seed_note, with_ci
from asrkd.schema import COUNT, ConfigTypes, Kind
from asrkd.stage import plan, read_record
from asrkd.stats import UtteranceCounts, format_interval, frame_table

log = logging.getLogger(__name__)


def groups_dir(layout: Layout, scfg) -> Path:
    """exp/specialists/<name>: the specialists' groups and their models (``scfg``: the ``specialists`` section)."""
    return layout.specialists(str(scfg.name))


def specialist_name(scfg, m: int) -> str:
    return f"{scfg.name}_{m}"


def kmeans(points: np.ndarray, k: int, seed: int, restarts: int = 10, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) of k-means on the rows of ``points``: the best (least squared distance to
    the centres) of ``restarts`` runs of k-means++ seeding and Lloyd's iterations until no label
    changes; a cluster left empty takes the point farthest from its centre."""
    if not 1 <= k <= len(points):
        raise ValueError(f"specialists.count={k}: must be between 1 and the number of pdf-ids ({len(points)})")
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for restart in range(restarts):
        rng = np.random.default_rng([seed, restart])
        centres = [points[rng.integers(len(points))]]
        for _ in range(1, k):
            distance = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
            total = distance.sum()
            centres.append(points[rng.choice(len(points), p=distance / total)] if total > 0 else points[rng.integers(len(points))])
        centres = np.array(centres)
        labels = np.full(len(points), -1)
        for _ in range(iterations):
            distance = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
            new = distance.argmin(1)
            for empty in sorted(set(range(k)) - set(new.tolist())):
                new[distance[np.arange(len(points)), new].argmax()] = empty
            if (new == labels).all():
                break
            labels = new
            centres = np.array([points[labels == c].mean(0) for c in range(k)])
        inertia = float(((points - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]


def confusable_groups(probs: np.ndarray, count: int, group_size: int | None, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(groups, clusters) of pdf-ids from predicted distributions (frames x pdfs): k-means on the
    columns of their covariance matrix, each scaled to unit length (raw, the columns of rarely
    predicted pdf-ids are all near 0 and fall into one cluster whatever they co-vary with:
    :func:`unscaled_largest_cluster` measures it); each group is its cluster, topped up to ``group_size`` with the
    pdf-ids nearest the cluster's centre."""
    covariance = np.cov(probs.astype(np.float64), rowvar=False)
    columns = covariance / np.maximum(np.linalg.norm(covariance, axis=0), 1e-30)[:, None]
    labels, centres = kmeans(columns, count, seed)
    clusters = [np.flatnonzero(labels == c).tolist() for c in range(count)]
    groups = []
    for c, cluster in enumerate(clusters):
        group = list(cluster)
        if group_size and len(group) < group_size:
            nearest = np.argsort(((columns - centres[c]) ** 2).sum(1), kind="stable")
            group += [int(p) for p in nearest if p not in set(cluster)][: group_size - len(group)]
        groups.append(sorted(group))
    return groups, clusters


def unscaled_largest_cluster(probs: np.ndarray, count: int, seed: int) -> int:
    """The pdf-ids in the largest k-means cluster of the unscaled covariance columns: what the
    scaling in :func:`confusable_groups` avoids, kept in groups.json so the report can say it."""
    labels, _ = kmeans(np.cov(probs.astype(np.float64), rowvar=False), count, seed)
    return int(np.bincount(labels).max())


def class_of_pdf(group: list[int], num_pdfs: int, device: torch.device) -> torch.Tensor:
    """(num_pdfs + 1,) the specialist's class of each pdf-id (its place in the group, else the
    dustbin, ``len(group)``), and -1 for -1 (indexed by pdf-id + 1)."""
    classes = torch.full((num_pdfs + 1,), len(group), dtype=torch.long, device=device)
    classes[0] = -1
    classes[torch.tensor(group, device=device) + 1] = torch.arange(len(group), device=device)
    return classes


def mixed_frames(in_group: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The group's frames and as many drawn at random (without replacement) from ``pool`` (the
    frames outside the group, or all frames: ``specialists.random_half``)."""
    return np.sort(np.concatenate([in_group, rng.choice(pool, size=min(len(in_group), len(pool)), replace=False)]))


def specialist_frames(scfg, seed, m: int, group: list[int]):
    """The frames and classes specialist m trains and validates on (a Model's ``frames``)."""
    def frames(data, train_idx: np.ndarray, valid_idx: np.ndarray, hard: torch.Tensor) -> ModelFrames:
        classes = class_of_pdf(group, data.num_pdfs, hard.device)
        members = np.zeros(data.num_pdfs + 1, dtype=bool)
        members[np.asarray(group) + 1] = True
        pdf_ids, labels = data.pdf_ids.cpu().numpy(), hard.cpu().numpy()
        rng = np.random.default_rng([int(seed), m])
        train_in, valid_in = members[labels[train_idx] + 1], members[pdf_ids[valid_idx] + 1]
        remainder = scfg.random_half == "remainder"
        train = mixed_frames(train_idx[train_in], train_idx[~train_in] if remainder else train_idx, rng)
        valid = mixed_frames(valid_idx[valid_in], valid_idx[~valid_in] if remainder else valid_idx, rng)
        return ModelFrames(train, valid, classes[hard + 1], classes[data.pdf_ids + 1])

    return frames


def specialist_start(generalist, group: list[int]):
    """The generalist's weights with an output layer over ``group`` + the dustbin."""
    config = generalist.config | {"num_pdfs": len(group) + 1}
    with torch.random.fork_rng(devices=[]):
        model = HybridDNN(**config).to(generalist.feat_mean.device)
    state = {k: v for k, v in generalist.state_dict().items() if not k.startswith(f"layers.{len(generalist.layers) - 1}.")}
    model.load_state_dict(state, strict=False)
    source, target = generalist.layers[-1], model.layers[-1]
    outside = torch.ones(generalist.config["num_pdfs"], dtype=torch.bool)
    outside[group] = False
    with torch.no_grad():
        target.weight.copy_(torch.cat([source.weight[group], source.weight[outside].mean(0, keepdim=True)]))
        target.bias.copy_(torch.cat([source.bias[group], source.bias[outside].logsumexp(0, keepdim=True)]))
    return model


def generalist_loss(scfg, dcfg, group: list[int], generalist_dir: Path):
    """The specialist's loss factory: T^2 CE(softmax(the generalist's group logits and the
    log-sum-exp of the others, / T)) + hard_weight CE(class)."""
    temperature = float(scfg.temperature)

    def make(data, hard):
        teacher = TeacherOnTheFly([load_model(generalist_dir / "final.pt", data.pdf_ids.device)], data.frames)
        inside = torch.tensor(group, device=data.pdf_ids.device)
        outside = torch.ones(data.num_pdfs, dtype=torch.bool, device=data.pdf_ids.device)
        outside[inside] = False

        def loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
            general = teacher.member_logits(batch)[0][0]
            collapsed = torch.cat([general[:, inside], general[:, outside].logsumexp(-1, keepdim=True)], dim=1)
            soft = torch.softmax(collapsed / temperature, dim=-1)
            return distillation_loss(logits, soft, hard[batch], temperature, dcfg.soft_weight, dcfg.hard_weight)

        return loss

    return make


def dustbin_shift(logits: torch.Tensor, outside_share: float, low: float = -30.0, high: float = 30.0) -> float:
    """The shift of the last (dustbin) logit whose mean dustbin probability over ``logits``' frames
    is ``outside_share`` (bisection: that mean rises with the shift)."""
    def mean_dustbin(shift: float) -> float:
        shifted = logits.clone()
        shifted[:, -1] += shift
        return float(torch.softmax(shifted, -1)[:, -1].mean())

    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_dustbin(middle) < outside_share else (low, middle)
    return (low + high) / 2


def labels_alone_shift(group_share: float, random_half: str) -> float:
    """The dustbin shift that undoes the over-sampling exactly for a specialist trained on labels
    alone: the log of the odds by which its group was over-sampled (half its frames from the
    group, whose share of the data is ``group_share``; the other half from the rest, or from all
    frames, where the group has its share again)."""
    trained_share = 0.5 if random_half == "remainder" else 0.5 + 0.5 * group_share
    return float(np.log(trained_share / (1 - trained_share)) - np.log(group_share / (1 - group_share)))


def predicted_distributions(model, data, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """(frames, pdfs) softmax of ``model`` on ``indices``."""
    return torch.softmax(predict_logits(model, data, indices, batch_size), -1).cpu().numpy()


def student_config(cfg):
    """The config of the re-distilled student: one dense student of the combination at its T."""
    return dense_only(cfg, float(cfg.specialists.student_temperature), 1, teacher=str(cfg.specialists.name))


def control_config(cfg):
    """The re-distilled student's control: the same student of the generalist alone."""
    return dense_only(cfg, float(cfg.specialists.student_temperature), 1, teacher=str(cfg.specialists.generalist))


def student_of(cfg, config=student_config) -> System:
    """The student of ``config``: the re-distilled student, or with control_config its control (the generalist's student)."""
    students = config(cfg)
    return student_system(students.distill, students.train.data, Student("dense", float(cfg.specialists.student_temperature), 0))


def train(cfg) -> None:
    """Stage 0: the groups, the specialists, their combination with the generalist, the
    combination's soft targets and re-distilled student, and its control (the generalist's)."""
    exp, scfg = Path(cfg.exp_dir), cfg.specialists
    generalist_dir = Layout(exp).model(str(scfg.generalist))
    training = TrainingSet(cfg)
    stage = plan(f"specialist groups {scfg.name}", groups_dir(sections.layout(cfg), cfg.specialists), sections.settings(cfg, ("seed", "specialists.count", "specialists.group_size")),
                 {"generalist": generalist_dir, **training.inputs}, {"generalist": str(scfg.generalist)})
    if not stage.up_to_date:
        data, train_idx, valid_idx, hard = training.load()
        generalist = load_model(model_path(exp, str(scfg.generalist)), data.pdf_ids.device)
        probs = predicted_distributions(generalist, data, valid_idx, int(cfg.eval.batch_size))
        groups, clusters = confusable_groups(probs, int(scfg.count), scfg.group_size, int(cfg.seed))
        labels = hard[torch.from_numpy(train_idx).to(hard.device)].cpu().numpy()
        labels = labels[labels >= 0]
        shares = [float(np.isin(labels, group).mean()) for group in groups]
        coverage = np.bincount(np.concatenate(groups), minlength=data.num_pdfs)
        write_json(stage.out_dir / "groups.json", {"groups": groups, "clusters": clusters, "frame_shares": shares,
                                                   "held_out_frames": len(valid_idx), "pdfs_per_group": [len(g) for g in groups],
                                                   "mean_groups_per_pdf": float(coverage.mean()),
                                                   "unscaled_largest_cluster": unscaled_largest_cluster(probs, int(scfg.count), int(cfg.seed))})
        stage.commit(groups=len(groups), sizes=[len(g) for g in groups])
        log.info("%d groups of %s pdf-ids from %d held-out frames; frame shares %s", len(groups), [len(g) for g in groups],
                 len(valid_idx), [round(s, 3) for s in shares])
    layout = json.loads((groups_dir(sections.layout(cfg), cfg.specialists) / "groups.json").read_text())
    groups = layout["groups"]
    epochs = {"train": {"epochs": scfg.epochs}} if scfg.epochs else {}
    specialist_cfg = OmegaConf.merge(cfg, epochs)
    for m, group in enumerate(groups):
        name = specialist_name(cfg.specialists, m)
        train_stage(specialist_cfg, [Model(
            f"train-specialist {name}", Layout(exp).model(name), values={"group": m, "generalist": str(scfg.generalist),
                                                                   "random_half": str(scfg.random_half)},
            initial=lambda group=group: specialist_start(load_model(generalist_dir / "final.pt", pick_device(cfg.train.device)), group),
            frames=specialist_frames(cfg.specialists, cfg.seed, m, group))],
            training, loss=generalist_loss(cfg.specialists, cfg.distill, group, generalist_dir), keys=("specialists.temperature", "distill.soft_weight",
                                                                                 "distill.hard_weight"),
            inputs={"generalist": generalist_dir, "groups": groups_dir(sections.layout(cfg), cfg.specialists)})
    specialist_dirs = {f"specialist {m}": Layout(exp).model(specialist_name(cfg.specialists, m)) for m in range(len(groups))}
    stage = plan(f"combine specialists {scfg.name}", Layout(exp).model(str(scfg.name)), sections.settings(cfg, ("specialists.top_n", "specialists.iterations", "model.num_hidden_layers", "model.hidden_dim")),
                 {"generalist": generalist_dir, "groups": groups_dir(sections.layout(cfg), cfg.specialists), **specialist_dirs})
    if not stage.up_to_date:
        data, _, valid_idx, _ = training.load()
        device = data.pdf_ids.device
        specialists = [load_model(d / "best.pt", device) for d in specialist_dirs.values()]
        valid_pdfs = data.pdf_ids[torch.from_numpy(valid_idx).to(device)].cpu().numpy()
        shifts = [dustbin_shift(predict_logits(specialist, data, valid_idx, int(cfg.eval.batch_size)), float((~np.isin(valid_pdfs, group)).mean()))
                  for specialist, group in zip(specialists, groups)]
        combination = SpecialistCombination.of(load_model(generalist_dir / "final.pt", device), specialists, groups, shifts,
                                               int(scfg.top_n), int(scfg.iterations))
        save_model(stage.out_dir / "final.pt", combination, epoch=-1)
        stage.commit(specialists=len(groups), dustbin_shifts=shifts)
    for config in (student_config, control_config):
        soft_targets.run(config(cfg))
        student.run(config(cfg))


def systems(cfg) -> list[System]:
    """What stage 1 decodes and stage 2 scores: the generalist, the combination, the re-distilled
    student and the generalist's student (its control); the specialists alone are not decoders."""
    return [System(str(cfg.specialists.generalist), "teacher"), System(str(cfg.specialists.name), "combination"), student_of(cfg),
            replace(student_of(cfg, control_config), role="control")]


@torch.no_grad()
def coverage_counts(combination, data, indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of ``indices``: how many specialists' groups hold its aligned pdf-id (the paper's
    count), and how many of those are active for it."""
    combination.eval()
    device = data.pdf_ids.device
    every, active = [], []
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(indices[start : start + batch_size]).to(device)
        general = torch.log_softmax(combination.generalist(data.frames.context(batch)).float(), -1)
        covering = combination.membership[:, data.pdf_ids[batch]].t()  # (B, specialists)
        every.append(covering.sum(1).cpu().numpy())
        active.append((combination.active(general) & covering).sum(1).cpu().numpy())
    return np.concatenate(every), np.concatenate(active)


def coverage_rows(exp_dir, evaluation, generalist: str, combined: str) -> dict[str, list[dict]]:
    """The paper's Table 4 on the first eval set's frames: per number of specialists covering the
    true pdf-id, the frames, both systems' accuracy and the combination's gain, with intervals.
    "coverage" counts every specialist whose group holds it (the paper's count), "coverage_active"
    only the active ones: with one active group from the generalist's top 1, a frame it gets
    right is covered at least once and one it gets wrong rarely, so that count sorts frames by
    the generalist's own errors and its rows' shape follows from the definition."""
    scorer = evaluation.scorer
    data, indices = scorer.eval[evaluation.primary]
    store = data.frames.store
    combination = load_system(Path(exp_dir), combined, scorer.device)
    counts = dict(zip(("coverage", "coverage_active"), coverage_counts(combination, data, indices, scorer.batch_size)))
    hits = {system: evaluate_frames(load_system(Path(exp_dir), system, scorer.device), data, indices, scorer.batch_size)["hits"]
            for system in (generalist, combined)}
    bootstrap = evaluation.frames
    empty = {u: [0, 0] for u in bootstrap.utt_ids}
    out = {}
    for key, covering in counts.items():
        rows = []
        for count in range(int(covering.max(initial=0)) + 1):
            chosen = covering == count
            if not chosen.any():
                continue
            row = {"covering": count, "frames": int(chosen.sum())}
            for system in (generalist, combined):
                table = empty | frame_table(store.utt_ids, store.offsets, indices[chosen], hits[system][chosen])
                with np.errstate(divide="ignore", invalid="ignore"):
                    interval = bootstrap.add(f"{system} {key} {count}", UtteranceCounts.from_tables([table]))
                row["combined" if system == combined else "generalist"] = {"correct": int(hits[system][chosen].sum()), **interval}
            row["gain"] = bootstrap.difference(f"{combined} {key} {count}", f"{generalist} {key} {count}")
            row["frames_corrected"] = row["combined"]["correct"] - row["generalist"]["correct"]
            rows.append(row)
        out[key] = rows
    return out


def plot(result: dict, out: Path) -> None:
    """The combination's gain over the generalist by coverage of the true pdf-id, with intervals."""
    rows = result["coverage"]
    with saved_figure(out, (7, 4.5), "specialists whose group holds the true pdf-id",
                      f"combined − generalist, {result['eval_set']} frame accuracy (points)",
                      "Specialists: the combination's gain by coverage (the paper's Table 4)", fontsize=8) as ax:
        x = [row["covering"] for row in rows]
        gains = [100 * row["gain"]["estimate"] for row in rows]
        errors = [[100 * (row["gain"]["estimate"] - row["gain"]["ci"][0]) for row in rows],
                  [100 * (row["gain"]["ci"][1] - row["gain"]["estimate"]) for row in rows]]
        ax.bar(x, gains, yerr=errors, capsize=4, label="gain [95% CI]; under each bar, its frames")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [f"{row['covering']}\n{row['frames']:,}" for row in rows], fontsize=7)


def markdown(result: dict) -> str:
    test = result["eval_set"]
    lines = [f"# {result['corpus']}: specialists with a generalist (Hinton et al. 2015, §5)", "",
             f"| system | model | frame acc. {test} [95% CI] | WER {test} [95% CI] | − generalist, frame acc. [95% CI] | P(> 0) "
             f"| − generalist, WER [95% CI] | parameters | scoring ms / 1000 frames |", "|---" * 9 + "|"]
    for key, label in (("generalist", "generalist"), ("combined", "generalist + specialists"), ("redistilled", "re-distilled student"),
                       ("generalist_student", "student of the generalist alone (control)")):
        entry = result[key]
        gain, wer_gain = result["minus_generalist"].get(key), result["wer_minus_generalist"].get(key)
        gain_cells = f"{format_interval(gain, signed=True)} | {gain['p_above_zero']:.2f}" if gain else "– | –"
        wer_cell = format_interval(wer_gain, signed=True) if wer_gain else "–"
        lines.append(f"| {label} | {entry['system']} | {with_ci(entry, 'frame_accuracy', test)} | {with_ci(entry, 'wer', test)} "
                     f"| {gain_cells} | {wer_cell} | {entry['cost']['parameters']:,} | {entry['cost']['ms_per_1000_frames']:.1f} |")
    control = result["redistilled_minus_generalist_student"]
    lines += ["", f"Re-distilled student − combination, {test} frame accuracy: "
              f"{format_interval(result['redistilled_minus_combined'], signed=True)} points; − its control (the same student taught by the "
              f"generalist alone: same T, epochs and seed), what the specialists add: {format_interval(control, signed=True)} points "
              f"(P(> 0) = {control['p_above_zero']:.2f})."]
    for key, counted in (("coverage", "specialists whose group holds the frame's true pdf-id (the paper's count, its Table 4)"),
                         ("coverage_active", "active specialists whose group holds it (those the generalist's top "
                                             f"{result['top_n']} chose: a count that sorts frames by the generalist's own errors)")):
        lines += ["", f"The combination's gain by the number of {counted}; {test} frames:", "",
                  "| specialists covering | frames | generalist frame acc. [95% CI] | combined frame acc. [95% CI] "
                  "| combined − generalist [95% CI] | P(> 0) | frames corrected (net) |", "|---" * 7 + "|"]
        for row in result[key]:
            lines.append(f"| {row['covering']} | {row['frames']:,} | {format_interval(row['generalist'])} | {format_interval(row['combined'])} "
                         f"| {format_interval(row['gain'], signed=True)} | {row['gain']['p_above_zero']:.2f} | {row['frames_corrected']:+,} |")
    dustbin = result["dustbin"]
    fitted, exact = dustbin["fitted_shifts"], dustbin["labels_alone_shifts"]
    lines += ["", f"Dustbin shifts (added to each specialist's dustbin logit): fitted on the validation frames, {min(fitted):+.2f} to "
              f"{max(fitted):+.2f} (mean {sum(fitted) / len(fitted):+.2f}); the paper's correction, the log of the odds by which the group "
              f"was over-sampled (exact for labels alone; random half: {dustbin['random_half']}), {min(exact):+.2f} to {max(exact):+.2f} "
              f"(mean {sum(exact) / len(exact):+.2f}); per specialist in report.json."]
    groups = result["groups"]
    lines += ["", f"Command: `{result['command']}`. {len(groups['pdfs_per_group'])} specialists over groups of "
              f"{min(groups['pdfs_per_group'])}–{max(groups['pdfs_per_group'])} pdf-ids (k-means on the covariance columns of the "
              f"generalist's predictions on {groups['held_out_frames']:,} validation frames; each pdf-id in "
              f"{groups['mean_groups_per_pdf']:.2f} groups on average"
              + (f"; unscaled, the largest cluster holds {groups['unscaled_largest_cluster']} of them" if groups.get("unscaled_largest_cluster") else "")
              + f"); active: the groups holding the generalist's top "
              f"{result['top_n']}; combined by {result['iterations']} EM iterations. Training: {result['specialist_seconds']:.0f} s "
              f"for the specialists, {result['student_seconds']:.0f} s for the re-distilled student, {result['control_seconds']:.0f} s for its control "
              f"(T = {result['student_temperature']:g}).",
              single_seed_note(test, result.get('bootstrap_unit')), ""]
    return "\n".join(lines)


def report(cfg) -> Report:
    """Stage 2: ``specialists.md``, ``specialists.png``, "specialists" in report.json."""
    exp, scfg = Path(cfg.exp_dir), cfg.specialists
    evaluation, sets, command = experiment_scoring(cfg, "asrkd report-specialists")
    generalist, combined, redistilled, generalist_student = names(systems(cfg))
    entries = {key: evaluation.entry([system], sets, **({"command": command} if key == "combined" else {})) | {"cost": system_cost(cfg, system)}
               for key, system in (("generalist", generalist), ("combined", combined), ("redistilled", redistilled),
                                   ("generalist_student", generalist_student))}
    layout = json.loads((groups_dir(sections.layout(cfg), cfg.specialists) / "groups.json").read_text())
    fitted = read_record(Layout(exp).model(str(scfg.name)))["summary"]["dustbin_shifts"]
    result = {"corpus": cfg.corpus, "command": command, "eval_set": evaluation.primary, **entries,
              "minus_generalist": {key: evaluation.frames.difference(entries[key]["system"], generalist)
                                   for key in ("combined", "redistilled", "generalist_student")},
              "wer_minus_generalist": {key: evaluation.words.difference(entries[key]["system"], generalist)
                                       for key in ("combined", "redistilled", "generalist_student") if "wer" in entries[key] and "wer" in entries["generalist"]},
              "redistilled_minus_combined": evaluation.frames.difference(redistilled, combined),
              "redistilled_minus_generalist_student": evaluation.frames.difference(redistilled, generalist_student),
              **coverage_rows(cfg.exp_dir, evaluation, generalist, combined),
              "dustbin": {"fitted_shifts": fitted, "random_half": str(scfg.random_half),
                          "labels_alone_shifts": [labels_alone_shift(share, str(scfg.random_half)) for share in layout["frame_shares"]]},
              "groups": {k: layout[k] for k in ("pdfs_per_group", "frame_shares", "held_out_frames", "mean_groups_per_pdf", "unscaled_largest_cluster")
                         if k in layout},
              "top_n": int(scfg.top_n), "iterations": int(scfg.iterations), "student_temperature": float(scfg.student_temperature),
              "specialist_seconds": sum(h["seconds"] for m in range(len(layout["groups"]))
                                        for h in read_history(Layout(exp).model(specialist_name(cfg.specialists, m)))),
              "student_seconds": sum(h["seconds"] for h in read_history(Layout(exp).model(redistilled))),
              "control_seconds": sum(h["seconds"] for h in read_history(Layout(exp).model(generalist_student))), "bootstrap_unit": cfg.stats.unit}
    log.info("specialists: %s", {key: round(entries[key]["frame_accuracy"][evaluation.primary], 4) for key in entries})
    return Report(result, markdown(result), {"specialists.png": plot}, aligned=evaluation.frame_accuracy_utterances)


# the types of specialists.* that its defaults (specialists.yaml) do not show
CONFIG_TYPES = ConfigTypes({"specialists.group_size": Kind((int,), nullable=True), "specialists.epochs": Kind((int,), nullable=True),
                            "specialists.random_half": Kind((str,), choices=("remainder", "all"))},
                           (("specialists.count", COUNT), ("specialists.group_size", COUNT), ("specialists.iterations", COUNT)))

EXPERIMENT = Experiment("specialists", "specialists", systems, train=train, report=report, markdown=markdown, config=CONFIG_TYPES)
