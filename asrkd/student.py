"""Stage: distilled students, same architecture and training recipe as a member.

``distill.students`` maps a soft-target form to the temperatures of the students trained on
it: ``dense`` (the stored fp16 averages) or ``topk`` (the compact form, to measure what it
costs). Their loss is the paper's T^2 * CE(soft targets at T, softmax(z/T)) +
hard_weight * CE(pdf-ids, softmax(z)). With ``distill.logit_matching``, one more student
matches the teacher's zero-mean logits instead (§2.1, the objective's high-T limit).
"""

from __future__ import annotations

from pathlib import Path

from asrkd.distill import distillation_loss, logit_distillation_loss
from asrkd.soft_targets import SoftTargetStore, TeacherLogits, current_checksum, logits_dir, store_dir
from asrkd.stage import mark_done, skip_if_done
from asrkd.train import prepare_training, train_model

LOGITS = "logits"  # the form name of the logit-matching student


def student_name(teacher: str, temperature: float | None, form: str, data: str = "train") -> str:
    """exp/dnn/student_<teacher>_T<T>_<form> (student_<teacher>_logits for logit matching),
    with _<data> when trained on a subset of train."""
    name = f"student_{teacher}_{LOGITS}" if form == LOGITS else f"student_{teacher}_T{temperature:g}_{form}"
    return name + ("" if data == "train" else f"_{data}")


def students(cfg) -> list[tuple[str, float | None]]:
    """(form, temperature) of every student the config asks for, in training order."""
    out = [(form, float(t)) for form, temperatures in cfg.distill.students.items() for t in temperatures]
    return out + ([(LOGITS, None)] if cfg.distill.logit_matching else [])


def run(cfg) -> None:
    dcfg = cfg.distill
    data = None
    for form, temperature in students(cfg):
        out_dir = Path(cfg.exp_dir) / "dnn" / student_name(dcfg.teacher, temperature, form, cfg.train.data)
        if skip_if_done(out_dir, f"train-student {out_dir.name}"):
            continue
        if data is None:
            data, train_idx, valid_idx = prepare_training(cfg)
            checksum = current_checksum(cfg)
        if form == LOGITS:
            teacher = TeacherLogits.load(logits_dir(cfg), checksum)

            def loss_fn(logits, batch, teacher=teacher):
                target = teacher.batch(batch.cpu().numpy()).to(logits.device)
                return logit_distillation_loss(logits, target, data.pdf_ids[batch], dcfg.soft_weight, dcfg.hard_weight)
        else:
            store = SoftTargetStore.load(store_dir(cfg, temperature), checksum)

            def loss_fn(logits, batch, store=store, form=form, temperature=temperature):
                soft = store.batch(batch.cpu().numpy(), form).to(logits.device)
                return distillation_loss(logits, soft, data.pdf_ids[batch], temperature, dcfg.soft_weight, dcfg.hard_weight)

        train_model(cfg, data, train_idx, valid_idx, out_dir, loss_fn=loss_fn)
        mark_done(out_dir)
