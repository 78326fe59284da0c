"""A network's shallow exits taught by its deepest (Be Your Own Teacher).

Recipe: recipes/an4/run_self_distill.sh; write-up: docs/experiments/self_distillation.md; everything else of it is in this folder (docs/contributing.md)."""
