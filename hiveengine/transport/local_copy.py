"""Direct copies between processes on one host: the receiver reads a sender's tensor with process_vm_readv.

UCX would do this itself (its `cma` transport), but it refuses cma for rendezvous on endpoints with peer
error handling, which hiveengine needs to notice dead peers; between local processes it then copies every
byte twice through a shared-memory FIFO. Reading the sender's memory directly is one copy and no FIFO
round trips.

A connection uses it only after the reader proved it can read the sender: the reader sends a fresh nonce,
the sender places it in its own memory and answers with its pid and the nonce's address, and the reader
checks the bytes it reads there. Only the process itself (or one allowed to write its memory) can pass,
so a peer cannot point the reader at another process's memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from collections.abc import Sequence

import torch

from hiveengine.errors import ConnectionLostError, ProtocolError

logger = logging.getLogger(__name__)

NONCE_BYTES = 32
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


def read_bytes(pid: int, address: int, nbytes: int) -> bytes:
    """`nbytes` of process `pid`'s memory at `address` (for the nonce check)."""
    buf = ctypes.create_string_buffer(nbytes)
    got = 0
    while got < nbytes:
        got += _read_once(pid, ctypes.addressof(buf) + got, address + got, nbytes - got)
    return buf.raw


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
    loop = asyncio.get_running_loop()
    for target, address in zip(targets, addresses, strict=True):
        staging = target if target.device.type == "cpu" else torch.empty_like(target, device="cpu")
        base, nbytes = staging.data_ptr(), staging.numel() * staging.element_size()
        if nbytes <= INLINE_READ_BYTES:
            _read_span(pid, base, address, nbytes)
        else:
            step = -(-nbytes // READ_THREADS)
            slices = [(start, min(step, nbytes - start)) for start in range(0, nbytes, step)]
            await asyncio.gather(
                *(loop.run_in_executor(_reader_pool(), _read_span, pid, base + s, address + s, n) for s, n in slices)
            )
        if staging is not target:
            target.copy_(staging)


def check_addresses(addresses, count: int) -> list[int]:
    """The frame addresses a message announced, validated: one unsigned integer per frame."""
    if not isinstance(addresses, list) or len(addresses) != count:
        raise ProtocolError(f"a local message must give one address for each of its {count} frames")
    if not all(isinstance(a, int) and 0 <= a < 1 << 64 for a in addresses):
        raise ProtocolError("malformed local frame address")
    return addresses
