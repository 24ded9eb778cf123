"""Replica counts: ``policy`` decides how many replicas a model should have (pure, tested on a
fake clock), ``loop`` observes each model and applies the decisions.

May import ``nosq.producer``, ``nosq.workers.spec``, ``manager.settings``, ``manager.serving``
and ``manager.memory`` (a resize under a budget goes through the loader).
"""
