"""README and the write-ups under docs/ quote the committed reports; this keeps the quotes and the
reports identical, and README short."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# each write-up and the committed reports whose every table line it quotes
WRITE_UPS = {"experiments/an4.md": ["an4/report.md", "bench/gmm_seeds.md"], "experiments/three_percent.md": ["an4/three_percent.md"],
             "experiments/distillation.md": ["an4/distillation.md"], "experiments/self_distillation.md": ["an4/self_distillation.md"],
             "experiments/chains.md": ["an4/chains.md"], "experiments/specialists.md": ["an4/specialists.md"],
             "experiments/images.md": ["fashion_mnist/report.md"],
             "experiments/function_matching.md": ["an4/function_matching.md"],
             "experiments/paper.md": ["an4_paper/paper_schedule.md", "an4_paper/report.md", "an4_paper/distillation.md", "an4_paper/sizes.md"]}


def test_readme_is_short_and_every_line_it_quotes_is_a_committed_reports() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") < 200  # what it is, two commands, the stages, one headline table, the layout; the rest in docs/
    reports = {line for path in (REPO / "results").rglob("*.md") for line in path.read_text().splitlines()}
    quoted = [line for line in readme.splitlines() if re.search(r"\[[+-]?\d", line)]  # every line with an interval
    assert len(quoted) >= 8 and [line for line in quoted if line not in reports] == []
    for link in ("docs/experiments/distillation.md", "docs/experiments/function_matching.md", "docs/reliability.md"):
        assert f"]({link})" in readme and (REPO / link).is_file()


def test_the_results_write_up_holds_the_committed_report_table() -> None:
    report = (REPO / "results" / "an4" / "report.md").read_text()
    tables = [block for block in re.split(r"\n(?!\|)[^\n]*\n", report) if block.startswith("|")]  # each run of table lines
    assert tables and len(tables[0].splitlines()) >= 3
    for table in tables:
        assert table in (DOCS / "experiments" / "an4.md").read_text()


def test_readme_benchmark_rows_are_the_committed_json() -> None:
    import json

    rows = [line for line in (DOCS / "benchmarks.md").read_text().splitlines() if line.startswith("| `results/bench/train_throughput")]
    assert rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        bench = json.loads((REPO / cells[0].strip("`")).read_text())
        (run,) = [r for r in bench["runs"] if str(r["batch"]) == cells[4]]
        assert cells[1:] == [bench["device_name"], bench["model"], str(bench["bf16_autocast"]), str(run["batch"]), str(run["trainer_fps"]),
                             str(run["bound_fps"]), str(run["ratio"]), str(bench["members"]), str(run["ensemble_fused_fps"]),
                             str(run["ensemble_sequential_fps"]), str(run["fused_over_sequential"]), str(run["student_on_the_fly_fps"])]


def test_readme_decode_benchmark_rows_are_the_committed_json() -> None:
    import json

    bench = json.loads((REPO / "results" / "an4" / "bench" / "decode_baseline_cpu.json").read_text())
    readme = (DOCS / "benchmarks.md").read_text()
    for row in bench["beams"]:
        line = f"| {row['beam']} | {row['lattice_beam']} | {row['decode_seconds']} | {row['real_time_factor']} | {100 * row['test_wer']:.2f}% |"
        assert line in readme


def test_each_write_up_quotes_its_committed_experiment_tables() -> None:
    for write_up, reports in WRITE_UPS.items():
        text = (DOCS / write_up).read_text().splitlines()
        for name in reports:
            lines = [line for line in (REPO / "results" / name).read_text().splitlines() if line.startswith("|")]
            assert len(lines) >= 3
            for line in lines:
                assert line in text, (write_up, name, line)


def test_every_reliability_row_names_a_test_that_exists() -> None:
    rows = [line for line in (REPO / "docs" / "reliability.md").read_text().splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 25
    for row in rows:
        for file, test in re.findall(r"`(test_\w+\.py)::(test_\w+)`", row):
            paths = [*(REPO / "tests").glob(file), *(REPO / "asrkd" / "experiments").glob(f"*/{file}")]  # shared, or an experiment's
            assert len(paths) == 1 and re.search(rf"^def {test}\(", paths[0].read_text(), re.M), (file, test)


def test_readme_scaling_rows_are_the_committed_json() -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("scaling", REPO / "bench" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    benchmarks = (DOCS / "benchmarks.md").read_text()
    readme = (REPO / "README.md").read_text().splitlines()
    # x1-x27; x1, x27 of the stages GMM alignments in job files changed; then the superseded runs docs/benchmarks.md
    # still quotes (x1-x9; memory before/after issue 30), read from the commit it names where git has it
    superseded = ("scaling_x9", "scaling_before", "scaling_probe_before", "scaling_probe_after", "scaling_probe_repeat")
    commit = re.search(r"last held them \(`git show (\w+):", benchmarks).group(1)

    def committed(path: str) -> str | None:
        result = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else None

    for name in ("scaling", "scaling_gmm", *superseded):
        if name in superseded:
            json_text, markdown = committed(f"results/bench/{name}.json"), committed(f"results/bench/{name}.md")
            if json_text is None:  # a clone without that commit: the current tables are still checked
                continue
            assert not (REPO / "results" / "bench" / f"{name}.json").exists() and f"{name}" in benchmarks
        else:
            json_text, markdown = (REPO / "results" / "bench" / f"{name}.json").read_text(), (REPO / "results" / "bench" / f"{name}.md").read_text()
        table = scaling.markdown(json.loads(json_text))
        assert table == markdown, name
        rows = [line for line in table.splitlines() if line.startswith("|")]
        minimum = 8 if name == "scaling_gmm" else 9  # header, rule and the rows: the GMM run re-measured three stages, each at nj 1 and 2
        assert len(rows) >= minimum and all(row in benchmarks for row in rows), name
        if name in ("scaling", "scaling_gmm"):  # README quotes the current tables whole
            assert all(row in readme for row in rows)
