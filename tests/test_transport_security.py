"""The transport against strangers (issue 15): wrong ids, floods of unfinished handshakes and of calls whose frames
never come, per-peer limits. Real processes over UCX on 127.0.0.1; every wait has a deadline."""

from __future__ import annotations

import pytest

from hiveengine.errors import HandshakeError, PeerIdMismatch
from hiveengine.transport import Identity, Peer, PeerAddress

pytestmark = pytest.mark.timeout(120)


def test_a_live_address_with_another_peer_id_is_a_mismatch_naming_both_ids(server):
    _, address = server
    real = PeerAddress.parse(address)
    wanted = Identity.generate().peer_id
    peer = Peer()
    try:
        with pytest.raises(PeerIdMismatch) as caught:
            peer.call_sync(PeerAddress(real.host, real.port, wanted), "echo", {}, timeout=10)
        assert isinstance(caught.value, HandshakeError)
        assert caught.value.expected == wanted and caught.value.actual == real.peer_id
        assert str(wanted) in str(caught.value) and str(real.peer_id) in str(caught.value)
        assert peer.call_sync(address, "echo", {"ok": 1}, timeout=10)[0] == {"ok": 1}  # the right id still works
    finally:
        peer.shutdown()
