"""nosq workers: model specs, the Ray actor that hosts a model, batching, and the demo models.

Import from the modules: ``workers.spec`` (no torch), ``workers.actor``, ``workers.batching``,
``workers.demo``. Importing this package alone imports nothing heavy.
"""

__all__: list[str] = []
