"""Where memory is accounted: which model is loaded where, what it costs, who may evict it.

``registry`` (the registry in Redis, shared by every manager, and its Lua scripts),
``eviction`` (the policies, pure), ``placement`` (fractional GPU shares, pure), ``loader``
(loads and evicts this manager's models under the budget, driving their pipelines and replicas).

May import ``nosq.producer``, the torch-free modules of ``nosq.workers``, ``manager.settings``,
``manager.runtime``, ``manager.serving`` and ``manager.profiles``.
"""
