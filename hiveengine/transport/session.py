"""The session layer: every message after the handshake is bound to the session, so that nobody on the path can
forge, alter, replay, reorder or drop a message unnoticed, and (by default) nobody can read it.

Construction (`cryptography` primitives only; the keys come from handshake.py: X25519 + HKDF-SHA256, one 256-bit
AES-GCM key per direction):

- nonce(c, j) = c as 8 little-endian bytes | j as 4 little-endian bytes, where c counts the control messages
  sent in this direction from 0, j = 0 is the control message itself and j = i + 1 its i-th tensor frame. A
  key never sees a nonce twice: c only grows, and each (c, j) is used for exactly one message or frame.
- A control message travels as mode byte | sealed, the mode byte authenticated as associated data:
  mode 1 (encrypted): AESGCM(key).encrypt(nonce(c, 0), message, aad=mode byte), i.e. ciphertext | 16-byte tag;
  mode 0 (authenticated only): message | AESGCM(key).encrypt(nonce(c, 0), b"", aad=mode byte | message),
  i.e. GMAC over the readable message.
- Tensor frames that travel through UCX: encrypted, frame i is AESGCM.encrypt(nonce(c, i + 1), frame, None)
  (ciphertext | tag; the header says so with "z": 1); authenticated only, the frame travels as it is and its
  GMAC tag AESGCM.encrypt(nonce(c, i + 1), b"", aad=frame) goes in the (authenticated) header's "t" list.
- Tensor frames that travel encrypted through a TCP wire are sealed in blocks ("z": 2), so that a sender seals
  block k + 1 while the kernel sends block k, and a receiver opens each block as it lands. Each frame is cut into
  blocks of BLOCK_BYTES (the last one of a frame may be shorter, an empty frame has none); the blocks of all the
  message's frames are numbered k = 1, 2, ... in frame order, and block k travels as
  AESGCM.encrypt(nonce(c, k), block, None) (ciphertext | tag), so a frame of n bytes takes
  n + ceil(n / BLOCK_BYTES) * TAG_BYTES bytes. A message's frames are sealed either whole or in blocks, never
  both, so no (c, j) is used twice. Each block is bound to its message (c) and its position (k) by its nonce; the
  authenticated header gives every frame's length, hence how many blocks each frame has and how long each is: a
  block altered, moved (within or across frames or messages), dropped, repeated or cut short fails to open, and
  so does a frame whose record is longer or shorter than its blocks (truncation).
- The receiver opens each control message with its own counter for that direction, in arrival order, and each
  frame (or block) with the counter of the message that announced it. A message or frame that fails to open (forged,
  altered, replayed, reordered, from another session, or of the wrong mode for its bytes) closes the connection.
- Which mode a sender uses: encrypted between hosts when `TransportLimits.encrypt` (HIVEENGINE_ENCRYPT, default
  1); authenticated only when encryption is off, or when the remote is proven to run on this host (local_copy.py:
  its bytes never leave the OS). Frames read by the same-host direct copy are neither encrypted nor tagged: they
  never leave the OS, and the authenticated header names exactly which regions to read. Device (CUDA) frames to
  a process that proved it runs on this host carry no tag either (None in "t"; sent so only after its LOCAL_READY,
  which it sends once proven): a tag would copy each frame to the host and back, and UCX moves them device to
  device within the host. A receiver takes an untagged frame only on such a link, and elsewhere closes the
  connection as forged. A receiver accepts
  either mode: a sender may always choose to send its own data readable, and the mode byte is authenticated.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import struct
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hiveengine.errors import ForgedMessageError, ProtocolError

TAG_BYTES = 16
MODE_CLEAR, MODE_SEALED = 0, 1
OVERHEAD = 1 + TAG_BYTES  # bytes a control message grows by
_NONCE = struct.Struct("<QI")


SCRATCH_POOL_BYTES = 256 << 20  # sealed-frame buffers kept for reuse (fresh memory is slow to touch the first time)
MIN_POOLED_BYTES = 64 << 10  # smaller buffers are cheap to allocate and are not pooled


class ScratchPool:
    """Buffers for sealed frames, reused by exact size up to SCRATCH_POOL_BYTES in all."""

    def __init__(self, capacity: int = SCRATCH_POOL_BYTES):
        self.capacity, self.held = capacity, 0
        self._free: dict[int, list[np.ndarray]] = {}

    def take(self, nbytes: int) -> np.ndarray:
        free = self._free.get(nbytes)
        if free:
            self.held -= nbytes
            return free.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        if buf.nbytes >= MIN_POOLED_BYTES and self.held + buf.nbytes <= self.capacity:
            self._free.setdefault(buf.nbytes, []).append(buf)
            self.held += buf.nbytes


SCRATCH = ScratchPool()  # one per process: used only on the transport loop's thread
# Frames at least this large are sealed and opened on CRYPTO_THREADS threads (cryptography releases the GIL), so the
# event loop keeps progressing UCX meanwhile: a sender seals the next chunk while the previous one is on the wire.
# Smaller ones are sealed on the loop: AES-GCM runs at about 8 GB/s (1 ms for 8 MiB), and the hop to a thread and
# back cost more than that on a busy 2-core VM (bench/transport.py ucx-tcp, 1 MiB: 0.45 GB/s offloaded, 0.69 not).
OFFLOAD_BYTES = 8 << 20
CRYPTO_THREADS = 2
_crypto_pool: concurrent.futures.ThreadPoolExecutor | None = None


def crypto_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _crypto_pool
    if _crypto_pool is None:
        _crypto_pool = concurrent.futures.ThreadPoolExecutor(CRYPTO_THREADS, thread_name_prefix="hiveengine-crypto")
    return _crypto_pool


BLOCK_BYTES = 1 << 20  # plaintext bytes of a sealed block (frames sealed in blocks: TCP wires)
MAX_BLOCKS = (1 << 32) - 1  # blocks one message may have: the nonce's index is 32 bits, 0 is the control message


def nonce(counter: int, index: int) -> bytes:
    return _NONCE.pack(counter, index)


def block_count(nbytes: int) -> int:
    """How many blocks a frame of `nbytes` is sealed in."""
    return -(-nbytes // BLOCK_BYTES)


def sealed_bytes(nbytes: int) -> int:
    """The length of a frame of `nbytes` sealed in blocks (each block grows by its tag)."""
    return nbytes + block_count(nbytes) * TAG_BYTES


class FrameBlocks:
    """The blocks of one frame of message `counter` whose first block has number `first`: block j of the frame is
    block first + j of the message (seals with our key, opens with the remote's)."""

    __slots__ = ("counter", "first", "session")

    def __init__(self, session: Session, counter: int, first: int):
        self.session, self.counter, self.first = session, counter, first

    def seal(self, j: int, data: np.ndarray, out: np.ndarray) -> None:
        self.session.seal_block(self.counter, self.first + j, data, out)

    def open(self, j: int, sealed: np.ndarray, out: np.ndarray) -> None:
        self.session.open_block(self.counter, self.first + j, sealed, out)


class Session:
    """One connection's keys and per-direction counters."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self.sent = 0  # the counter of the next control message we send
        self.received = 0  # the counter the next control message we receive must have

    # ---- sending

    def seal_control(self, message: bytes, encrypt: bool) -> tuple[int, bytes]:
        """(the message's counter, its bytes on the wire)."""
        counter, self.sent = self.sent, self.sent + 1
        if encrypt:
            mode = b"\x01"
            return counter, mode + self._send.encrypt(nonce(counter, 0), message, mode)
        mode = b"\x00"
        return counter, b"".join((mode, message, self._send.encrypt(nonce(counter, 0), b"", mode + message)))

    def seal_frame(self, counter: int, index: int, frame: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Frame `index` of message `counter`, encrypted (ciphertext | tag) into `out` (frame.nbytes + TAG_BYTES;
        safe on any thread: the cipher releases the GIL, so large frames are sealed off the event loop)."""
        self._send.encrypt_into(nonce(counter, index + 1), frame, None, out)
        return out

    def seal_block(self, counter: int, block: int, data: np.ndarray, out: np.ndarray) -> None:
        """Block `block` (numbered from 1 across the message's frames) of message `counter`, encrypted
        (ciphertext | tag) into `out` (data.nbytes + TAG_BYTES)."""
        self._send.encrypt_into(nonce(counter, block), data, None, out)

    def frame_tag(self, counter: int, index: int, frame: np.ndarray) -> bytes:
        """The GMAC tag of readable frame `index` of message `counter`."""
        return self._send.encrypt(nonce(counter, index + 1), b"", frame)

    def frame_blocks(self, counter: int, sizes: Sequence[int]) -> list[FrameBlocks]:
        """The blocks of each frame of message `counter`, given every frame's length; ProtocolError if the message
        needs more blocks than a nonce can number."""
        firsts = list(itertools.accumulate((block_count(n) for n in sizes), initial=1))
        if firsts[-1] - 1 > MAX_BLOCKS:
            raise ProtocolError(f"a message of {sum(sizes)} bytes needs more than {MAX_BLOCKS} sealed blocks")
        return [FrameBlocks(self, counter, first) for first in firsts[:-1]]

    # ---- receiving

    def open_control(self, data: np.ndarray) -> tuple[int, np.ndarray]:
        """(the message's counter, the message) of a received control message; ForgedMessageError if it does not
        open with the next counter."""
        if data.nbytes < OVERHEAD or data[0] not in (MODE_CLEAR, MODE_SEALED):
            raise ForgedMessageError("a message without a valid session seal")
        counter = self.received
        mode = data[:1].tobytes()
        try:
            if data[0] == MODE_SEALED:
                message = np.empty(data.nbytes - OVERHEAD, dtype=np.uint8)
                self._recv.decrypt_into(nonce(counter, 0), data[1:], mode, message)
            else:
                message = data[1:-TAG_BYTES]
                self._recv.decrypt(nonce(counter, 0), data[-TAG_BYTES:], mode + message.tobytes())
        except InvalidTag:
            raise ForgedMessageError(
                f"message {counter} failed authentication (forged, altered, replayed, reordered or dropped)"
            ) from None
        self.received = counter + 1
        return counter, message

    def open_frame(self, counter: int, index: int, sealed: np.ndarray, out: np.ndarray) -> None:
        """Decrypt frame `index` of message `counter` into `out` (its exact length)."""
        try:
            self._recv.decrypt_into(nonce(counter, index + 1), sealed, None, out)
        except (InvalidTag, ValueError):
            raise ForgedMessageError(f"frame {index} of message {counter} failed authentication") from None

    def open_block(self, counter: int, block: int, sealed: np.ndarray, out: np.ndarray) -> None:
        """Decrypt block `block` of message `counter` into `out` (its exact length)."""
        try:
            self._recv.decrypt_into(nonce(counter, block), sealed, None, out)
        except (InvalidTag, ValueError):
            raise ForgedMessageError(f"block {block} of message {counter} failed authentication") from None

    def check_frame(self, counter: int, index: int, frame: np.ndarray, tag) -> None:
        """Verify the GMAC tag of readable frame `index` of message `counter`."""
        if not isinstance(tag, bytes) or len(tag) != TAG_BYTES:
            raise ForgedMessageError(f"frame {index} of message {counter} has no valid tag")
        try:
            self._recv.decrypt(nonce(counter, index + 1), tag, frame)
        except InvalidTag:
            raise ForgedMessageError(f"frame {index} of message {counter} failed authentication") from None
