"""The wire format: a msgpack control message per message, then one raw tag frame per tensor.

Control message layout: 4-byte little-endian body length, 1 flag byte (bit 0: zstd), msgpack body,
then (when the body has "x") the raw bytes of small host tensors sent inline, each starting at a
multiple of TAIL_ALIGN. The body is a dict with one-letter keys (the KEY_* table below) and a `Kind`. Tensor
descriptors are [dtype, shape, device], with a fourth item `true` when the tensor requires grad; receivers
validate them against `TransportLimits` before allocating. Every frame travels as the tensor's raw bytes,
whatever its dtype (bf16 and complex included), so the descriptor alone says how to read them back. Inline
tensors are received as views of the control message's buffer: no copy (unless a view would be misaligned).
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
import zstandard

from hiveengine.errors import ProtocolError
from hiveengine.transport.limits import TransportLimits

PREFIX = struct.Struct("<IB")
FLAG_ZSTD = 1
TAIL_ALIGN = 8  # inline tensors start at multiples of this offset, so a view of any dtype is aligned
_PADDING = bytes(TAIL_ALIGN)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 16

_zstd_c = zstandard.ZstdCompressor(level=3)
_zstd_d = zstandard.ZstdDecompressor()


# The keys of a control message's body: the one table of the transport's envelope (the body is a msgpack map with
# one-letter keys, because small calls are latency-bound). Receivers validate each before use. The letters are the
# protocol: renaming a constant is free, changing its letter breaks compatibility with every deployed peer.

# Every message.
KEY_KIND = "k"  # message kind (Kind)
KEY_ID = "i"  # request id: a caller's call or stream, or 0 for connection-level messages

# Calls and streams (REQUEST, RESPONSE, ERROR, STREAM_OPEN, STREAM_CHUNK).
KEY_METHOD = "m"  # method name (REQUEST, STREAM_OPEN)
KEY_HEADER = "h"  # user header, a dict (REQUEST, RESPONSE, STREAM_OPEN, STREAM_CHUNK)
KEY_DEADLINE = "d"  # the caller's deadline in seconds (REQUEST, STREAM_OPEN); the server caps it
KEY_LAST = "e"  # STREAM_CHUNK: true on the stream's last chunk (no STREAM_END follows)
KEY_ERROR = "e"  # ERROR: [error class name, message] (the same letter as KEY_LAST, in another kind)

# Tensor frames (any message that carries tensors).
KEY_FRAMES = "f"  # tensor descriptors, one per tensor: [dtype, shape, device(, requires_grad)]
KEY_SEQ = "s"  # sequence number of the first frame's tag (FRAMES_READ: the message whose frames were read)
KEY_INLINE = "x"  # the tensors travel inline, after the body, in the control message itself
KEY_SEALED = "z"  # the frames travel encrypted (session.py): SEALED_FRAMES each whole, SEALED_BLOCKS in blocks
KEY_TAGS = "t"  # the frames travel readable: their GMAC tags, one per frame (session.py)

SEALED_FRAMES, SEALED_BLOCKS = 1, 2  # values of KEY_SEALED

# Same-host direct copy (local_copy.py).
KEY_ADDRESSES = "a"  # one address per frame, in the sender's memory, instead of the frames
KEY_SOCKET = "u"  # LOCAL_OFFER: the name of the sender's Unix socket for the locality proof

# Set by the receiver after decoding, never read off the wire.
KEY_COUNTER = "_n"  # the message's session counter: which nonces its frames were sealed with


class Kind(enum.IntEnum):
    REQUEST = 0
    RESPONSE = 1
    ERROR = 2
    STREAM_OPEN = 3
    STREAM_CHUNK = 4
    STREAM_END = 5
    # Connection-level messages of the same-host direct copy (local_copy.py), never seen by handlers.
    LOCAL_OFFER = 6  # sender -> reader: KEY_SOCKET, the name of the Unix socket where the reader proves it is local
    LOCAL_READY = 7  # reader -> sender: proven; announce large host frames by address from now on
    FRAMES_READ = 8  # reader -> sender: the frames of message KEY_SEQ are read (or dropped); free to reuse


@dataclass(frozen=True)
class FrameSpec:
    """What a receiver needs to post a buffer for one tensor frame, and whether the tensor it makes of it
    requires grad (restored on fresh tensors by `restore_requires_grad`)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def to_wire(self) -> list:
        item = [DTYPE_NAMES[self.dtype], list(self.shape), self.device]
        return [*item, True] if self.requires_grad else item

    @staticmethod
    def wire_of(t: torch.Tensor) -> list:
        """`FrameSpec.of(t).to_wire()` without the intermediate object (the send path's hot spot)."""
        if t.requires_grad:
            return [_dtype_name(t), list(t.shape), t.device.type, True]
        return [_dtype_name(t), list(t.shape), t.device.type]

    @classmethod
    def of(cls, t: torch.Tensor) -> FrameSpec:
        _dtype_name(t)
        return cls(t.dtype, tuple(t.shape), t.device.type, t.requires_grad)

    @classmethod
    def from_wire(cls, item, limits: TransportLimits) -> FrameSpec:
        if not (isinstance(item, list | tuple) and len(item) in (3, 4)):
            raise ProtocolError(f"malformed tensor descriptor {item!r:.100}")
        dtype_name, shape, device = item[:3]
        requires_grad = item[3] if len(item) == 4 else False
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise ProtocolError(f"unsupported dtype {dtype_name!r:.40}; supported: {sorted(DTYPES)}")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape)
        ):
            raise ProtocolError(f"malformed tensor shape {shape!r:.100}")
        if device not in ("cpu", "cuda"):
            raise ProtocolError(f"unsupported device {device!r:.40}")
        dtype = DTYPES[dtype_name]
        if type(requires_grad) is not bool:
            raise ProtocolError(f"malformed requires_grad flag {requires_grad!r:.40} (must be true or false)")
        if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise ProtocolError(f"a {dtype_name} tensor cannot require grad (only floating and complex ones can)")
        spec = cls(dtype, tuple(shape), device, requires_grad)
        if spec.nbytes > limits.max_frame_bytes:
            raise ProtocolError(
                f"tensor frame of {spec.nbytes} bytes exceeds the limit of {limits.max_frame_bytes} bytes "
                "(send it with a stream, or raise TransportLimits.max_frame_bytes on the receiver)"
            )
        return spec


