"""For operators: the ``nosq`` command line (``cli``), the control plane over arq
(``control``), ``nosq status`` (``status``), Prometheus metrics and health (``metrics``),
logging set-up (``logs``) and ``nosq demo`` (``demo``).

May import anything of the manager; only ``cli`` imports ``manager.service``. ``control`` acts
on a manager through its ``Controllable`` protocol and ``metrics`` imports nothing of the
manager, so the service and the serving path use both without a cycle.
"""
