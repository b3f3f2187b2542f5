"""Start real peer processes for tests and read their announcements with deadlines (no sleeps)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"  # the scripts tests start as processes
LINE_TIMEOUT = 60.0
TAIL_LINES = 200  # stdout lines a process keeps for failure messages
TAIL_WAIT = 5.0  # seconds tail() waits for an exited process's last lines


class PeerProcess:
    """A child process whose stdout lines arrive on a queue; killed on close."""

    def __init__(self, script: str, *args: str, env: dict | None = None, wrap: list[str] = ()):
        """Run tests/peers/`script` (a .py file) or, for a dotted name, `python -m script`, with `args`; `wrap`
        prefixes the command line (e.g. `ip netns exec NS` to run it in a network namespace)."""
        target = [str(PEERS / script)] if script.endswith(".py") else ["-m", script]
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, *target, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env={"PYTHONFAULTHANDLER": "1", **os.environ, **(env or {})},  # a crash prints its Python stacks
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.recent: deque[str] = deque(maxlen=TAIL_LINES)
        self._read_all = threading.Event()  # set once stdout reached its end
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.recent.append(line.rstrip("\n"))
            self.lines.put(self.recent[-1])
        self._read_all.set()
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = LINE_TIMEOUT) -> str:
        """The rest of the first stdout line starting with `prefix`; fails if the process ends first."""
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise RuntimeError(f"{self.proc.args} exited ({self.proc.wait()}) before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def tail(self) -> str:
        """Its last stdout lines, read or not, for a failure message; once it has exited, up to its very last
        line (a crash's Python stacks come last)."""
        if self.proc.poll() is not None:
            self._read_all.wait(TAIL_WAIT)
        return "\n".join(self.recent)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """Ask the peer to exit by closing its stdin; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        self.kill()


def start_server(env: dict | None = None) -> tuple[PeerProcess, str]:
    server = PeerProcess("transport_peer.py", "serve", env=env)
    return server, server.expect("ADDRESS")
