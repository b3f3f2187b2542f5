"""Helpers of the CLI tests (test_cli_*.py; no tests here). Run `hiveengine` commands as real processes: stdout read
through a pipe with deadlines (select, no sleeps, no reader thread, so the test can close its end as `tee` dying
would), stderr to a file."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "tests" / "peers" / "launch_worker.py")
NOISE = ("Traceback", "Task was destroyed", "Exception ignored", "Segmentation fault", "Fatal Python error")


def run_cli(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m hiveengine.cli ARGS` to completion (at most `timeout` seconds) from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def noise(text: str) -> list[str]:
    """The lines of `text` that a quiet exit must not print."""
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


class CLIProcess:
    """`python -m hiveengine.cli ARGS` in its own process group, from the repository root."""

    def __init__(self, *args: str, env: dict | None = None):
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by kill()
        read_end, write_end = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hiveengine.cli", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=self.stderr,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a stray worker of this launch can be killed with the group
        )
        os.close(write_end)
        self.fd: int | None = read_end
        self.lines: list[str] = []  # every complete stdout line read so far
        self._partial = b""
        self._eof = False

    def _read(self, deadline: float) -> bool:
        """Read what stdout has within the deadline; False at EOF."""
        if self._eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return True
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self._eof = True
            return False
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode(errors="replace") for line in complete]
        return True

    def expect(self, word: str, count: int = 1, timeout: float = 60) -> list[str]:
        """The first `count` stdout lines containing `word`, waiting at most `timeout` seconds for them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines if word in line]
            if len(found) >= count:
                return found[:count]
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {count} line(s) with {word!r} within {timeout} s: {self.lines[-20:]}")
            if not self._read(deadline):
                raise AssertionError(
                    f"exited ({self.proc.wait(10)}) before {count} line(s) with {word!r}: "
                    f"{self.lines[-20:]}\nstderr: {self.stderr_text()[-3000:]}"
                )

    def read_all(self, timeout: float = 60) -> list[str]:
        """Every stdout line up to EOF (at most `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            if time.monotonic() >= deadline:
                raise AssertionError(f"stdout still open after {timeout} s: {self.lines[-20:]}")
        return self.lines

    def close_stdout(self) -> None:
        """Close the reading end of stdout, as a `tee` killed by the same Ctrl-C would."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self._eof = True

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Kill the process group if still running, and release the pipe and the file."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.close_stdout()
        self.stderr.close()


def started_pids(launcher: CLIProcess, n: int) -> list[int]:
    """The pids of the first n workers the launcher reported starting."""
    lines = launcher.expect("hiveengine launch: started worker", n)
    return [int(line.rpartition("pid ")[2].rstrip(")")) for line in lines]


def alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
