"""nosq producer: enqueue inference requests on Redis streams and collect their results.

Only redis, msgpack and pydantic are required; numpy and torch are used when installed.
"""

from nosq.producer.aio import AsyncProducer
from nosq.producer.client import Producer
from nosq.producer.codec import RawTensor
from nosq.producer.enqueue import Handle
from nosq.producer.errors import (
    NosqConnectionError,
    NosqError,
    NosqTimeout,
    ProtocolError,
    QueueFull,
    RemoteError,
)
from nosq.producer.settings import RedisSettings
from nosq.producer.wire import PROTOCOL_VERSION, Envelope, ErrorCode

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncProducer",
    "Envelope",
    "ErrorCode",
    "Handle",
    "NosqConnectionError",
    "NosqError",
    "NosqTimeout",
    "Producer",
    "ProtocolError",
    "QueueFull",
    "RawTensor",
    "RedisSettings",
    "RemoteError",
]
