"""``dsv4 serve`` as a child process on loopback: start it on a free port, wait until it answers, read its health and
memory, stop it gracefully. For scripts and tests that drive a real server (tests/serve, benchmarks/load_test.py).

Deliberately not here: the server itself (app.py), any client logic.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m dsv4.cli serve --host 127.0.0.1 --port PORT *args`` (a free port when ``port`` is 0), its output in
    ``log`` (or discarded when None)."""

    def __init__(self, *args: str, log: Path | None = None, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "dsv4.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log_file = log.open("w") if log is not None else None
        self.proc = subprocess.Popen(cmd, stdout=self._log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _log_tail(self) -> str:
        return f":\n{self.log.read_text()[-3000:]}" if self.log is not None else " (its output was discarded)"

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll /health until it answers 200; RuntimeError with the log's tail when the process exits or the time
        runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s{self._log_tail()}")

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def wait_idle(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /health until no request holds pages or sits in the engine; the last health seen (busy when the
        time ran out: the caller decides whether that is an error)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["pages_used"], h["running"], h["waiting"], h["in_flight"]) == (0, 0, 0, 0) \
                    or time.monotonic() > deadline:
                return h
            time.sleep(0.2)

    def rss(self) -> tuple[int, int]:
        """(current, peak since the last reset_peak) resident set size in bytes (Linux /proc)."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def close(self) -> None:
        """SIGINT (the server's graceful shutdown), then kill after a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
