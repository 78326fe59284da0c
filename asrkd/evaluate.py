"""Stage 7: frame accuracy and WER of the trained systems, with intervals, as JSON + Markdown
(written through asrkd.report; the scoring here serves every experiment's report).

Frame accuracy is the share of frames whose argmax pdf-id equals the forced alignment's.
``report.json`` has one entry per system under "systems", each with "frame_accuracy":
{"train", "valid", <every eval set>} as fractions, "frame_accuracy_ci" and "wer_ci" ({<set>: [lo, hi]},
the bootstrap of :mod:`asrkd.stats`), and the fingerprint and config of the model it reports;
``report.md`` shows the same as a table. Later reports (the 3%-data experiment, distillation)
add their sections to the same files, and every report merges into what is there: rerunning one
recipe never erases what another wrote (the committed ``results/<corpus>/report.json`` too).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asrkd import sections
from asrkd.data import DataDir, DataSets, Split
from asrkd.errors import StageError
from asrkd.kaldi.decode import NOT_IN_LM, out_of_vocabulary
from asrkd.kaldi.gmm import alignment_labels
from asrkd.kaldi.graph import NO_PRONUNCIATION, LanguageModel, language_model
from asrkd.layout import Layout
from asrkd.nnet.checkpoints import load_system, read_history, system_dirs
from asrkd.nnet.decode import scored_sets
from asrkd.nnet.train import replicates
from asrkd.nnet.training_set import FrameData, evaluate_frames
from asrkd.parallel import pick_device
from asrkd.report import decoding_result, machine, merge_into_report, recipe_command
from asrkd.stage import input_record
from asrkd.stats import Bootstrap, UtteranceCounts, frame_table

log = logging.getLogger(__name__)


class FrameScorer:
    """Frame accuracy and cross-entropy of DNN systems (ensembles too) against the alignment.

    The train frames and those of every eval set with an alignment are loaded once; each call
    scores one system on those eval sets and on any named lists of training utterances (train,
    valid, a subset's train), keeps the per-utterance counts of every set ("utterances", for the
    bootstrap) and caches the result. An eval set without an alignment gets WER only (logged).
    """

    def __init__(self, cfg):
        self.exp, self.layout, self.batch_size = Path(cfg.exp_dir), sections.layout(cfg), cfg.eval.batch_size
        self.device = pick_device(cfg.train.device)
        torch.set_num_threads(int(cfg.train.num_threads))
        self.train = FrameData.load(self.exp, "train", cfg.model, self.device)
        self.eval: dict[str, tuple[FrameData, np.ndarray]] = {}
        for name in sections.data_sets(cfg).evaluated:
            if not (self.layout.alignment(name) / "pdf_ids.npy").is_file():
                log.warning("%s has no alignment (exp/tri/ali_%s): no frame accuracy on it; `asrkd align` makes one", name, name)
                continue
            data = FrameData.load(self.exp, name, cfg.model, self.device)
            labeled = data.labeled(DataDir.read(Path(cfg.data_dir) / name).utt_ids)
            if len(labeled) == 0:  # a set only scored loses utterances at alignment without failing; here it lost them all
                log.warning("%s: none of its utterances aligned (%s/dropped.json): no frame accuracy on it, WER only", name,
                            self.layout.alignment(name))
                continue
            self.eval[name] = (data, labeled)
        self.cache: dict[tuple[str, str], dict] = {}
        # what frame accuracy is scored against: each alignment read, by content (train's holds valid's frames too)
        self.labels = {name: alignment_labels(self.layout.alignment(name)) for name in ("train", *self.eval)}

    def utterances(self, name: str) -> list[str]:
        """The utterances of eval set ``name`` with aligned frames (the frame bootstrap's units)."""
        data, indices = self.eval[name]
        store = data.frames.store
        return sorted(frame_table(store.utt_ids, store.offsets, indices, np.zeros(len(indices))))

    def score(self, system: str, train_sets: dict[str, list[str]]) -> dict[str, dict]:
        """{set: {"frame_accuracy", "cross_entropy", "frames", "utterances": {utt: [correct, frames]}}}
        for each of ``train_sets`` and every aligned eval set."""
        sets = {name: (self.train, self.train.labeled(utts)) for name, utts in train_sets.items()} | self.eval
        todo = [name for name in sets if (system, name) not in self.cache]
        if todo:
            model = load_system(self.exp, system, self.device)
            for name in todo:
                data, indices = sets[name]
                result = evaluate_frames(model, data, indices, self.batch_size)
                store = data.frames.store
                result["utterances"] = frame_table(store.utt_ids, store.offsets, indices, result.pop("hits"))
                self.cache[(system, name)] = result
        return {name: self.cache[(system, name)] for name in sets}


def bootstrap_key(systems: list[str]) -> str:
    """How a system (or the mean over its replicates) is named among the bootstrap's replicates."""
    return systems[0] if len(systems) == 1 else f"{systems[0]} (+{len(systems) - 1} seeds)"


class Evaluation:
    """Systems scored on the eval sets (frames and words) with their bootstrap replicates.

    ``entry(systems)`` reports one system, or the mean over its seeds when ``systems`` lists
    replicates, with an interval on every eval set. The replicates of the first eval set (the
    experiments' test set, ``primary``) stay in ``frames`` / ``words`` (the Bootstraps of frame
    accuracy and of WER) under ``bootstrap_key(systems)`` (or ``key``), for paired differences
    and ratios; those of the other sets in ``frames_by_set`` / ``words_by_set``.
    """

    def __init__(self, cfg, scorer: FrameScorer | None = None):
        self.cfg, self.exp, self.layout = cfg, Path(cfg.exp_dir), sections.layout(cfg)
        self.scorer = scorer or FrameScorer(cfg)
        scfg = cfg.stats
        if scfg.unit not in ("utterance", "speaker"):
            raise ValueError(f"stats.unit must be 'utterance' or 'speaker', got {scfg.unit!r}")
        self.sets = list(sections.data_sets(cfg).evaluated)
        self.primary = self.sets[0]
        self.frames_by_set: dict[str, Bootstrap] = {}
        self.words_by_set: dict[str, Bootstrap] = {}
        for name in self.sets:
            data = DataDir.read(Path(cfg.data_dir) / name)
            unit_of = data.utt2spk if scfg.unit == "speaker" else None
            if name in self.scorer.eval:
                self.frames_by_set[name] = Bootstrap(self.scorer.utterances(name), scfg.replicates, scfg.confidence, scfg.seed, unit_of)
            self.words_by_set[name] = Bootstrap(data.utt_ids, scfg.replicates, scfg.confidence, scfg.seed, unit_of)
        if self.primary not in self.frames_by_set:
            raise FileNotFoundError(f"{self.layout.alignment(self.primary)}: the first eval set needs an alignment with at least one "
                                    f"aligned utterance (`asrkd align features.sets=[{self.primary}]`; what failed: its dropped.json)")
        self.frames, self.words = self.frames_by_set[self.primary], self.words_by_set[self.primary]
        self.frame_accuracy_utterances = {name: {"aligned": len(frames.utt_ids), "of": len(self.words_by_set[name].utt_ids)}
                                          for name, frames in self.frames_by_set.items()}  # an alignment may drop some: every cell says over how many

    def entry(self, systems: list[str], train_sets: dict[str, list[str]], key: str | None = None, **extra) -> dict:
        """The report entry of ``systems`` (one, or replicates: their mean), labeled with the model
        their own records say they are (not the current config's)."""
        key = key or bootstrap_key(systems)
        scores = [self.scorer.score(system, train_sets) for system in systems]
        sets = list(scores[0])
        out: dict = {"model": model_label(self.exp, systems[0]), "system": systems[0] if len(systems) == 1 else systems, "seeds": len(systems),
                     "frame_accuracy": {k: mean(s[k]["frame_accuracy"] for s in scores) for k in sets},
                     "cross_entropy": {k: mean(s[k]["cross_entropy"] for s in scores) for k in sets}}
        counts = {name: UtteranceCounts.from_tables([s[name]["utterances"] for s in scores]) for name in self.frames_by_set}
        out["frame_accuracy_ci"] = {name: bootstrap.add(key, counts[name])["ci"] for name, bootstrap in self.frames_by_set.items()}
        decoded = [decoding_result(self.exp, system) for system in systems]
        if all(decoded):
            out |= self.wer_fields(key, systems, decoded)
        elif any(decoded):
            log.info("%s: only some of its models are decoded; its WER is left out", key)
        if len(systems) > 1:
            out["per_seed"] = {f"{self.primary}_frame_accuracy": counts[self.primary].per_seed()}
        out["labels"] = self.scorer.labels
        out["bootstrap_unit"] = str(self.cfg.stats.unit)  # what its intervals resample: a table of rows from several reports says where it differs
        out["stage"] = model_records(self.exp, systems)
        return out | extra

    def wer_fields(self, key: str, systems: list[str], decoded: list[dict]) -> dict:
        results = {s: json.loads((self.layout.decode(s) / "wer.json").read_text()) for s in systems}
        for system, result in results.items():
            missing = [name for name in self.sets if name not in result["utterance_errors"]]
            if missing:
                raise StageError(f"{self.layout.decode(system)} has not decoded {', '.join(missing)}: run `asrkd decode` with the same "
                                 f"eval_sets={self.sets} (it decodes the sets added alone, at the LM weight it chose)")
        errors = {name: [results[s]["utterance_errors"][name] for s in systems] for name in self.sets}
        counts = {name: UtteranceCounts.from_tables(tables) for name, tables in errors.items()}
        out = {"wer": {k: mean(d["wer"][k] for d in decoded) for k in decoded[0]["wer"]},
               "wer_ci": {name: self.words_by_set[name].add(key, counts[name])["ci"] for name in self.sets},
               "lmwt": decoded[0]["lmwt"] if len(decoded) == 1 else [d["lmwt"] for d in decoded]}
        if len(decoded) == 1:
            out |= {k: decoded[0][k] for k in ("wer_details", "word_ins_penalty", "decode_real_time_factor", "lmwt_choice") if k in decoded[0]}
        else:
            out["per_seed_wer"] = counts[self.primary].per_seed()
        return out

    def decoded_only(self, system: str, model: str) -> dict:
        """A system without frame scores (the GMM): WER with its interval."""
        decoded = decoding_result(self.exp, system)
        return {"model": model, "frame_accuracy": None, **(self.wer_fields(system, [system], [decoded]) if decoded else {})}


def model_label(exp: Path, system: str) -> str:
    """'4x512', or '10 x 4x512' for an ensemble, from the model's stage record."""
    dirs = system_dirs(exp, system)
    config = input_record(dirs[0])["config"]
    label = f"{config['model.num_hidden_layers']}x{config['model.hidden_dim']}"
    return label if dirs == [Layout(exp).model(system)] else f"{len(dirs)} x {label}"


def mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values))


