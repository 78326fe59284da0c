"""The experiments and their reports: the paper's Table 1 on AN4 (``distillation``), what moves
the gain a student keeps (``levers``), the 3%-data experiment (``three_percent``), distilling into
a much smaller student through chains of assistants (``chains``), and a network's shallow exits
taught by its deepest (``self_distillation``)."""
