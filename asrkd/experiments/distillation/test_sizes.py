"""Table 1 at two sizes (asrkd report-sizes): each size's numbers are its own report's, and two sizes
scored against other labels or bootstrap units are not put in one table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from asrkd.experiments.distillation import sizes

REPO = Path(__file__).resolve().parents[3]


def published(tmp_path: Path, name: str, report: dict) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text(json.dumps(report))
    return tmp_path / name


def cfg_of(tmp_path: Path, results: Path, other: Path | None):
    return OmegaConf.create({"exp_dir": str(tmp_path / "exp"), "results_dir": str(results), "sizes": {"other": None if other is None else str(other)},
                             "train": {"device": "cpu"}})


def test_two_sizes_side_by_side_each_with_its_own_reports_numbers(tmp_path: Path) -> None:
    paper = json.loads((REPO / "results" / "an4_paper" / "report.json").read_text())
    small = copy.deepcopy(paper)  # another size: other numbers under the same labels and unit
    table = small["distillation"]["table1"]
    table["baseline"]["model"] = "4x512"
    table["ensemble"]["frame_accuracy"]["test"], table["ensemble"]["frame_accuracy_ci"]["test"] = 0.5787, [0.5468, 0.6088]
    small["distillation"]["gain_kept"]["vs_baseline"] |= {"estimate": 0.3562, "ci": [0.1302, 0.5037]}
    results = published(tmp_path, "paper", paper)
    sizes.EXPERIMENT.publish(cfg_of(tmp_path, results, published(tmp_path, "small", small)))
    text = (results / "sizes.md").read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    paper_table = paper["distillation"]["table1"]
    assert rows["| 10x ensemble (1/1 seeds)"].startswith("| 10x ensemble (1/1 seeds) | 57.87% [54.68, 60.88] | ")  # the other's first
    assert " | 56.61% [53.37, 59.80] | " in rows["| 10x ensemble (1/1 seeds)"] and rows["| 10x ensemble (1/1 seeds)"].endswith("| 61.10% | 10.70% |")
    assert f"{100 * paper_table['ensemble']['frame_accuracy']['test']:.2f}%" == "56.61%"
    assert "4x512 (T = 5) 35.62% [13.02, 50.37]; 8x2560 (T = 5) 21.12% [-11.11, 51.39]; the paper's 86%." in text
    assert rows["| ensemble − baseline"] == "| ensemble − baseline | +1.59 [+1.26, +1.96] | +1.16 [+0.28, +2.22] | +1.59 [+1.26, +1.96] | +1.16 [+0.28, +2.22] |"
    assert json.loads((results / "report.json").read_text())["sizes"]["mismatches"] == []


@pytest.mark.parametrize("change", ["labels", "unit"])
def test_two_sizes_scored_against_other_labels_or_units_are_not_compared(tmp_path: Path, change: str) -> None:
    paper = json.loads((REPO / "results" / "an4_paper" / "report.json").read_text())
    other = copy.deepcopy(paper)
    if change == "labels":
        other["distillation"]["table1"]["baseline"]["labels"]["test"] = "0000000000000000"
    else:
        other["distillation"]["bootstrap_unit"] = "utterance"
    results = published(tmp_path, "paper", paper)
    sizes.EXPERIMENT.publish(cfg_of(tmp_path, results, published(tmp_path, "other", other)))
    text = (results / "sizes.md").read_text()
    assert "Not compared" in text and ("test 0000000000000000" in text if change == "labels" else "utterance" in text)
    assert not [line for line in text.splitlines() if line.startswith("|")]  # no number of either beside the other


def test_a_missing_other_report_or_section_is_one_line_naming_it(tmp_path: Path) -> None:
    paper = json.loads((REPO / "results" / "an4_paper" / "report.json").read_text())
    results = published(tmp_path, "paper", paper)
    with pytest.raises(ValueError, match="sizes.other is not set"):
        sizes.report(cfg_of(tmp_path, results, None))
    with pytest.raises(FileNotFoundError, match="nowhere/report.json: no report there"):
        sizes.report(cfg_of(tmp_path, results, tmp_path / "nowhere"))
    bare = published(tmp_path, "bare", {"corpus": "an4"})
    with pytest.raises(FileNotFoundError, match="bare/report.json: no 'distillation' section"):
        sizes.report(cfg_of(tmp_path, results, bare))
