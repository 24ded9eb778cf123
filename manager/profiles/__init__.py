"""The manager's side of profiling: a model's latency and memory against batch size.

``store`` keeps one profile per (model, device kind, input signature) in Redis and gets one at
start; ``standalone`` profiles a model outside a manager (``nosq profile``); ``report`` shows
one (table, progress bar, plot). The data and the choice of batch size are
``nosq.workers.profiles.curve`` (pure Python); the measuring is
``nosq.workers.profiles.measure`` (torch, inside the actor).

May import ``nosq.producer``, the torch-free modules of ``nosq.workers``, ``manager.runtime``
and ``manager.serving`` (the batcher's latency model, the replica pool a profile runs on).
"""
