"""The transport's shutdown between real processes: a UCX connection request that completes only after a
process shut its transport down must not crash it (UCX hands an accepted connection a raw pointer to its
listener, so the listener has to live as long as the worker that can still read that connection)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from hiveengine.transport import PeerAddress
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(120)
DEADLINE = 30.0  # seconds any one step may take
SOCKCM_HEADER = 16  # UCX's TCP connection manager: the private data's length (8 bytes) and a status, padded
MAX_PRIVATE_DATA = 1 << 16


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"the dialer closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def tcp_row(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(receive queue bytes, socket inode) of the 127.0.0.1 TCP socket from `local_port` to `remote_port`."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = (int(x.split(":")[1], 16) for x in fields[1:3])
            if (local, remote) == (local_port, remote_port):
                return int(fields[4].split(":")[1], 16), int(fields[9])
    return None


def owns_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def wait_for(condition, what: str) -> None:
    """Poll `condition` until it holds (a state of the kernel's sockets, which nothing announces)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("keep_worker", ["no", "yes"])
def test_a_connection_request_completed_after_shutdown_does_no_harm(keep_worker):
    """A real dialer's connection request reaches the victim through a relay here that holds its bytes back
    until the victim's transport has shut down. Without a listener kept as long as a surviving worker, the
    victim died with SIGSEGV in UCX's thread as the bytes arrived (keep_worker "yes")."""
    victim = PeerProcess("transport_peer.py", "shut_down_on_request", keep_worker)
    relay = socket.create_server(("127.0.0.1", 0))
    relay.settimeout(DEADLINE)
    sockets, dialer = [relay], None  # closed at the end, whatever happens
    try:
        address = PeerAddress.parse(victim.expect("ADDRESS"))
        dialer = PeerProcess("transport_peer.py", "ping", f"ucx://127.0.0.1:{relay.getsockname()[1]}/{address.peer_id}")
        incoming, _ = relay.accept()
        sockets.append(incoming)
        incoming.settimeout(DEADLINE)
        header = recv_exactly(incoming, SOCKCM_HEADER)
        length = int.from_bytes(header[:8], "little")
        assert 0 < length <= MAX_PRIVATE_DATA
        request = header + recv_exactly(incoming, length)
        upstream = socket.create_connection((address.host, address.port), timeout=DEADLINE)
        sockets.append(upstream)
        ports = (address.port, upstream.getsockname()[1])
        wait_for(
            lambda: (row := tcp_row(*ports)) is not None and owns_socket(victim.proc.pid, row[1]),
            "the victim's UCX accepted the relayed connection",
        )
        victim.proc.stdin.write("shutdown\n")
        victim.proc.stdin.flush()
        victim.expect("SHUT")
        try:
            upstream.sendall(request)
        except OSError:  # the victim's worker is gone, and the connection with it
            assert keep_worker == "no"
        wait_for(lambda: (row := tcp_row(*ports)) is None or row[0] == 0, "the victim read the request")
        victim.proc.stdin.write("exit\n")
        victim.proc.stdin.flush()
        assert victim.expect("BYE") == str(keep_worker == "yes")
        assert victim.proc.wait(DEADLINE) == 0, victim.tail()
    finally:
        for sock in sockets:
            sock.close()
        victim.kill()
        if dialer is not None:
            dialer.kill()
