"""Shared fixtures: the AN4 corpus (where the recipe would read or fetch it), and a small corpus made from it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # local/ (corpus-specific prep) lives beside the package

from asrkd.cli import load_config  # noqa: E402  (for an experiment's tests: its folder is below the cli's layer)
from local.an4 import find_corpus_root  # noqa: E402


def find_an4(environ: dict[str, str], repo: Path) -> Path | None:
    """AN4 where the recipe finds it: ``$AN4_DIR``, else ``../shared/corpora/an4`` beside the
    repository, else what README's main command downloaded (``recipes/an4/data/local/downloads``),
    so that on a fresh machine the two commands of README run the whole suite."""
    candidates = ([Path(environ["AN4_DIR"])] if environ.get("AN4_DIR")
                  else [repo.parent / "shared" / "corpora" / "an4", repo / "recipes" / "an4" / "data" / "local" / "downloads"])
    return next((root for root in (find_corpus_root(c) for c in candidates if c.is_dir()) if root is not None), None)


AN4 = find_an4(dict(os.environ), REPO)


TINY = [
    "model=tiny", "train.epochs=2", "train.batch_size=128",
    "gmm.mono.num_iters=6", "gmm.mono.total_gauss=150", "gmm.mono.realign_iters=[2,4]",
    "gmm.tree.max_leaves=130", "gmm.tree.min_count=40",
    "gmm.tri.num_iters=4", "gmm.tri.total_gauss=250", "gmm.tri.realign_iters=[2]",
    "decode.beam=10", "decode.lattice_beam=4", "decode.lmwt=[8,10,12]", "decode.word_ins_penalty=[0.0,0.5]",
    "stats.replicates=500",
]


def tiny_config(root: Path, *overrides: str):
    """The test config of a run dir: its data/ and exp/, tiny models, short GMM training."""
    return load_config([f"corpus_dir={root}/corpus", f"data_dir={root}/data", f"exp_dir={root}/exp", *TINY, *overrides])


@pytest.fixture(scope="session")
def run_dir(an4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mini AN4 (8 training, 2 test speakers) through prep -> ... -> evaluate, with two defects
    the stages must survive and report: a missing wav, a word no lexicon knows."""
    from asrkd import evaluate
    from asrkd.kaldi import features, gmm, graph, lang
    from asrkd.nnet import decode
    from asrkd.nnet import train
    from local import an4 as an4_prep

    root = tmp_path_factory.mktemp("e2e")
    corpus = make_mini_an4(an4, root / "corpus", train_speakers=8, test_speakers=2)
    missing = next((corpus / "wav" / "an4_clstk").rglob("*.wav"))
    missing.unlink()
    transcription = corpus / "etc" / "an4_train.transcription"
    lines = transcription.read_text().splitlines()
    lines[-1] = lines[-1].replace("</s>", "QWERTYZZ </s>")
    transcription.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(root, "jobs.nj=1")  # one job: test_gmm_stage_is_reproducible compares 3 with it
    an4_prep.prepare(cfg)
    for stage in (lang, features, gmm, train, graph, decode, evaluate):
        stage.run(cfg)
    return root


@pytest.fixture(scope="session")
def an4() -> Path:
    if AN4 is None:
        pytest.skip(AN4_MISSING)
    return AN4


AN4_MISSING = "AN4 not found: set AN4_DIR, put it in ../shared/corpora/an4, or run recipes/an4/run.sh once (it downloads it)"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI (CI set, as CI services do), AN4 must be there: a suite that skipped every
    end-to-end test would otherwise report green."""
    if AN4 is None and os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.exit(f"CI is set and {AN4_MISSING}; the end-to-end tests would all skip", returncode=1)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Say loudly how many tests skipped for want of AN4 (the end-to-end ones), not one 's' each."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if AN4_MISSING in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} end-to-end tests SKIPPED: {AN4_MISSING}", red=True, bold=True)


def make_mini_an4(an4: Path, dest: Path, train_speakers: int, test_speakers: int) -> Path:
    """An AN4-shaped corpus of a few speakers: etc/ files filtered, wavs symlinked."""
    (dest / "etc").mkdir(parents=True)
    for name in ("an4.dic", "an4.phone", "an4.filler"):
        shutil.copyfile(an4 / "etc" / name, dest / "etc" / name)
    for split, count in (("train", train_speakers), ("test", test_speakers)):
        fileids = (an4 / "etc" / f"an4_{split}.fileids").read_text().split()
        speakers = sorted({Path(f).parent.name for f in fileids})[:count]
        keep = [f for f in fileids if Path(f).parent.name in speakers]
        names = {Path(f).name for f in keep}
        (dest / "etc" / f"an4_{split}.fileids").write_text("".join(f + "\n" for f in keep))
        lines = (an4 / "etc" / f"an4_{split}.transcription").read_text().splitlines()
        kept_lines = [line for line in lines if line.rpartition("(")[2].rstrip(")") in names]
        (dest / "etc" / f"an4_{split}.transcription").write_text("\n".join(kept_lines) + "\n")
        for f in keep:
            target = dest / "wav" / f"{f}.wav"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(an4 / "wav" / f"{f}.wav")
    return dest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reversed", action="store_true",
                     help="run the tests in the reverse of their order: a test that needs an earlier one's side effects "
                          "(a stage it ran on the shared run_dir, a file it left) then fails (tools/tests_alone.py)")


MAX_WORKERS = 4  # each worker builds its own mini AN4 run (run_dir) and holds a torch: more cost more than they save


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many processes ``-n auto`` (pyproject's addopts) starts: one per core, at most MAX_WORKERS.
    The end-to-end tests spend much of their time in one thread (subprocess start-up, Kaldi's decoder
    and GMM code, Python stages), so two of them share two cores well."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that run the pipeline on AN4 speakers (the ``an4`` or ``run_dir`` fixture) are
    ``slow``: ``pytest -m "not slow"`` runs the rest in seconds. ``--reversed`` reverses the order."""
    for item in items:
        if {"an4", "run_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--reversed"):
        items.reverse()



