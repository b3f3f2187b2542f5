"""Direct copies between processes on one host: the receiver reads a sender's tensor with process_vm_readv.

UCX would do this itself (its `cma` transport), but it refuses cma for rendezvous on endpoints with peer
error handling, which hiveengine needs to notice dead peers; between local processes it then copies every
byte twice through a shared-memory FIFO. Reading the sender's memory directly is one copy and no FIFO
round trips.

**Who may be read, proven by the OS.** Each process listens on a Unix-domain socket in the abstract namespace
(`Service`, one per transport runtime, named ``\0hiveengine-local-<random>``). A connection whose peer may be read
(a *sender*) offers that name over the authenticated connection (LOCAL_OFFER). The reader connects to it, takes the
listening process's pid and uid from the kernel (SO_PEERCRED), and sends the 32-byte value that the session's key
derivation gave for "this side reads the other" (handshake.py: only the two ends of this very session know it).
The listener answers 1 only if that value belongs to one of its own connections; only then does it let that
connection's remote read it (LOCAL_READY over the connection). The reader accepts the proof only if the kernel's
pid is not its own and the uid is its own. So a remote peer that names someone else's socket gets no answer (that
process holds no such session), one that names the reader's own socket is refused (own pid), and one in another
network namespace cannot be reached at all: in each case UCX carries the data, as without direct copy.

**What is read.** A message sends the addresses of its own frames ("a"), one per announced frame ("f"). The
reader reads, for each frame it receives, exactly the byte length the descriptor of that frame gives, at that
frame's address, in the proven process only, never in its own; then it acknowledges (FRAMES_READ) so the sender
may reuse the memory. The proven process can only make the reader read that process's own memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import Sequence

import torch

from hiveengine.errors import ConnectionLostError, ProtocolError
from hiveengine.transport.wire import DTYPES, KEY_ADDRESSES, KEY_FRAMES, KEY_ID, KEY_KIND, KEY_SOCKET, Kind

logger = logging.getLogger(__name__)

BINDING_BYTES = 32
NAME_PREFIX = b"\0hiveengine-local-"
MAX_NAME_BYTES = 100
PROOF_TIMEOUT = 5.0  # seconds a proof over the Unix socket may take, either side
MAX_PENDING_PROOFS = 32  # proofs the Unix listener serves at once; more connections are closed unanswered
PROOF_OK = b"\x01"
INLINE_READ_BYTES = 4 << 20  # frames up to this size are read on the event loop thread in one syscall
READ_THREADS = 2  # larger frames are read in this many parallel slices off the event loop


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load_readv():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    fn.restype = ctypes.c_ssize_t
    return fn


_readv = _load_readv()


def available() -> bool:
    """Whether this platform has process_vm_readv (Linux)."""
    return _readv is not None


def _read_once(pid: int, local: int, remote: int, nbytes: int) -> int:
    src, dst = _IOVec(remote, nbytes), _IOVec(local, nbytes)
    done = _readv(pid, ctypes.byref(dst), 1, ctypes.byref(src), 1, 0)
    if done < 0:
        code = ctypes.get_errno()
        if code == errno.ESRCH:
            raise ConnectionLostError(f"local peer process {pid} is gone")
        raise ProtocolError(f"cannot read {nbytes} bytes from local peer process {pid}: {os.strerror(code)}")
    if done == 0:
        raise ProtocolError(f"local peer process {pid} offered memory it does not have")
    return done


def _read_span(pid: int, local: int, remote: int, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        done += _read_once(pid, local + done, remote + done, nbytes - done)


_readers: concurrent.futures.ThreadPoolExecutor | None = None


def _reader_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _readers
    if _readers is None:
        _readers = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="hiveengine-local-copy")
    return _readers


async def read_into(pid: int, targets: Sequence[torch.Tensor], addresses: Sequence[int]) -> None:
    """Fill each contiguous tensor in `targets` from process `pid`'s memory at the matching address. Large
    frames are read in parallel slices on reader threads (the copy releases the GIL), which keeps the event
    loop free and uses more than one core where one is idle."""
    if pid == os.getpid():
        raise ProtocolError("a process never reads its own memory as a peer's")
    loop = asyncio.get_running_loop()
    for target, address in zip(targets, addresses, strict=True):
        staging = target if target.device.type == "cpu" else torch.empty_like(target, device="cpu")
        base, nbytes = staging.data_ptr(), staging.numel() * staging.element_size()
        if nbytes <= INLINE_READ_BYTES:
            _read_span(pid, base, address, nbytes)
        else:
            step = -(-nbytes // READ_THREADS)
            reads = [
                _reader_pool().submit(_read_span, pid, base + start, address + start, min(step, nbytes - start))
                for start in range(0, nbytes, step)
            ]
            for read in reads:  # a slice still being read when this is cancelled or fails writes into `staging`
                read.add_done_callback(lambda _, kept=staging: kept)  # until it ends: its memory must outlive it
            await asyncio.gather(*(asyncio.wrap_future(read, loop=loop) for read in reads))
        if staging is not target:
            target.copy_(staging)


def check_addresses(addresses, count: int) -> list[int]:
    """The frame addresses a message announced, validated: one unsigned integer per frame."""
    if not isinstance(addresses, list) or len(addresses) != count:
        raise ProtocolError(f"a local message must give one address for each of its {count} frames")
    if not all(isinstance(a, int) and 0 <= a < 1 << 64 for a in addresses):
        raise ProtocolError("malformed local frame address")
    return addresses


def _announced_bytes(item) -> int:
    """The byte length a (validated) frame descriptor announces."""
    dtype_name, shape = item[0], item[1]
    n = DTYPES[dtype_name].itemsize
    for d in shape:
        n *= d
    return n


def announced_regions(body: dict, first_index: int, targets: Sequence[torch.Tensor]) -> list[int]:
    """The addresses to read `targets` from: frames first_index.. of the message `body`, each target exactly as
    long as the frame its sender announced; anything else is a ProtocolError and nothing is read."""
    items = body.get(KEY_FRAMES)
    if not isinstance(items, list):
        raise ProtocolError("frames announced by address without descriptors")
    addresses = check_addresses(body.get(KEY_ADDRESSES), len(items))
    if first_index < 0 or first_index + len(targets) > len(items):
        raise ProtocolError("more frames read by address than the message announced")
    chosen = []
    for i, target in enumerate(targets):
        index = first_index + i
        nbytes = target.numel() * target.element_size()
        if nbytes != _announced_bytes(items[index]):
            raise ProtocolError(f"frame {index} is not the length its sender announced")
        if addresses[index] + nbytes > 1 << 64 or (nbytes and addresses[index] == 0):
            raise ProtocolError(f"frame {index} announces an impossible address")
        chosen.append(addresses[index])
    return chosen


def _peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket, as the kernel records them."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class Service:
    """The process's Unix-socket listener that answers locality proofs for its connections' bindings."""

    def __init__(self):
        self.name: bytes | None = None
        self._server: asyncio.AbstractServer | None = None
        self._links: dict[bytes, Link] = {}
        self._pending = 0

    async def start(self) -> None:
        """Listen (once); on failure direct copy is simply never offered."""
        if self._server is not None or not available():
            return
        name = NAME_PREFIX + os.urandom(16).hex().encode()
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=name)
        except OSError as e:
            logger.debug("no same-host direct copy: cannot listen on a Unix socket: %s", e)
            return
        self.name = name

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server, self.name = None, None
        self._links.clear()

    def register(self, binding: bytes, link: Link) -> None:
        self._links[binding] = link

    def unregister(self, binding: bytes) -> None:
        self._links.pop(binding, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending >= MAX_PENDING_PROOFS:
            writer.close()
            return
        self._pending += 1
        try:
            pid, _uid = _peer_credentials(writer.get_extra_info("socket"))
            if pid == os.getpid():
                return  # a process never reads itself
            async with asyncio.timeout(PROOF_TIMEOUT):
                binding = await reader.readexactly(BINDING_BYTES)
                link = self._links.get(binding)
                if link is None:
                    return
                link.reader_proven = True
                writer.write(PROOF_OK)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            logger.debug("local proof connection: %s", e)
        except asyncio.CancelledError:
            # The runtime is shutting down; nobody awaits this task, and asyncio's server logs a cancelled
            # connection task as an error ("Exception in callback ... CancelledError"), so it ends quietly.
            logger.debug("local proof connection cancelled at shutdown")
        finally:
            self._pending -= 1
            writer.close()


async def prove(name: bytes, binding: bytes) -> int:
    """Connect to the Unix socket `name`, present `binding`; the pid of the listening process if it accepts
    (never our own), else ProtocolError."""
    if not (isinstance(name, bytes) and name.startswith(NAME_PREFIX) and len(name) <= MAX_NAME_BYTES):
        raise ProtocolError("malformed direct copy offer")
    async with asyncio.timeout(PROOF_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(path=name)
        try:
            pid, uid = _peer_credentials(writer.get_extra_info("socket"))
            if pid <= 0 or pid == os.getpid() or uid != os.getuid():
                raise ProtocolError(f"the direct copy offer names process {pid} of user {uid}, which we never read")
            writer.write(binding)
            await writer.drain()
            if await reader.read(1) != PROOF_OK:
                raise ProtocolError("the process behind the direct copy offer holds no such session")
            return pid
        finally:
            writer.close()


class Link:
    """One connection's side of the direct copy: its offers, proofs and read counters."""

    def __init__(self, conn, service: Service | None, enabled: bool):
        self._conn = conn
        self._service = service
        self.enabled = enabled and service is not None and service.name is not None
        self.pid: int | None = None  # the proven remote process we read, once proven
        self.reader_proven = False  # the remote proved (over our Unix socket) that it is this session's reader
        self.remote_reads_us = False  # ... and said it is ready: large host frames go by address
        self.frames_read = 0
        self.bytes_read = 0
        self.refusal: str | None = None  # why our proof failed, if it did
        self._proving: asyncio.Task | None = None
        self.settled = asyncio.Event()  # our proof ended (proven or refused); set at once where there is none
        self.remote_ready = asyncio.Event()  # the remote may read us (remote_reads_us)

    def start(self) -> None:
        if not self.enabled:
            self.settled.set()
        else:
            self._service.register(self._conn.serve_binding, self)
            self._conn.post_quietly({KEY_KIND: Kind.LOCAL_OFFER, KEY_ID: 0, KEY_SOCKET: self._service.name})

    def close(self) -> None:
        if self.enabled:
            self._service.unregister(self._conn.serve_binding)
        if self._proving is not None:
            self._proving.cancel()

    def on_message(self, body: dict) -> None:
        kind = body[KEY_KIND]
        if kind == Kind.LOCAL_OFFER:
            if self.enabled and self._proving is None and self.pid is None:
                self._proving = asyncio.get_running_loop().create_task(self._prove(body.get(KEY_SOCKET)))
        elif kind == Kind.LOCAL_READY and self.reader_proven:
            self.remote_reads_us = True
            self.remote_ready.set()

    async def _prove(self, name) -> None:
        try:
            pid = await prove(name, self._conn.read_binding)
        except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError) as e:
            logger.debug("%r: no direct copy: %s", self._conn, e)
            self.refusal = str(e)
            return
        finally:
            self.settled.set()
        self.pid = pid
        self._conn.post_quietly({KEY_KIND: Kind.LOCAL_READY, KEY_ID: 0})
        logger.debug("%r: large frames are read directly from process %d", self._conn, pid)

    async def read(self, body: dict, targets: Sequence[torch.Tensor], first_index: int) -> None:
        """Read frames first_index.. of `body` into the contiguous `targets`, only as its sender announced them."""
        if self.pid is None:
            raise ProtocolError("frames were announced by address on a connection that never proved it local")
        addresses = announced_regions(body, first_index, targets)
        await read_into(self.pid, targets, addresses)
        self.frames_read += len(targets)
        self.bytes_read += sum(t.numel() * t.element_size() for t in targets)
