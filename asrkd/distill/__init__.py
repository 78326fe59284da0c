"""Distillation: the teachers' soft targets (``soft_targets``), the loss terms (``losses``) and
the students trained on them (``student``)."""
