"""The paper's §3 on Fashion-MNIST: a big net, a small net alone and distilled, a class left out.

Recipe: recipes/mnist/run.sh; write-up: docs/experiments/images.md; everything else of it is in this folder (docs/contributing.md)."""
