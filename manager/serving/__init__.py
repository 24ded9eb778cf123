"""A request's path through a manager: read → admit → batch → dispatch → write.

``pipeline`` (one per model) reads the stream and admits entries; ``batcher`` decides which
leave together and when (pure); ``replicas`` runs a batch on a Ray actor; ``results`` writes
the envelopes and acknowledges the entries. Beside it: ``janitor`` (reclaims the entries of dead
consumers, dead-letters poison), ``unserved`` (answers model ids no manager serves),
``traffic`` (rolling figures for heartbeats and ``nosq status``).

May import: ``producer``, ``workers`` (torch-free modules), ``manager.settings``,
``manager.runtime``, and from other subsystems only the leaf modules it reports to
(``memory.registry`` counts batches in flight, ``ops.metrics``, ``profiles.store``'s latency
model). Nothing here imports ``manager.service``.
"""
