"""mpo: Mixed Preference Optimization (MPO) for vision-language models.

Rooms: ``mpo.losses`` (pure tensor functions), ``mpo.data`` (preference data, knows no training),
``mpo.models`` (loading, tiny builders), ``mpo.train`` (the only place with a model and an optimizer),
``mpo.generate`` (preference-data generation; never imports ``mpo.train``), ``mpo.cli`` (no logic).
"""

__version__ = "0.1.0"
