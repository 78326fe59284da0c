"""Bf16 autocast against fp32 on the small model, before the paper's network trains in bf16.

Recipe: recipes/an4/run_paper.sh (stage 1); write-up: docs/experiments/paper.md; everything else of it is in this folder (docs/contributing.md)."""
