"""``ray start`` for one node of a test cluster on loopback: ``python -m tests.cluster.raynode ARGS``.

Ray 2.60 cannot run a second node on 127.0.0.1 as it ships: ``ray start --address`` refuses
to join unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is on, and with it on it rewrites
``127.0.0.1`` (in ``--address`` and ``--node-ip-address``) to the machine's routable address,
where the GCS (bound to loopback) does not answer. This entry point keeps loopback addresses
as given, and starts no Ray Client server (its fixed port 10001 would clash with neighbours).
Everything else is ``ray start``'s own.
"""

from __future__ import annotations

import sys

from ray._private import services
from ray.scripts import scripts


def _as_given(host: str) -> str:
    if not host:
        raise ValueError(f"Malformed host: {host!r}")
    return host


def _no_client() -> ImportError:
    return ImportError("the test cluster runs no Ray Client server")


def main() -> None:
    services.resolve_ip_for_localhost = _as_given
    scripts.get_ray_client_dependency_error = _no_client  # type: ignore[attr-defined]
    sys.argv[0] = "ray"
    scripts.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
