"""The ``outpost`` command: the top layer, on top of the core (``outpost.*``), the services
(:mod:`outpost.services`, their settings through :mod:`outpost.services.registry`), the simulator
and the benchmark harnesses (:mod:`outpost.benchmarks`). Nothing below imports it; the lint rule
(ruff TID251, pyproject.toml) enforces the layers, and this package alone is exempt from it."""
