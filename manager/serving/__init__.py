"""A request's path through a manager: read → admit → batch → dispatch → write.

``pipeline`` (one per model) reads the stream and admits entries; ``batcher`` decides which
leave together and when (pure); ``replicas`` runs a batch on a Ray actor; ``results`` writes
the envelopes and acknowledges the entries. Beside it: ``janitor`` (reclaims the entries of dead
consumers, dead-letters poison), ``unserved`` (answers model ids no manager serves),
``traffic`` (rolling figures for heartbeats and ``nosq status``).

May import ``nosq.producer``, the torch-free modules of ``nosq.workers``, ``manager.settings``,
``manager.runtime``, and of the other subsystems only the modules it reports to:
``memory.registry`` (batches in flight are counted there), ``ops.metrics`` and
``profiles.store`` (the latency model of a profile).
"""
