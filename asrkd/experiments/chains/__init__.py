"""A much smaller student through chains of assistants: TAKD, DGKD, ensemble KD, teacher switching.

Recipe: recipes/an4/run_chains.sh; write-up: docs/experiments/chains.md; everything else of it is in this folder (docs/contributing.md)."""
