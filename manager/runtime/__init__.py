"""What a manager runs on: Ray (``raycluster`` starts or joins it, ``reaper`` makes sure a
private Ray dies with its manager) and the Redis link that rides out outages (``redislink``).

May import: ``producer`` only; every other manager package may import this one.
"""
