"""Identity, addresses and the wire format, without a network."""

import random

import msgpack
import pytest
import torch

from hiveengine.errors import ConfigurationError, ProtocolError
from hiveengine.transport import Identity, PeerAddress, PeerID, TransportLimits
from hiveengine.transport.identity import verify_signature
from hiveengine.transport.wire import PREFIX, FrameSpec, Kind, decode_control, encode_control, frame_specs

LIMITS = TransportLimits(
    max_header_bytes=4096, max_frames=4, max_frame_bytes=1024, max_message_bytes=2048, compress_threshold_bytes=256
)


def test_peer_id_is_the_hash_of_the_key_and_round_trips_as_text():
    identity = Identity.generate()
    assert identity.peer_id == PeerID.from_public_key(identity.public_key)
    assert PeerID.from_string(str(identity.peer_id)) == identity.peer_id
    assert Identity.generate().peer_id != identity.peer_id
    with pytest.raises(ValueError):
        PeerID.from_string("not-base32!")


def test_signatures_verify_only_for_the_signed_message_and_key():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"hello")
    assert verify_signature(a.public_key, sig, b"hello")
    assert not verify_signature(a.public_key, sig, b"hellO")
    assert not verify_signature(b.public_key, sig, b"hello")
    assert not verify_signature(b"short", sig, b"hello")


def test_identity_persists_with_private_permissions(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path).peer_id == first.peer_id
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigurationError, match="not an identity key"):
        Identity.load_or_create(path)


def test_address_round_trip_and_bad_addresses():
    peer_id = Identity.generate().peer_id
    address = PeerAddress("127.0.0.1", 4321, peer_id)
    assert str(address) == f"ucx://127.0.0.1:4321/{peer_id}"
    assert PeerAddress.parse(str(address)) == address
    for bad in ["tcp://127.0.0.1:1/" + str(peer_id), "ucx://127.0.0.1/" + str(peer_id), "ucx://h:1/", "ucx://h:x/a"]:
        with pytest.raises(ValueError):
            PeerAddress.parse(bad)


def test_control_messages_round_trip_and_compress():
    body = {"k": Kind.REQUEST, "i": 5, "m": "x", "h": {"blob": "y" * 3000}}
    encoded = encode_control(body, LIMITS)
    assert len(encoded) < 1000  # compressed
    assert decode_control(memoryview(encoded + b"\0" * 50), LIMITS) == body


def _framed(body) -> bytes:
    packed = msgpack.packb(body)
    return PREFIX.pack(len(packed), 0) + packed


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01", "shorter than its prefix"),
        (PREFIX.pack(10_000, 0) + b"x", "malformed control prefix"),
        (PREFIX.pack(3, 0) + b"\xc1\xc1\xc1", "undecodable"),
        (PREFIX.pack(2, 1) + b"zz", "undecodable"),
        (PREFIX.pack(1, 0) + msgpack.packb(7), "lacks its kind"),
        (_framed({"k": 99, "i": 1}), "unknown message kind"),
    ],
)
def test_malformed_control_messages_are_protocol_errors(payload, message):
    with pytest.raises(ProtocolError, match=message):
        decode_control(memoryview(payload), LIMITS)


def test_oversized_header_is_refused_by_the_sender():
    with pytest.raises(ProtocolError, match="send large data as tensors"):
        encode_control({"k": 0, "i": 1, "h": {"blob": random.Random(0).randbytes(8000)}}, LIMITS)


@pytest.mark.parametrize(
    "frames, message",
    [
        ([["float32", [300], "cpu"]], "exceeds the limit of 1024"),
        ([["float32", [200], "cpu"]] * 3, "message of 2400 bytes"),
        ([["float32", [1], "cpu"]] * 5, "5 tensor frames exceed"),
        ([["complex32", [1], "cpu"]], "unsupported dtype"),
        ([["float32", [-1], "cpu"]], "malformed tensor shape"),
        ([["float32", [1], "tpu"]], "unsupported device"),
        ([["float32", [1]]], "malformed tensor descriptor"),
        ("nope", "must be a list"),
    ],
)
def test_frame_descriptors_are_checked_before_allocation(frames, message):
    with pytest.raises(ProtocolError, match=message):
        frame_specs({"k": 0, "i": 1, "f": frames}, LIMITS)


def test_frame_spec_describes_tensor():
    spec = FrameSpec.of(torch.zeros(3, 5, dtype=torch.bfloat16))
    assert spec.nbytes == 30 and spec.to_wire() == ["bfloat16", [3, 5], "cpu"]
    assert frame_specs({"k": 0, "i": 1, "f": [spec.to_wire()]}, LIMITS) == [spec]
