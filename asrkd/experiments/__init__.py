"""The experiments, one folder each (docs/contributing.md): the paper's Table 1 on AN4 and its
levers (``distillation``), the 3%-data experiment (``three_percent``), function matching
(``function_matching``), distilling into a much smaller student through chains of assistants
(``chains``), a network's shallow exits taught by its deepest (``self_distillation``), specialists
(``specialists``), the paper's image experiment (``images``) and the paper network's schedule and
bf16 check (``paper_schedule``, ``bf16_check``). ``base`` is what every experiment is."""