def model_records(exp: Path, systems: list[str]) -> dict:
    """The fingerprint and config each system's model(s) were made with, the command that made
    them (``made_by``: the recipe line with its overrides, or the asrkd command; None for
    models made before records kept it), and its decode's fingerprint and command."""
    out = {}
    for system in systems:
        records = [input_record(d) for d in system_dirs(exp, system)]
        decode = Layout(exp).decode(system)
        decoded = input_record(decode) if (decode / "stage.json").is_file() else None
        out[system] = {"fingerprint": [r["fingerprint"] for r in records] if len(records) > 1 else records[0]["fingerprint"],
                       "config": records[0]["config"], "inputs": {k: v["fingerprint"] for k, v in records[0]["inputs"].items()},
                       "made_by": records[0].get("made_by"),
                       "made_on": sorted({r["made_on"] for r in records if r.get("made_on")}) or None,
                       "made_with": sorted({r["made_with"] for r in records if r.get("made_with")}) or None,
                       "decode_fingerprint": decoded["fingerprint"] if decoded else None,
                       "decode_made_by": decoded.get("made_by") if decoded else None}
    return out


def experiment_scoring(cfg, command: str) -> tuple["Evaluation", dict[str, list[str]], str]:
    """What an experiment's report scores with: the Evaluation, the train and valid utterances
    (the training sets every entry reports), and the recipe line that ran it (else ``command``)."""
    train_utts, valid_utts = sections.split(cfg).utterances()
    return Evaluation(cfg), {"train": train_utts, "valid": valid_utts}, recipe_command(command)


