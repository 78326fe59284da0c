"""Stage: distilled students, one per temperature in ``distill.student_temperatures``.

Same architecture and training recipe as a member; the loss is the paper's
T^2 * CE(soft targets at T, softmax(z/T)) + hard_weight * CE(pdf-ids, softmax(z)), with the
soft targets read from the stored ensemble average in the dense or top-k form.
"""

from __future__ import annotations

from pathlib import Path

from asrkd.distill import distillation_loss
from asrkd.soft_targets import SoftTargetStore, current_checksum, store_dir
from asrkd.stage import mark_done, skip_if_done
from asrkd.train import prepare_training, train_model


def student_name(teacher: str, temperature: float, form: str, data: str = "train") -> str:
    """exp/dnn/student_<teacher>_T<T>_<form>, with _<data> when trained on a subset of train."""
    return f"student_{teacher}_T{temperature:g}_{form}" + ("" if data == "train" else f"_{data}")


def run(cfg) -> None:
    dcfg = cfg.distill
    data = None
    for temperature in [float(t) for t in dcfg.student_temperatures]:
        out_dir = Path(cfg.exp_dir) / "dnn" / student_name(dcfg.teacher, temperature, dcfg.form, cfg.train.data)
        if skip_if_done(out_dir, f"train-student T={temperature:g}"):
            continue
        if data is None:
            data, train_idx, valid_idx = prepare_training(cfg)
            checksum = current_checksum(cfg)
        store = SoftTargetStore.load(store_dir(cfg, temperature), checksum)

        def loss_fn(logits, batch, store=store, temperature=temperature):
            soft = store.batch(batch.cpu().numpy(), dcfg.form).to(logits.device)
            return distillation_loss(logits, soft, data.pdf_ids[batch], temperature, dcfg.soft_weight, dcfg.hard_weight)

        train_model(cfg, data, train_idx, valid_idx, out_dir, loss_fn=loss_fn)
        mark_done(out_dir)