def _dtype_name(t: torch.Tensor) -> str:
    """The wire name of `t`'s dtype; a dtype the wire cannot carry is refused."""
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ProtocolError(f"tensors of dtype {t.dtype} cannot be sent; supported: {sorted(DTYPES)}")
    return name


def encode_control(body: dict, limits: TransportLimits, tail: Sequence = ()) -> bytes:
    """Pack a control message; compress it when its body is large; append the `tail` buffers (inline
    tensor bytes, never compressed) at aligned offsets; refuse a message the receiver could not take."""
    payload = msgpack.packb(body, use_bin_type=True)
    flags = 0
    if len(payload) > limits.compress_threshold_bytes:
        payload, flags = _zstd_c.compress(payload), FLAG_ZSTD
    parts = [PREFIX.pack(len(payload), flags), payload]
    offset = PREFIX.size + len(payload)
    for chunk in tail:
        pad = -offset % TAIL_ALIGN
        parts += (_PADDING[:pad], chunk)
        offset += pad + chunk.nbytes
    if offset > limits.max_header_bytes:
        raise ProtocolError(
            f"header of {offset} bytes exceeds the limit of {limits.max_header_bytes} bytes: send large data as tensors"
        )
    return b"".join(parts)


def decode_control(buf: memoryview, limits: TransportLimits) -> dict:
    """Unpack and sanity-check a control message; raise ProtocolError on anything malformed."""
    if len(buf) < PREFIX.size:
        raise ProtocolError("control message shorter than its prefix")
    length, flags = PREFIX.unpack_from(buf)
    if length > len(buf) - PREFIX.size or flags & ~FLAG_ZSTD:
        raise ProtocolError(f"malformed control prefix (length {length}, flags {flags})")
    payload = buf[PREFIX.size : PREFIX.size + length]
    try:
        if flags & FLAG_ZSTD:
            payload = _zstd_d.decompress(payload, max_output_size=limits.max_header_bytes * 64)
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise ProtocolError(f"undecodable control message: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get(KEY_KIND), int) or not isinstance(body.get(KEY_ID), int):
        raise ProtocolError("control message lacks its kind or id")
    if body[KEY_KIND] not in Kind._value2member_map_:
        raise ProtocolError(f"unknown message kind {body[KEY_KIND]}")
    return body


def decode_message(buf: np.ndarray, limits: TransportLimits) -> dict:
    """`decode_control` of a received message; its inline tensor bytes, if any, become
    `body[KEY_INLINE] = (buf, offset where they start)` for `inline_tensors`."""
    body = decode_control(memoryview(buf), limits)
    if KEY_INLINE in body:
        if body[KEY_INLINE] is not True:
            raise ProtocolError("malformed inline tensor marker")
        body[KEY_INLINE] = (buf, PREFIX.size + PREFIX.unpack_from(buf)[0])
    return body


def frames_nbytes(specs: Sequence[FrameSpec]) -> int:
    """The bytes the frames of `specs` carry in all."""
    return sum(spec.nbytes for spec in specs)


def frame_specs(body: dict, limits: TransportLimits) -> list[FrameSpec]:
    """Validated descriptors of the frames that follow a control message."""
    items = body.get(KEY_FRAMES, [])
    if not isinstance(items, list):
        raise ProtocolError("tensor descriptors must be a list")
    if len(items) > limits.max_frames:
        raise ProtocolError(f"{len(items)} tensor frames exceed the limit of {limits.max_frames}")
    first = body.get(KEY_SEQ, 0)
    if not isinstance(first, int) or not 0 <= first < 1 << 32:
        raise ProtocolError(f"malformed frame sequence number {first!r:.40}")
    specs = [FrameSpec.from_wire(item, limits) for item in items]
    total = sum(s.nbytes for s in specs)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes} bytes")
    return specs


