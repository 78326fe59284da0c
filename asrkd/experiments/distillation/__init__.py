"""The paper's Table 1 on AN4 (experiment.py) and what moves the gain a student keeps (levers.py).

Recipe: recipes/an4/run_distill.sh; write-up: docs/experiments/distillation.md; everything else of it is in this folder (docs/contributing.md)."""
