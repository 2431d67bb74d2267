"""systemd Type=notify: READY=1 once the socket listens, STATUS= lines, WATCHDOG=1
pings while the workers are healthy, STOPPING=1 on SIGTERM (exit code 0)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(60)


def test_notify_ready_status_watchdog_stopping(tmp_path, make_image):
    img = make_image(size=1 << 20)
    notify_path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(notify_path))
    rx.settimeout(20)
    sock_path = tmp_path / "vscsid.sock"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    # WATCHDOG_PID must name the daemon itself: the shell's pid becomes vscsid's on exec.
    cmd = (f'export WATCHDOG_PID=$$; exec {sys.executable} -m vscsid.cli --socket-path {sock_path} '
           f'--lun {img} --quiet --log-format json')
    proc = subprocess.Popen(["sh", "-c", cmd], env=env, stderr=subprocess.DEVNULL)
    try:
        messages = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            messages.append(rx.recv(4096).decode())
            if sum("WATCHDOG=1" in m for m in messages) >= 2:
                break
        ready = [m for m in messages if "READY=1" in m]
        assert ready, messages
        assert "STATUS=" in ready[0] and "waiting for a front end" in ready[0]
        assert sock_path.exists()       # READY only after the socket listens
        assert sum("WATCHDOG=1" in m for m in messages) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        rest = []
        rx.settimeout(0.5)
        try:
            while True:
                rest.append(rx.recv(4096).decode())
        except socket.timeout:
            pass
        assert any("STOPPING=1" in m for m in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rx.close()
