"""The paper's §6: 3% of the data, hard against soft targets.

Recipe: recipes/an4/run_3pct.sh; write-up: docs/experiments/three_percent.md; everything else of it is in this folder (docs/contributing.md)."""
