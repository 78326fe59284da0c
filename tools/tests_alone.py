#!/usr/bin/env python3
"""Does any test need another test's side effects? (issue 57: each test passes alone)

    python tools/tests_alone.py [--out results/bench/tests_alone] [--skip-reversed] [--skip-alone]

Two checks, each a separate pytest process:

* the whole suite in the reverse of its order (``pytest --reversed``, conftest.py): a test
  that relies on an earlier one (a stage it ran on the session's shared ``run_dir``, a file it
  left, a config it changed) runs before it and fails;
* every test that needs no AN4 run (``-m "not slow"``) alone in its own process
  (``pytest FILE::TEST``). The end-to-end tests each build the mini AN4 run again when run
  alone (minutes each): the reversed run is their check.

Writes <out>.json (the commands, counts, the failures and seconds, the machine) and <out>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asrkd.files import write_json, write_text
from asrkd.machine import code_commit, cpu_description  # noqa: E402


def pytest(*args: str) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *args], cwd=REPO,
                            capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def summary_line(output: str) -> str:
    return next((line for line in reversed(output.splitlines()) if " in " in line and ("passed" in line or "failed" in line)), "")


def fast_tests() -> list[str]:
    code, output, _ = pytest("--collect-only", "-m", "not slow")
    if code != 0:
        raise SystemExit(f"collecting the tests failed:\n{output[-3000:]}")
    return [line for line in output.splitlines() if "::" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench/tests_alone")
    parser.add_argument("--skip-reversed", action="store_true")
    parser.add_argument("--skip-alone", action="store_true")
    args = parser.parse_args()
    result: dict = {"command": "python tools/tests_alone.py", "machine": cpu_description(), "code": code_commit()}
    if not args.skip_reversed:
        code, output, seconds = pytest("--reversed")
        failed = [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines() if line.startswith("FAILED ")]
        result["reversed"] = {"command": "python -m pytest -q --reversed", "exit": code, "summary": summary_line(output),
                              "failed": failed, "seconds": round(seconds)}
        print(f"reversed: exit {code}, {summary_line(output)}", flush=True)
    if not args.skip_alone:
        tests, failed, start = fast_tests(), [], time.monotonic()
        for i, test in enumerate(tests):
            code, output, _ = pytest(test)
            if code != 0:
                failed.append({"test": test, "summary": summary_line(output)})
            print(f"alone {i + 1}/{len(tests)}: {test}: {'ok' if code == 0 else 'FAILED'}", flush=True)
        result["alone"] = {"command": "python -m pytest -q FILE::TEST, each test of -m 'not slow' in its own process",
                           "tests": len(tests), "failed": failed, "seconds": round(time.monotonic() - start)}
    out = REPO / args.out
    write_json(out.with_suffix(".json"), result)
    lines = ["# Each test without the others (tools/tests_alone.py)", "", f"Machine: {result['machine']}; code {result['code']}.", ""]
    if "reversed" in result:
        r = result["reversed"]
        lines += [f"- The whole suite in reverse order (`{r['command']}`): {r['summary'] or 'exit ' + str(r['exit'])}, "
                  f"{len(r['failed'])} failed{': ' + ', '.join(r['failed']) if r['failed'] else ''}."]
    if "alone" in result:
        a = result["alone"]
        lines += [f"- Each of the {a['tests']} tests that need no AN4 run, alone in its own process: {a['tests'] - len(a['failed'])} passed, "
                  f"{len(a['failed'])} failed{': ' + ', '.join(f['test'] for f in a['failed']) if a['failed'] else ''} ({a['seconds']} s)."]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    sys.exit(1 if any(result.get(k, {}).get("failed") for k in ("reversed", "alone")) or result.get("reversed", {}).get("exit") else 0)


if __name__ == "__main__":
    main()
