"""A real vscsid daemon (supervisor + worker processes) for tests."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.wait import WAIT, wait_for


class Daemon:
    def __init__(self, tmp: Path, args: list[str], socket_path: Path):
        self.socket_path = str(socket_path)
        self.log_path = tmp / "vscsid.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vscsid.cli", "--socket-path", self.socket_path,
             "--log-format", "json", "--log-level", "debug", "--quiet", *args],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_for_log("ready", timeout=2 * WAIT)

    @property
    def admin_socket(self) -> str:
        """The admin socket (vscsid's default: the socket path with .ctl appended)."""
        return self.socket_path + ".ctl"

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def events(self, name: str) -> list[dict]:
        return [r for r in self.log_records() if r.get("event") == name]

    def ring_stopped(self, queue: int = 0) -> dict:
        """A queue's worker counters, from its last ring_stopped line."""
        return [r for r in self.events("ring_stopped") if r.get("queue") == queue][-1]

    def wait_for_log(self, event: str, timeout: float = WAIT, count: int = 1, **match) -> dict:
        def hit():
            hits = [r for r in self.events(event) if all(r.get(k) == v for k, v in match.items())]
            return hits[count - 1] if len(hits) >= count else None

        return wait_for(hit, timeout, interval=0.02, abort=lambda: self.check_alive(f"before {event!r}"),
                        what=lambda: f"{event!r} log line #{count} {match}:\n" + self.log_tail())

    def check_alive(self, when: str = "") -> None:
        """AssertionError (with the log tail) if the daemon has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({self.proc.returncode}) {when}:\n" + self.log_tail())

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def worker_pids(self) -> list[int]:
        return self.events("ready")[-1]["workers"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
