"""asrkd: hybrid DNN-HMM acoustic models and their distillation, with Kaldi's conventions."""

import os

# torch's OpenMP threads sleep when they wait instead of spinning: on cores another process also
# uses (a 2-core machine running a recipe beside tests or a second run), GNU OpenMP's spinning
# made a training step an order of magnitude slower (results/bench/thread_contention.md). Set
# before torch is imported, and only where the user's environment has not chosen a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
