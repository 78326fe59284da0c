"""The paper network's (8x2560) schedule, chosen on the validation speakers.

Recipe: recipes/an4/run_paper.sh (stage 1); write-up: docs/experiments/paper.md; everything else of it is in this folder (docs/contributing.md)."""