def assert_drawn(png: Path, min_size: int = 200) -> None:
    """A figure that was drawn: a PNG that opens, at least ``min_size`` pixels each way, with ink on it
    (its pixels are not one color), not merely a file of some size."""
    import numpy as np
    from matplotlib import image

    pixels = image.imread(png)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_size, (png, pixels.shape)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 2, f"{png}: a blank figure"


def assert_p_above_zero_agrees(summary: dict) -> None:
    """P(> 0) of a paired difference against its own interval: above 1 - (1 - confidence) / 2 when the
    interval is above 0, below (1 - confidence) / 2 when below, and between the two when it holds 0, at
    95% confidence (a P(> 0) that ignored the replicates, or their sign, fails one of these)."""
    lo, hi = summary["ci"]
    p = summary["p_above_zero"]
    if lo > 0:
        assert p >= 0.97, summary
    elif hi < 0:
        assert p <= 0.03, summary
    else:  # quantiles interpolate between replicates: a little slack at the ends
        assert 0.02 <= p <= 0.98 or lo == 0 or hi == 0, summary


def frame_accuracy_by_argmax(exp: Path, systems: list[str] | str, set_name: str = "test", model: str = "tiny") -> float:
    """A second route to a report's frame accuracy (the mean over ``systems``, a row's seeds): each
    model's argmax on every aligned frame of the set against the alignment, counted here rather
    than by asrkd.evaluate's per-utterance tables and bootstrap. Differences, gain kept and gap
    closed recomputed from these hold the report to numbers it did not make."""
    import numpy as np
    import torch

    from asrkd.cli import load_config
    from asrkd.nnet.checkpoints import load_system
    from asrkd.nnet.training_set import FrameData

    cpu = torch.device("cpu")
    data = FrameData.load(exp, set_name, load_config([f"model={model}"]).model, cpu)
    aligned = np.flatnonzero(data.pdf_ids.numpy() >= 0)
    accuracy = []
    for system in [systems] if isinstance(systems, str) else systems:
        network, hits = load_system(exp, system, cpu).eval(), 0
        with torch.no_grad():
            for start in range(0, len(aligned), 4096):
                batch = torch.from_numpy(aligned[start : start + 4096])
                hits += int((network(data.frames.context(batch)).argmax(-1) == data.pdf_ids[batch]).sum())
        accuracy.append(hits / len(aligned))
    return float(np.mean(accuracy))


def majority_pdf_rate(exp: Path, set_name: str = "test") -> float:
    """The frame accuracy of a model that always says the set's most frequent pdf-id: what a broken
    model that learned only the prior reaches."""
    import numpy as np

    pdf_ids = np.load(exp / "tri" / f"ali_{set_name}" / "pdf_ids.npy")
    counts = np.bincount(pdf_ids[pdf_ids >= 0])
    return float(counts.max() / counts.sum())


def wer_from_hypotheses(run_dir: Path, system: str, set_name: str = "test") -> float:
    """A second route to a report's WER: the decode's hypotheses (exp/decode/<system>/hyp_<set>.txt)
    against the data dirs' transcripts by a Levenshtein distance written here."""

    def read(path: Path) -> dict[str, list[str]]:
        return {utt: words.split() for utt, _, words in (line.partition(" ") for line in path.read_text().splitlines())}

    references = {utt: words for text in (run_dir / "data").glob("*/text") for utt, words in read(text).items()}
    hypotheses = read(run_dir / "exp" / "decode" / system / f"hyp_{set_name}.txt")

    def distance(a: list[str], b: list[str]) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            diagonal, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
        return row[-1]

    errors = sum(distance(references[utt], words) for utt, words in hypotheses.items())
    return errors / sum(len(references[utt]) for utt in hypotheses)

