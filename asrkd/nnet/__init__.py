"""The hybrid acoustic models: networks (``model``), the one training loop every model kind goes
through (``train``), ensembles (``ensemble``), and how a trained system leaves and what it costs
(``export``, ``cost``)."""
