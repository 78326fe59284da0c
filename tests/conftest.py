"""Shared fixtures: the AN4 corpus beside the repository, and a small corpus made from it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # local/ (corpus-specific prep) lives beside the package

AN4 = Path(os.environ.get("AN4_DIR", REPO.parent / "shared" / "corpora" / "an4"))


@pytest.fixture(scope="session")
def an4() -> Path:
    if not (AN4 / "etc" / "an4_train.transcription").is_file():
        pytest.skip(f"AN4 not found at {AN4} (set AN4_DIR)")
    return AN4


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
