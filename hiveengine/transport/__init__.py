"""UCX transport: authenticated peers exchanging msgpack headers and raw tensor frames."""

from hiveengine.transport.address import PeerAddress
from hiveengine.transport.dispatch import Request, StreamRequest
from hiveengine.transport.identity import Identity, PeerID
from hiveengine.transport.limits import DEFAULT_LIMITS, TransportLimits
from hiveengine.transport.peer import Peer
from hiveengine.transport.runtime import Runtime
from hiveengine.transport.services import SINK_METHOD, serve_sink
from hiveengine.transport.stream import Chunk, iterate_chunks
from hiveengine.transport.ucx_env import UCX_DEFAULTS, configure_ucx_environment

__all__ = [
    "DEFAULT_LIMITS",
    "SINK_METHOD",
    "UCX_DEFAULTS",
    "Chunk",
    "Identity",
    "Peer",
    "PeerAddress",
    "PeerID",
    "Request",
    "Runtime",
    "StreamRequest",
    "TransportLimits",
    "configure_ucx_environment",
    "iterate_chunks",
    "serve_sink",
]
