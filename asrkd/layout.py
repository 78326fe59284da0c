"""Where every stage's outputs live: the layout of an experiment directory, as Kaldi keeps exp/.

One directory per output, named for what it holds, so that a stage finds its inputs without
knowing which command wrote them (Kaldi's steps/ scripts name their input and output dirs and
nothing else)::

    <data_dir>/lang                    the lexicon's L.fst and phone sets (prepare-lang)
    <exp>/feats/{fbank,mfcc}/<data>    feature stores of a data dir (make-feats)
    <exp>/mono, <exp>/tri              the GMM-HMMs (train-gmm); tri/ali_<data>: pdf-id alignments (align),
                                       with ali_<data>/lang when the data dir has words the training lang lacks
    <exp>/graph                        HCLG.fst, words.txt, the LM; graph/lang: a decoding lang (make-graph)
    <exp>/dnn/<system>                 a trained DNN (final.pt, best.pt, history.json), or an ensemble's member-<i>
    <exp>/soft_targets/<teacher>/<data>  a teacher's targets of a data dir's frames (make-soft-targets)
    <exp>/decode/<system>              lattices, the LM-weight sweep and wer.json (decode)
    <exp>/specialists/<name>           the specialists' confusable groups (train-specialists)
    <exp>/export/<system>, <exp>/cost/<system>   a system exported, its decoding cost
    <exp>/report                       reports (results_dir holds the copies README quotes)
    <exp>/jobs/<stage>                 the per-job logs of jobs run through submitit (jobs.backend=submitit)

Every path into an experiment directory is built here: a new stage adds its directory here,
and the paragraph above is the whole tree. A trained system is named by its :class:`System`
spec (what it is: its role, teacher, target form, T, data and seed), which train, decode and
report iterate alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class System:
    """One system an experiment trains, decodes or scores: its name (``exp/dnn/<name>``, with
    ``@best`` for the best-validation checkpoint, ``<ensemble>/member-<i>`` for a member) and
    what it is. The name is made by the function that trains it (a student's by
    :func:`asrkd.distill.student.student_system`), so train, decode and report name the same
    directory; the other fields say what the name encodes, for reports and for code that
    selects systems (the controls of a row, a teacher's students)."""

    name: str
    role: str = "model"  # baseline | teacher | student | control | assistant | specialist | exit | combination | model
    teacher: str | None = None  # the system whose outputs it learned from
    form: str | None = None  # the target form (asrkd.distill.forms): dense, topk, compact, logits, ...
    temperature: float | None = None
    data: str = "train"  # the data dir it trained on
    seed: int = 0  # the replicate (seed offset) of its config

    def directory(self, layout: "Layout") -> Path:
        return layout.model(self.name)


def names(systems: "list[System]") -> list[str]:
    """The systems' names, each once, in order."""
    return list(dict.fromkeys(system.name for system in systems))


@dataclass(frozen=True)
class Layout:
    """The paths of one experiment: ``exp`` (``exp_dir``) and the data dirs beside it (``data``)."""

    exp: Path
    data: Path = Path("data")

    # ------------------------------------------------------------------ data side

    @property
    def lang(self) -> Path:
        return self.data / "lang"

    @property
    def dictionary(self) -> Path:
        """``local/dict``: the lexicon and phone lists (Kaldi's layout) the lang dirs are made from."""
        return self.data / "local" / "dict"

    def data_dir(self, name: str) -> Path:
        return self.data / name

    # ------------------------------------------------------------------ features and the GMM-HMMs

    def features(self, kind: str, data: str) -> Path:
        """``feats/<kind>/<data>``: kind fbank (the DNNs') or mfcc (the GMM's)."""
        return self.exp / "feats" / kind / data

    def feature_stores(self, kind: str = "fbank") -> list[Path]:
        """Every store of ``kind`` there is, complete or not, by name."""
        return sorted((self.exp / "feats" / kind).glob("*"))

    def fbank(self, data: str) -> Path:
        return self.features("fbank", data)

    def mfcc(self, data: str) -> Path:
        return self.features("mfcc", data)

    @property
    def mono(self) -> Path:
        return self.exp / "mono"

    @property
    def gmm(self) -> Path:
        """The triphone GMM-HMM: the transition model, the tree and the pdfs every DNN predicts."""
        return self.exp / "tri"

    def alignment(self, data: str) -> Path:
        """``tri/ali_<data>``: pdf_ids.npy per frame, pdf_counts.npy (the priors' counts)."""
        return self.gmm / f"ali_{data}"

    def alignment_lang(self, data: str) -> Path:
        """``tri/ali_<data>/lang``: the training lang with a data dir's other words (an eval set's), which it is aligned with."""
        return self.alignment(data) / "lang"

    @property
    def pdf_counts(self) -> Path:
        """The training alignment's pdf counts: every decoder's priors."""
        return self.alignment("train") / "pdf_counts.npy"

    @property
    def graph(self) -> Path:
        return self.exp / "graph"

    @property
    def decoding_lang(self) -> Path:
        """``graph/lang``: the training lang with the LM's other words (Kaldi's lang_test), when it has any."""
        return self.graph / "lang"

    # ------------------------------------------------------------------ DNN systems and what they make

    def model(self, name: str) -> Path:
        """``dnn/<name>``; ``name`` without the ``@best`` of a system's name."""
        return self.exp / "dnn" / name.partition("@")[0]

    def soft_targets(self, teacher: str, data: str) -> Path:
        return self.exp / "soft_targets" / teacher / data

    def decode(self, system: str) -> Path:
        return self.exp / "decode" / system

    def specialists(self, name: str) -> Path:
        return self.exp / "specialists" / name

    def export(self, system: str) -> Path:
        return self.exp / "export" / system.replace("/", "_")

    def cost(self, system: str) -> Path:
        return self.exp / "cost" / system.replace("/", "_")

    @property
    def report(self) -> Path:
        return self.exp / "report"

    @property
    def jobs(self) -> Path:
        return self.exp / "jobs"
