"""Complex dtypes and requires_grad on the wire: descriptors, inline views, and real peers in two processes
(tests/peers/transport_peer.py echoes what it receives, so each reply shows what the other process made of it)."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest
import torch

from hiveengine.errors import ProtocolError
from hiveengine.transport import Peer, PeerAddress, TransportLimits
from hiveengine.transport.wire import (
    DTYPES,
    PREFIX,
    TAIL_ALIGN,
    FrameSpec,
    Kind,
    as_frame,
    check_buffers,
    decode_message,
    encode_control,
    frame_specs,
    inline_tensors,
    restore_requires_grad,
)

pytestmark = pytest.mark.timeout(90)
LIMITS = TransportLimits(max_header_bytes=4096, max_frames=8, max_frame_bytes=4096, max_message_bytes=8192)
SMALL, LARGE = 7, 1 << 18  # elements: sent inside the control message / as frames (and by address, same host)


# ---- descriptors


def test_descriptors_carry_complex_dtypes_and_requires_grad():
    leaf = torch.zeros(3, 2, dtype=torch.complex64, requires_grad=True)
    assert FrameSpec.of(leaf) == FrameSpec(torch.complex64, (3, 2), "cpu", True)
    assert FrameSpec.wire_of(leaf) == FrameSpec.of(leaf).to_wire() == ["complex64", [3, 2], "cpu", True]
    assert FrameSpec.of(leaf).nbytes == 48
    plain = torch.zeros(4, dtype=torch.complex128)
    assert FrameSpec.wire_of(plain) == ["complex128", [4], "cpu"]  # no flag when False: same bytes as before
    assert FrameSpec.wire_of(leaf * 2) == ["complex64", [3, 2], "cpu", True]  # a non-leaf that requires grad too
    items = [FrameSpec.wire_of(leaf), FrameSpec.wire_of(plain), ["float32", [1], "cpu", False]]
    specs = frame_specs({"k": 0, "i": 1, "f": items}, LIMITS)
    assert [s.requires_grad for s in specs] == [True, False, False]
    assert [s.dtype for s in specs] == [torch.complex64, torch.complex128, torch.float32]


@pytest.mark.parametrize(
    "item, message",
    [
        (["complex32", [1], "cpu"], "unsupported dtype"),
        (["float8_e4m3fn", [1], "cpu"], "unsupported dtype"),
        (["Float32", [1], "cpu"], "unsupported dtype"),
        (["", [1], "cpu"], "unsupported dtype"),
        ([5, [1], "cpu"], "unsupported dtype"),
        ([None, [1], "cpu"], "unsupported dtype"),
        ([["float32"], [1], "cpu"], "unsupported dtype"),
        (["float32", [1], "cpu", "yes"], "malformed requires_grad"),
        (["float32", [1], "cpu", 1], "malformed requires_grad"),
        (["float32", [1], "cpu", 0], "malformed requires_grad"),
        (["float32", [1], "cpu", None], "malformed requires_grad"),
        (["float32", [1], "cpu", [True]], "malformed requires_grad"),
        (["int32", [1], "cpu", True], "cannot require grad"),
        (["bool", [1], "cpu", True], "cannot require grad"),
        (["uint8", [1], "cpu", True], "cannot require grad"),
        (["float32", [True, 2], "cpu"], "malformed tensor shape"),
        (["complex128", [2.0], "cpu"], "malformed tensor shape"),
        (["complex128", [1 << 62], "cpu"], "malformed tensor shape"),
        (["complex128", [300], "cpu"], "exceeds the limit of 4096"),  # 4800 bytes: the complex itemsize counts
        (["float32", [1], "cpu", True, "extra"], "malformed tensor descriptor"),
    ],
)
def test_malformed_descriptors_are_protocol_errors(item, message):
    with pytest.raises(ProtocolError, match=message):
        frame_specs({"k": 0, "i": 1, "f": [item]}, LIMITS)


# ---- inline tensors and buffers


def _message(body: dict, tensors: list[torch.Tensor]) -> np.ndarray:
    """A received control message: its bytes in a fresh (16-byte aligned) buffer, as the reactor hands them over."""
    body["f"] = [FrameSpec.wire_of(t) for t in tensors]
    body["x"] = True
    raw = encode_control(body, LIMITS, [as_frame(t).numpy() for t in tensors])
    buf = np.empty(len(raw), dtype=np.uint8)
    buf[:] = np.frombuffer(raw, dtype=np.uint8)
    return buf


def test_inline_complex_tensors_are_exact_aligned_and_get_their_grad_flag_back():
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, dtype=torch.complex64, generator=gen).requires_grad_(),
        torch.ones(1, dtype=torch.int8),  # pushes the next tensor to an offset that is 8 mod 16
        torch.randn(2, 3, dtype=torch.complex128, generator=gen),
        torch.randn(5, generator=gen).to(torch.bfloat16).requires_grad_(),
    ]
    body = decode_message(_message({"k": Kind.REQUEST, "i": 1}, tensors), LIMITS)
    specs = frame_specs(body, LIMITS)
    got = restore_requires_grad(inline_tensors(body["x"], specs), specs)
    for sent, received in zip(tensors, got, strict=True):
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert torch.equal(received.detach(), sent.detach())
        assert received.data_ptr() % received.element_size() == 0  # complex128 was copied where misaligned
        assert received.requires_grad == sent.requires_grad and received.is_leaf and received.grad_fn is None
    got[0].abs().sum().backward()  # the received leaf takes part in autograd like any other
    assert got[0].grad is not None and got[0].grad.shape == (3,)


def test_inline_bytes_must_match_the_descriptors():
    tensors = [torch.zeros(4, dtype=torch.complex64)]
    buf = _message({"k": Kind.REQUEST, "i": 1}, tensors)
    for claimed, message in [([5], "shorter"), ([3], "longer")]:
        body = decode_message(buf, LIMITS)
        body["f"][0][1] = claimed  # the descriptor lies about the shape
        with pytest.raises(ProtocolError, match=message):
            inline_tensors(body["x"], frame_specs(body, LIMITS))
    body = decode_message(buf, LIMITS)
    body["f"][0][0] = "complex128"  # same element count, twice the bytes
    with pytest.raises(ProtocolError, match="shorter"):
        inline_tensors(body["x"], frame_specs(body, LIMITS))


def test_receive_buffers_must_match_complex_frames():
    (spec,) = frame_specs({"k": 0, "i": 1, "f": [["complex64", [4], "cpu", True]]}, LIMITS)
    check_buffers([torch.empty(4, dtype=torch.complex64)], [spec])
    for wrong in [torch.empty(8, dtype=torch.float32), torch.empty(2, dtype=torch.complex128), torch.empty(5, 1)]:
        with pytest.raises(ProtocolError, match="do not fit the receive buffer"):
            check_buffers([wrong], [spec])


def test_lazily_conjugated_views_travel_as_their_values():
    x = torch.tensor([[1 + 2j, 3 - 4j], [5j, -6]], dtype=torch.complex64)
    for view in [x.conj(), x.mH, x.conj().imag]:
        frame = as_frame(view)
        assert torch.equal(frame.view(view.dtype).reshape(view.shape), view.resolve_conj().resolve_neg())


def test_frames_of_grad_tensors_are_plain_byte_views():
    x = torch.randn(4, dtype=torch.complex128, requires_grad=True)
    frame = as_frame(x)
    assert frame.dtype == torch.uint8 and frame.numel() == 64 and not frame.requires_grad
    assert frame.data_ptr() == x.data_ptr()  # no copy
    assert torch.equal(frame.view(torch.complex128), x.detach())


# ---- real peers in two processes


def _grad_batch(numel: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(numel)
    param = torch.randn(numel, dtype=torch.complex64, generator=gen).requires_grad_()
    weight = torch.randn(numel, generator=gen, dtype=torch.float64).requires_grad_()
    return [
        param,  # a complex leaf that requires grad
        torch.randn(numel, 2, dtype=torch.complex128, generator=gen),  # complex, no grad
        weight * 2,  # a non-leaf that requires grad arrives as a leaf that does
        torch.randn(numel, generator=gen).to(torch.bfloat16).requires_grad_(),
        torch.arange(numel),  # integers never require grad
        torch.randn(numel, generator=gen),
        param.detach().conj(),  # a lazily conjugated view: its values travel
    ]


@pytest.mark.parametrize("numel", [SMALL, LARGE])
@pytest.mark.parametrize("local_copy", [True, False])
def test_complex_and_grad_tensors_travel_between_processes(server, numel, local_copy):
    _, address = server
    peer = Peer(limits=TransportLimits(local_copy=local_copy))
    try:
        tensors = _grad_batch(numel)
        _, reply = peer.call_sync(address, "echo", {}, tensors, timeout=30)
        assert len(reply) == len(tensors)
        for sent, got in zip(tensors, reply, strict=True):
            assert got.dtype == sent.dtype and got.shape == sent.shape
            assert torch.equal(got.detach(), sent.detach().resolve_conj()) and not got.is_conj()
            # The echo sends back what the server received: the flag survived both directions.
            assert got.requires_grad == sent.requires_grad
            assert got.is_leaf and got.grad_fn is None
        reply[0].abs().sum().backward()
        assert reply[0].grad is not None and torch.isfinite(torch.view_as_real(reply[0].grad)).all()
    finally:
        peer.shutdown()


@pytest.mark.parametrize("numel", [SMALL, LARGE])
def test_caller_buffers_keep_their_own_grad_flag(client_peer, server, numel):
    """A sender's requires_grad applies to fresh tensors only: it never attaches the receiver's buffers to a graph."""
    _, address = server
    x = torch.randn(numel, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = torch.empty(numel, dtype=torch.complex64)
    _, (got,) = client_peer.call_sync(address, "echo", {}, [x], timeout=30, out=[out])
    assert got is out and not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, x.detach())


@pytest.mark.parametrize("chunk_bytes", [1024, 64 << 10])  # inline chunks, framed chunks
def test_streaming_a_tensor_that_requires_grad(server, chunk_bytes):
    """Stream chunks carry the flag too; they land in the receiver's buffer, which keeps its own."""
    _, address = server
    peer = Peer(limits=TransportLimits(stream_chunk_bytes=chunk_bytes))
    try:
        x = torch.randn(20 * chunk_bytes // 4 + 5, generator=torch.Generator().manual_seed(4)).requires_grad_()
        reply = peer.runtime.run(
            peer.send_tensor(address, "sink", x, {"numel": x.numel(), "dtype": "float32"}), timeout=60
        )
        assert reply == {"sum": float(x.detach().double().sum()), "numel": x.numel()}
    finally:
        peer.shutdown()


@pytest.fixture(scope="module")
def client_peer():
    peer = Peer()
    yield peer
    peer.shutdown()


def _raw_request(peer: Peer, address: str, frames: list, tail: bytes | None = None):
    """Send a hand-made request (descriptors `frames`, inline bytes `tail`) and return the reply or raise its error."""

    async def send():
        conn = await peer.connect(PeerAddress.parse(address))
        request_id = conn.new_request_id()
        reply = conn.expect_reply(request_id)
        body = {"k": Kind.REQUEST, "i": request_id, "m": "echo", "h": {}, "f": frames}
        if tail is None:
            body["s"] = 7
        else:
            body["x"] = True
        payload = msgpack.packb(body)
        message = PREFIX.pack(len(payload), 0) + payload
        if tail is not None:
            message += bytes(-len(message) % TAIL_ALIGN) + tail
        buf = np.frombuffer(message, dtype=np.uint8)
        await conn.send_message(buf.tobytes())
        return await asyncio.wait_for(reply, 10)

    return peer.runtime.run(send(), 20)


@pytest.mark.parametrize(
    "frames, tail, message",
    [
        ([["complex32", [4], "cpu"]], None, "unsupported dtype"),
        ([["complex64", [4], "cpu", "yes"]], None, "malformed requires_grad"),
        ([["int64", [4], "cpu", True]], None, "cannot require grad"),
        ([["complex64", [4], "cpu", True]], bytes(24), "shorter than their descriptors"),
        ([["complex128", [1], "cpu"]], bytes(24), "longer than their descriptors"),
    ],
)
def test_hostile_descriptors_get_typed_errors_from_a_real_peer(client_peer, server, frames, tail, message):
    _, address = server
    with pytest.raises(ProtocolError, match=message):
        _raw_request(client_peer, address, frames, tail)
    # The server keeps serving, over the same connection or a fresh one.
    x = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    _, (got,) = client_peer.call_sync(address, "echo", {}, [x], timeout=10)
    assert got.requires_grad and torch.equal(got.detach(), x.detach())


def test_every_wire_dtype_is_listed_once():
    assert set(DTYPES.values()) >= {torch.complex64, torch.complex128, torch.bfloat16}
    assert len(set(DTYPES.values())) == len(DTYPES)


@pytest.mark.gpu
def test_cuda_complex_and_grad_tensors_travel_between_processes(server):
    _, address = server
    peer = Peer()
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        tensors = [
            torch.randn(1000, dtype=torch.complex64, device="cuda", generator=gen).requires_grad_(),
            torch.randn(512, 512, dtype=torch.complex128, device="cuda", generator=gen),
        ]
        _, reply = peer.call_sync(address, "echo", {}, tensors, timeout=60)
        for sent, got in zip(tensors, reply, strict=True):
            assert got.device.type == "cuda" and got.dtype == sent.dtype
            assert torch.equal(got.detach(), sent.detach()) and got.requires_grad == sent.requires_grad
    finally:
        peer.shutdown()
