"""nosq producer: enqueue inference requests on Redis streams and collect their results.

Only redis, msgpack and pydantic are required; numpy and torch are used when installed.
"""

from producer.aio import AsyncProducer
from producer.client import Producer
from producer.codec import RawTensor
from producer.enqueue import Handle
from producer.errors import (
    NosqConnectionError,
    NosqError,
    NosqTimeout,
    ProtocolError,
    QueueFull,
    RemoteError,
)
from producer.settings import RedisSettings
from producer.wire import PROTOCOL_VERSION, Envelope, ErrorCode

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