OOV_FIXES = {  # what makes a reference word of each cause decodable; make-graph then runs again (--redo)
    NOT_IN_LM: "an LM that holds them: graph.lm_arpa=YOUR.arpa, graph.lm_text=[text files], or graph.lm_data (a data dir "
               "whose transcripts the LM learns)",
    NO_PRONUNCIATION: "their pronunciations on the model's phones in DIR/local/dict/lexicon.txt (--corpus-dir DIR) or "
                      "CMUdict (lang.use_cmudict=true)",
}


def out_of_vocabulary_by_set(lm: LanguageModel, data_sets: DataSets, split: Split, warning: float) -> dict[str, dict]:
    """Per scored set, the share of its reference words ``lm`` cannot output (a vocabulary floor
    under its WER), by cause, with a warning per cause, naming its fix, for an eval set above
    ``warning`` (``decode.oov_warning``)."""
    vocabulary, left_out = lm.vocabulary(), lm.words_left_out()
    out = {name: out_of_vocabulary(refs, vocabulary, left_out) for name, (_, refs) in scored_sets(data_sets, split).items()}
    for name in data_sets.evaluated:
        if out[name]["oov_rate"] > warning:
            for cause, words in out[name]["causes"].items():
                fix = OOV_FIXES[NOT_IN_LM if cause == NOT_IN_LM else NO_PRONUNCIATION]
                log.warning("%s: %.1f%% of its reference words (%d types, e.g. %s) can never be recognised: %s; make-graph "
                            "(--redo) with %s", name, 100 * words["tokens"] / out[name]["tokens"], words["types"],
                            " ".join(list(words["words"])[:8]), cause, fix)
    return out


