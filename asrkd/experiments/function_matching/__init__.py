"""Students that see what the teacher sees, for long enough (Beyer et al. 2022).

Recipe: recipes/an4/run_function_matching.sh; write-up: docs/experiments/function_matching.md; everything else of it is in this folder (docs/contributing.md)."""
