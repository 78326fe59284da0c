"""README quotes the committed reports; this keeps the quotes and the reports identical."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_table_is_the_committed_report() -> None:
    report = (REPO / "results" / "an4" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table) >= 3
    readme = (REPO / "README.md").read_text()
    assert "\n".join(table) in readme


def test_readme_benchmark_rows_are_the_committed_json() -> None:
    import json

    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `results/bench/train_throughput")]
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
    readme = (REPO / "README.md").read_text()
    for row in bench["beams"]:
        line = f"| {row['beam']} | {row['lattice_beam']} | {row['decode_seconds']} | {row['real_time_factor']} | {100 * row['test_wer']:.2f}% |"
        assert line in readme


def test_readme_quotes_the_committed_experiment_tables() -> None:
    readme = (REPO / "README.md").read_text()
    for name in ("an4/three_percent.md", "an4/distillation.md", "an4/self_distillation.md", "an4/chains.md", "an4/specialists.md", "fashion_mnist/report.md"):
        report = (REPO / "results" / name).read_text()
        lines = [line for line in report.splitlines() if line.startswith("|")]
        assert len(lines) >= 6
        for line in lines:
            assert line in readme.splitlines(), (name, line)


def test_every_reliability_row_names_a_test_that_exists() -> None:
    import re

    rows = [line for line in (REPO / "docs" / "reliability.md").read_text().splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 25
    for row in rows:
        for file, test in re.findall(r"`(test_\w+\.py)::(test_\w+)`", row):
            assert re.search(rf"^def {test}\(", (REPO / "tests" / file).read_text(), re.M), (file, test)


def test_readme_scaling_rows_are_the_committed_json() -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("scaling", REPO / "bench" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    table = scaling.markdown(json.loads((REPO / "results" / "bench" / "scaling.json").read_text()))
    assert table == (REPO / "results" / "bench" / "scaling.md").read_text()
    readme = (REPO / "README.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) >= 9 and all(row in readme for row in rows)
