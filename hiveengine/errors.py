"""The one exception hierarchy of hiveengine; every message says what happened and what to do."""


class HiveEngineError(Exception):
    """Base class of every error hiveengine raises on purpose."""


class ConfigurationError(HiveEngineError, ValueError):
    """An option or environment variable has a value hiveengine cannot use."""


class KernelUnavailableError(HiveEngineError, RuntimeError):
    """A kernel implementation is missing on this machine (e.g. the native library was not built)."""


class NonFiniteError(HiveEngineError, ValueError):
    """A tensor holds NaN or Inf where only finite values may go (it must never be averaged in silently)."""


class TransportError(HiveEngineError, ConnectionError):
    """Base class of network errors: the peer could not be reached or the exchange broke off."""


class PeerUnreachableError(TransportError):
    """No connection could be made to the peer (closed port, wrong address, connect timeout)."""


class ConnectionLostError(TransportError):
    """The connection to the peer broke mid-call (the peer died or the network dropped)."""


class HandshakeError(TransportError):
    """The peer failed to prove its identity, or claimed an id that is not its key's."""


class PeerIdMismatch(HandshakeError):
    """The address was live, but the peer there has another id than the address names."""

    def __init__(self, expected, actual):
        super().__init__(
            f"the peer at this address is {actual}, not {expected}: the address names another peer "
            "(a stale address, or a peer that restarted with a new identity)"
        )
        self.expected, self.actual = expected, actual


class MembershipError(HandshakeError):
    """A handshake was refused because one side is not a member of the other's private swarm (no certificate,
    an expired or forged one, or another swarm's)."""


class RPCTimeoutError(TransportError, TimeoutError):
    """A call did not complete before its deadline."""


class ProtocolError(TransportError):
    """A message broke the wire protocol: malformed header, oversized frame, wrong dtype or shape."""


class ForgedMessageError(ProtocolError):
    """A message or frame failed the session's authentication: forged, altered, replayed, reordered or dropped in
    transit. The connection is closed."""


class RemoteError(TransportError):
    """The remote peer answered with an error (unknown method, handler exception, rejected request)."""

    def __init__(self, message: str, kind: str = "RemoteError"):
        super().__init__(message)
        self.kind = kind


class UnknownMethodError(RemoteError):
    """The remote peer has no handler for the called method."""


class RemoteHandlerError(RemoteError):
    """The remote handler raised an exception while serving the call."""


class PeerBusyError(RemoteError):
    """The remote peer refused the call because it holds too much inbound data right now; retry later."""


class ResourceLimitError(PeerBusyError):
    """The remote peer refused the call because one of its resource limits (named in the message and in `limit`)
    is reached, for this caller or for all of them; retry later."""

    def __init__(self, message: str, kind: str = "ResourceLimitError", limit: str | None = None):
        super().__init__(message, kind)
        self.limit = limit


class DHTError(HiveEngineError):
    """Base class of errors raised by the DHT."""


class ValueTooLargeError(DHTError, ValueError):
    """A DHT key, subkey or value is larger than the DHT accepts (see hiveengine.dht.MAX_VALUE_BYTES)."""


class BootstrapError(DHTError, ConnectionError):
    """A DHT node could not join the swarm: none of its initial peers answered."""


def refuse_unknown_options(owner: str, unknown: dict, hivemind_spellings: dict[str, str]) -> None:
    """Raise for keyword arguments `owner` does not take: a ConfigurationError naming hiveengine's spelling
    for hivemind's names (users port hivemind scripts), a TypeError for anything else."""
    for name in unknown:
        if name in hivemind_spellings:
            raise ConfigurationError(f"{name}= is hivemind's; in hiveengine use {hivemind_spellings[name]}")
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
