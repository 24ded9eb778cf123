"""What a manager runs on: Ray (``raycluster`` starts or joins it, ``reaper`` makes sure a
private Ray dies with its manager) and the Redis link that rides out outages (``redislink``).

May import ``nosq.producer`` only; every other package of the manager may import this one.
"""
