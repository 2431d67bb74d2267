"""sd_notify without libsystemd: real datagram sockets receive what vscsid.systemd sends."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

from vscsid import systemd


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    """A bound SOCK_DGRAM socket at a temp path, exported as $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


@pytest.fixture
def abstract_receiver(monkeypatch):
    name = f"vscsid-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield s
    s.close()


def _recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_notify_path_socket(receiver):
    assert systemd.notify("READY=1\nSTATUS=hello") is True
    assert _recv(receiver) == "READY=1\nSTATUS=hello"


def test_notify_abstract_socket(abstract_receiver):
    assert systemd.notify("WATCHDOG=1") is True
    assert _recv(abstract_receiver) == "WATCHDOG=1"
    assert systemd.ready("up") is True
    assert _recv(abstract_receiver) == "READY=1\nSTATUS=up"


def test_helpers(receiver):
    assert systemd.ready() and _recv(receiver) == "READY=1"
    assert systemd.ready("serving 2 LUNs\non /run/x.sock")
    assert _recv(receiver) == "READY=1\nSTATUS=serving 2 LUNs on /run/x.sock"  # one line
    assert systemd.status("draining") and _recv(receiver) == "STATUS=draining"
    assert systemd.stopping() and _recv(receiver) == "STOPPING=1"
    assert systemd.stopping("bye") and _recv(receiver) == "STOPPING=1\nSTATUS=bye"
    assert systemd.watchdog_ping() and _recv(receiver) == "WATCHDOG=1"
    assert systemd.reloading()
    lines = _recv(receiver).split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and int(usec) > 0


def test_unset_is_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.watchdog_ping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.notify("READY=1") is False


def test_errors_are_swallowed(tmp_path, monkeypatch):
    # Nobody listens at the path.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))
    assert systemd.notify("READY=1") is False
    # Not a socket.
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("NOTIFY_SOCKET", str(f))
    assert systemd.notify("READY=1") is False
    # A relative path or unsupported address family.
    monkeypatch.setenv("NOTIFY_SOCKET", "relative.sock")
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False
    # A stream socket at the path: connectionless send fails with EPROTOTYPE.
    st = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    st.bind(str(tmp_path / "stream.sock"))
    st.listen()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "stream.sock"))
    try:
        assert systemd.notify("READY=1") is False
    finally:
        st.close()


def test_no_fd_leak(receiver):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        systemd.watchdog_ping()
        _recv(receiver)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("usec,pid,expected", [
    (None, None, None),
    ("", None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("500000", "self", 0.25),
    ("0", None, None),
    ("-5", None, None),
    ("abc", None, None),
    ("30000000", "notanumber", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            if v == "self":
                v = str(os.getpid())
            elif v == "other":
                v = str(os.getpid() + 1)
            monkeypatch.setenv(k, v)
    assert systemd.watchdog_interval() == expected


def test_notify_socket_address():
    assert systemd.notify_socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_socket_address("@abc") == b"\0abc"
    assert systemd.notify_socket_address("") is None
    assert systemd.notify_socket_address("x") is None
