"""The experiments and their reports: the paper's Table 1 on AN4 (``distillation``), what moves
the gain a student keeps (``levers``), the 3%-data experiment (``three_percent``), and distilling
into a much smaller student through chains of assistants (``chains``)."""
