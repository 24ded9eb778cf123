"""nosq workers: model specs, the Ray actor that hosts a model, batching, and the demo models.

Import from the modules: ``nosq.workers.spec`` (no torch), ``nosq.workers.actor``,
``nosq.workers.batching``, ``nosq.workers.demo``. Importing this package alone imports nothing
heavy. Never imports ``nosq.manager`` (``.ci/imports.py``).
"""

__all__: list[str] = []