_ABSENT = object()


def config_differences(cfg, records: list[dict]) -> list[str]:
    """'model.hidden_dim=64 (here 512)' for each key a stage record holds whose value in ``cfg``
    differs: the row was made under another config than the report's."""
    differences = {}
    for record in records:
        for key, value in record["config"].items():
            now = OmegaConf.select(cfg, key, default=_ABSENT)
            now = OmegaConf.to_container(now, resolve=True) if OmegaConf.is_config(now) else now
            if now is not _ABSENT and now != value:
                differences[key] = f"{key}={value!r} (here {now!r})"
    return list(differences.values())


def mixed_configs(cfg, exp: Path, systems: dict[str, list[Path]]) -> dict:
    """{row: {"differs": [...], "made_by": command}} for the rows whose stages (model, decode) were
    made under another config than ``cfg``: a report that mixes configs says so, with the command
    that remakes each such row."""
    out = {}
    for row, dirs in systems.items():
        records = [input_record(d) for d in dirs if (d / "stage.json").is_file()]
        differs = config_differences(cfg, records)
        if differs:
            made_by = next((r["made_by"]["command"] for r in records if r.get("made_by")), None)
            out[row] = {"differs": differs, "made_by": made_by}
    return out


def run(cfg) -> None:
    """Stage 7: the GMM and the baseline (its replicates too: the mean over seeds, train.seeds > 1)."""
    exp, layout = Path(cfg.exp_dir), sections.layout(cfg)
    train_utts, valid_utts = sections.split(cfg).utterances()
    evaluation = Evaluation(cfg)
    sets = {"train": train_utts, "valid": valid_utts}
    history = read_history(layout.model(cfg.train.name))
    gmm_log = json.loads((layout.gmm / "log.json").read_text())
    baseline = evaluation.entry([cfg.train.name], sets, epochs=len(history),
                                train_seconds=sum(h["seconds"] for h in history), history=history)
    systems = {"gmm": evaluation.decoded_only("gmm", f"tri ({gmm_log['tri']['num_pdfs']} pdfs)"), cfg.train.name: baseline}
    rows = {"gmm": [layout.gmm, layout.decode("gmm")], cfg.train.name: [layout.model(cfg.train.name), layout.decode(cfg.train.name)]}
    if int(cfg.train.seeds) > 1:
        systems[f"{cfg.train.name}_seeds"] = evaluation.entry(replicates(cfg.train), sets)
        rows[f"{cfg.train.name}_seeds"] = [d for r in replicates(cfg.train) for d in (layout.model(r), layout.decode(r))]
    report = {
        "corpus": cfg.corpus,
        "command": recipe_command(" ".join(["asrkd", *sys.argv[1:]])),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "mixed_configs": mixed_configs(cfg, exp, rows),
        "machine": machine(cfg.train.device),
        "bootstrap_unit": cfg.stats.unit,
        "eval_sets": evaluation.sets, "tuning_set": str(cfg.decode.tuning_set), "unseen_sentences": list(cfg.decode.unseen_sentences),
        "gmm": {"mono_pdfs": gmm_log["mono"]["num_pdfs"], "tri_pdfs": gmm_log["tri"]["num_pdfs"],
                "tree": gmm_log["tri"]["tree"], "seconds": gmm_log["mono"]["seconds"] + gmm_log["tri"]["seconds"],
                "fingerprint": input_record(layout.gmm)["fingerprint"]},
        "lm": language_model(cfg).description(),
        "out_of_vocabulary": out_of_vocabulary_by_set(language_model(cfg), sections.data_sets(cfg), sections.split(cfg), float(cfg.decode.oov_warning)),
        "frame_accuracy_utterances": evaluation.frame_accuracy_utterances,
        "labels": evaluation.scorer.labels,
        "systems": systems,
    }
    merge_into_report(sections.report_place(cfg), report)
    log.info("frame accuracy: %s", {k: round(v, 4) for k, v in baseline["frame_accuracy"].items()})
