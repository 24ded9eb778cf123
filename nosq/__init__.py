"""nosq: serve PyTorch models from Redis streams.

``nosq.producer`` is the client (``pip install nosq``), ``nosq.manager`` the service and
``nosq.workers`` the Ray actors that host the models (``pip install "nosq[server]"``). In the
repository they are the top-level folders ``producer/``, ``manager/`` and ``workers/``; this
package links them under one import name. Importing ``nosq`` alone imports none of them.
"""

__all__: list[str] = []
