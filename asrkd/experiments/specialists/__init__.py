"""The paper's §5: specialists beside a generalist, combined and distilled back.

Recipe: recipes/an4/run_specialists.sh; write-up: docs/experiments/specialists.md; everything else of it is in this folder (docs/contributing.md)."""
