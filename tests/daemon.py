"""A real vscsid daemon (supervisor + worker processes) for tests."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path


class Daemon:
    def __init__(self, tmp: Path, args: list[str], socket_path: Path):
        self.socket_path = str(socket_path)
        self.log_path = tmp / "vscsid.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vscsid.cli", "--socket-path", self.socket_path,
             "--log-format", "json", "--log-level", "debug", "--quiet", *args],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_for_log("ready", timeout=30)

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

    def wait_for_log(self, event: str, timeout: float = 10.0, count: int = 1, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [r for r in self.events(event) if all(r.get(k) == v for k, v in match.items())]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {event!r}:\n"
                                     + self.log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.02)
        raise AssertionError(f"no {event!r} log line within {timeout}s:\n"
                             + self.log_path.read_text(errors="replace")[-4000:])

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
