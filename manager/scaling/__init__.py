"""Replica counts: ``policy`` decides how many replicas a model should have (pure, on a fake
clock in tests), ``loop`` observes each model and applies the decisions.

May import: ``producer``, ``workers.spec``, ``manager.settings``, ``manager.serving`` and
``manager.memory`` (a resize under a budget goes through the loader).
"""
