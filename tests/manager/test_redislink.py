"""What the manager's loops count as Redis going away (nosq.manager.runtime.redislink): the
loop is restarted once Redis answers; any other error still stops it."""

from __future__ import annotations

import pytest

from nosq.manager.runtime.redislink import RedisLink, forever, is_lost

# what uvloop raises for a write on a connection a killed master had (redis-py passes it on)
CLOSED = "unable to perform operation on <TCPTransport closed=True reading=False 0x5>; the handler is closed"


async def test_a_closed_transport_is_waited_out_and_the_loop_runs_again() -> None:
    pings: list[int] = []
    runs: list[int] = []

    async def ping() -> None:
        pings.append(1)

    async def loop() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError(CLOSED)

    link = RedisLink(ping)
    await forever(loop, "reader", link)
    assert (len(runs), link.outages, len(pings)) == (2, 1, 1)
    assert "handler is closed" in link.last_error and link.reachable
    await link.aclose()


async def test_any_other_error_stops_the_loop() -> None:
    async def ping() -> None:
        raise AssertionError("not an outage: Redis is never probed")

    async def loop() -> None:
        raise RuntimeError("a bug in the loop")

    link = RedisLink(ping)
    with pytest.raises(RuntimeError, match="a bug"):
        await forever(loop, "reader", link)
    assert link.outages == 0
    assert is_lost(RuntimeError(CLOSED)) and is_lost(ConnectionResetError()) and not is_lost(ValueError())
