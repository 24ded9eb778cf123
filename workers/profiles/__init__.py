"""The workers' side of profiling: ``curve`` holds a profile's data and the choice of batch
size (pure Python, no torch: the manager imports it), ``measure`` measures a model inside its
actor (torch). Stored, shown and run from the CLI by ``nosq.manager.profiles``.
"""