def inline_tensors(tail: tuple[np.ndarray, int], specs: list[FrameSpec]) -> list[torch.Tensor]:
    """Views of the inline tensors in a received message (see `decode_message`), checked against their
    descriptors: together they must fill the message's tail exactly."""
    message, offset = tail
    tensors = []
    for spec in specs:
        offset += -offset % TAIL_ALIGN
        end = offset + spec.nbytes
        if end > message.nbytes:
            raise ProtocolError("inline tensor bytes are shorter than their descriptors say")
        raw = torch.from_numpy(message[offset:end])
        if raw.data_ptr() % spec.dtype.itemsize:
            # complex128 (16-byte items) may start at 8 mod 16, and torch's kernels may crash on a misaligned
            # complex tensor: copy its bytes, as bytes, to fresh (aligned) memory first.
            raw = raw.clone()
        tensors.append(raw.view(spec.dtype).reshape(spec.shape))
        offset = end
    if offset != message.nbytes:
        raise ProtocolError("inline tensor bytes are longer than their descriptors say")
    return tensors


def restore_requires_grad(tensors: list[torch.Tensor], specs: Sequence[FrameSpec]) -> list[torch.Tensor]:
    """Mark the fresh tensors made for received frames (`allocate`, `inline_tensors`: leaves of no graph)
    as requiring grad where their sender's did. Not for buffers the receiver provided: those keep their own
    flags, so a sender can never attach a receiver's buffer to a graph."""
    for tensor, spec in zip(tensors, specs, strict=True):
        if spec.requires_grad:
            tensor.requires_grad_(True)
    return tensors


def check_buffers(buffers, specs: list[FrameSpec]) -> None:
    """Refuse receive buffers that do not fit the announced frames (count, dtype, size, contiguity)."""
    if len(buffers) != len(specs):
        raise ProtocolError(f"{len(specs)} tensors arrived but {len(buffers)} receive buffers were given")
    for i, (buf, spec) in enumerate(zip(buffers, specs, strict=True)):
        if buf.dtype != spec.dtype or buf.numel() != spec.numel or not buf.is_contiguous():
            raise ProtocolError(
                f"tensor {i} is {spec.numel} {spec.dtype} values, which do not fit the receive buffer "
                f"of {buf.numel()} {buf.dtype} values{'' if buf.is_contiguous() else ' (not contiguous)'}"
            )


def as_frame(t: torch.Tensor) -> torch.Tensor:
    """A contiguous flat byte view of `t` (copying only if `t` is not contiguous), outside any autograd
    graph: the bytes of any dtype, complex included, travel as they are in memory. A lazily conjugated or
    negated view (`x.conj()`, `x.mH`) is materialized first, so its values travel, not its base's."""
    if t.requires_grad:
        t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


def wire_buffer(frame: torch.Tensor):
    """The object UCX reads or writes: numpy for host memory, the tensor itself (CUDA array interface) on GPU."""
    return frame.numpy() if frame.device.type == "cpu" else frame


def allocate(spec: FrameSpec) -> torch.Tensor:
    """An empty tensor for an incoming frame: on CUDA when the sender's was and this host has one. It never
    requires grad while the frame lands in it (see `restore_requires_grad`)."""
    device = "cuda" if spec.device == "cuda" and torch.cuda.is_available() else "cpu"
    return torch.empty(spec.shape, dtype=spec.dtype, device=device)
