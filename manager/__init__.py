"""nosq.manager: the service that serves models from Redis streams on Ray actors.

One package per subsystem; the folder tree is the map:

- ``serving/``: a request's path, read → batch → dispatch → write (``pipeline`` reads and
  admits, ``batcher`` decides, ``replicas`` runs the batch on the Ray actors, ``results``
  writes), and what keeps it whole: ``janitor`` (reclaim, dead-letter), ``unserved`` (unknown
  model ids), ``traffic`` (rolling figures);
- ``memory/``: where memory is accounted: ``registry`` (in Redis), ``eviction`` (policy),
  ``placement`` (GPU shares), ``loader`` (loading under a budget);
- ``scaling/``: replica counts, ``policy`` (pure) and ``loop`` (applies it);
- ``profiles/``: the manager's side of profiling: ``store`` (in Redis), ``standalone`` (the
  CLI's run), ``report``; the measuring runs in the actor (``nosq.workers.profiles``);
- ``ops/``: for operators: ``cli``, ``control`` (arq jobs), ``status``, ``metrics``, ``logs``,
  ``demo``;
- ``runtime/``: what the manager runs on: Ray (``raycluster``, ``reaper``) and the Redis link
  that rides out outages (``redislink``);
- ``service`` (the ``Manager`` process that wires them together) and ``settings``.

Every package may import ``nosq.producer``, ``nosq.workers`` (never torch at import time:
torch runs only inside the actors), ``settings`` and ``runtime``; ``service`` imports the
subsystems and only ``ops.cli`` imports ``service``. ``.ci/imports.py`` checks that no import
cycle forms and that nothing here reaches torch.
"""
