"""Ray Serve over HTTP, the client side: aiohttp POSTs the item's float32 bytes to ``/<model>``.

Apart from ``benchmarks.peers.serve`` so that a load process of HTTP clients never imports Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["HttpClient", "connect_http"]

TIMEOUT_S = 60.0


class HttpClient:
    def __init__(self, base: str, session: Any) -> None:
        self.base = base
        self.session = session

    async def call(self, model: str, x: np.ndarray) -> None:
        url = f"{self.base}/{model}?shape={','.join(str(d) for d in x.shape)}"
        async with self.session.post(url, data=x.tobytes()) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")

    async def aclose(self) -> None:
        await self.session.close()

    def extra(self) -> dict[str, Any]:
        return {}


async def connect_http(params: dict[str, Any]) -> HttpClient:
    """An aiohttp session with no connection limit: every client keeps its own connection."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
    return HttpClient(params["http"], session)
