"""The paper's preliminary image experiment (Hinton, Vinyals & Dean 2015, §3), on MNIST or Fashion-MNIST.

Images go through the speech models' machinery: each image is an "utterance" of one frame of
784 pixels (scaled to [0, 1]) in a FeatureStore, its class the "pdf-id", so the nets are
HybridDNNs without context and train through the one training loop with the students' loss.

Stages (``recipes/mnist/run.sh``):

0. ``prepare-images``: the four IDX files of ``images.dataset`` from ``images.corpus_dir``
   (downloaded there first from ``images.download_url`` or the dataset's canonical source when
   they are missing), checked, into ``exp/images`` (train images then test images, and labels).
   The last ``images.valid_images`` training images are held out: early stopping and every
   bias shift are chosen on them, never on the test set.
1. ``train-image-nets``: ``images.seeds`` small nets trained alone on the labels,
   unregularized; the big-net candidates, one seed each: ``images.big`` (the paper's:
   dropout on the hidden units and the inputs, inputs jittered by up to ``images.big.jitter``
   pixels, every hidden unit's incoming weights max-norm constrained) and each of
   ``images.big_variants`` (some of those settings changed); then the other seeds of the
   candidate with the fewest held-out errors, the teacher. The paper's regularizers were tuned for MNIST's digits; which
   suits another set is chosen on its held-out images, never on the test set.
2. ``train-image-students``: small nets trained on a big net's soft targets at T
   (``T^2 CE(soft) + distill.hard_weight CE(labels)``): the distilled small net's seeds (seed r
   taught by big net r; with ``images.teacher: ensemble`` every student is taught by the big
   seeds' average softmax(z/T), and the report's teacher row is that ensemble), the function-matching row (``images.function_matching``: the big net
   run on the fly on the student's own jittered view, a long schedule) with its control (the
   small net on the labels of the same views), and, taught by big net 0 (or the ensemble), every T of
   ``images.temperatures`` at every width of ``images.widths`` (the paper's T against width),
   the class ``images.left_out_class`` left out of the transfer set, and only the classes of
   ``images.kept_classes`` in it.
3. ``report-images``: errors on the 10,000 test images (counts, with bootstrap intervals over
   test images and seeds), the gap closed, the bias corrections (the left-out class's bias
   raised, the kept classes' lowered, by the shift of ``images.bias_shifts`` that makes the
   fewest held-out errors), the T-against-width table, the big nets compared, every net's
   training curves, and the paper's MNIST numbers beside them: ``results/<dataset>/report.{json,md}``
   and PNGs.

Every net trains until its held-out errors have not improved for ``images.patience`` epochs
(``train.patience``; the configured epochs are a ceiling) and is scored, and teaches, at that
best held-out epoch (its ``best.pt``). The big net's soft targets for the stored-target
students are its logits on every image, computed once per student (70,000 x 10 values) and
turned into softmax(z/T) per batch.
"""

from __future__ import annotations

from asrkd.experiments.base import Experiment
from asrkd.experiments.images.data import run_prepare
from asrkd.experiments.images.nets import run_train_nets, run_train_students
from asrkd.experiments.images.report import run_report
from asrkd.schema import COUNT, NONNEGATIVE, POSITIVE, ConfigTypes, Kind, Range

CONFIG_TYPES = ConfigTypes(
    {"images.dataset": Kind((str,), choices=("fashion-mnist", "mnist")), "images.teacher": Kind((str,), choices=("net", "ensemble")),
     "images.download_url": Kind((str,), nullable=True), "images.big_variants": Kind((dict,), nullable=True),
     "images.function_matching": Kind((dict,), nullable=True)},
    (("images.left_out_class", Range("[0, 9]")), ("images.kept_classes", Range("[0, 9]")), ("images.bias_shifts.step", POSITIVE),
     ("images.bias_shifts.*", NONNEGATIVE), ("images.valid_images", COUNT)))

# its own commands (recipes/mnist/run.sh): images are no layout.System, so no train/decode/report steps of the base
EXPERIMENT = Experiment("images", "images", decodes=False, config=CONFIG_TYPES,
                        commands={"prepare-images": run_prepare, "train-image-nets": run_train_nets,
                                  "train-image-students": run_train_students, "report-images": run_report})
